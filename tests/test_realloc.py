"""topk_realloc against its reference, its properties (hypothesis), and opcheck."""

from __future__ import annotations

import pytest
import torch

import tsqlora_ext  # noqa: F401  (loads the ops)
from tsqlora_ext import ops, reference


def random_case(seed, n_layers=5, max_size=12, ties=False):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_size + 1, (n_layers,), generator=g).tolist()
    sizes[0] = max(sizes[0], 1)
    r_min = [int(torch.randint(0, s + 1, (1,), generator=g)) // 2 for s in sizes]
    r_max = [lo + int(torch.randint(0, s - lo + 3, (1,), generator=g)) for lo, s in zip(r_min, sizes)]
    n = sum(sizes)
    scores = (torch.randint(0, 4, (n,), generator=g).float() if ties
              else torch.rand(n, generator=g))
    lo = sum(r_min)
    budget = lo + int(torch.randint(0, n + 3, (1,), generator=g))
    return scores, sizes, r_min, r_max, budget


def ours(scores, sizes, r_min, r_max, budget):
    return ops.topk_realloc(scores, ops.realloc_bounds(sizes, r_min, r_max), budget)


def ref(scores, sizes, r_min, r_max, budget):
    return reference.topk_realloc(scores, ops.realloc_bounds(sizes, r_min, r_max), budget)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_matches_reference(device, seed, ties):
    scores, sizes, r_min, r_max, budget = random_case(seed, ties=ties)
    scores = scores.to(device)
    got = ours(scores, sizes, r_min, r_max, budget)
    assert got.dtype == torch.bool and got.device == scores.device and got.shape == scores.shape
    assert torch.equal(got.cpu(), ref(scores, sizes, r_min, r_max, budget).cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_case_matches_reference(device, dtype):
    # 7,200 components: past 4,096, where ATen's CUDA sort leaves its one-block path for the radix
    # sort; many ties, NaN and -inf.
    g = torch.Generator().manual_seed(1)
    sizes = [24] * 300
    scores = torch.randint(0, 50, (sum(sizes),), generator=g).to(dtype)
    scores[torch.randint(0, sum(sizes), (200,), generator=g)] = float("nan")
    scores[torch.randint(0, sum(sizes), (200,), generator=g)] = float("-inf")
    scores = scores.to(device)
    args = (sizes, [2] * 300, [20] * 300, 8 * 300)
    assert torch.equal(ours(scores, *args).cpu(), ref(scores, *args).cpu())


def test_ties_prefer_the_lower_index_and_nan_ranks_last(device):
    scores = torch.tensor([1.0, float("nan"), 1.0, 1.0, 0.5], device=device)
    keep = ours(scores, [5], [0], [5], 2)
    assert keep.tolist() == [True, False, True, False, False]
    keep = ours(scores, [5], [0], [5], 5)
    assert keep.all()


@pytest.mark.parametrize("seed", range(6))
def test_nonfinite_scores_match_reference(device, seed):
    # NaN ties with -inf (both rank last, lower index first) and +inf ranks first, in the op and
    # the reference alike; -inf is what RankAllocator gives inactive components when they may not
    # grow back.
    scores, sizes, r_min, r_max, budget = random_case(seed, n_layers=4)
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([float("nan"), float("-inf"), float("inf")])
    pick = torch.randint(0, 4, scores.shape, generator=g)
    scores = torch.where(pick < 3, special[pick.clamp(max=2)], scores).to(device)
    got = ours(scores, sizes, r_min, r_max, budget)
    assert torch.equal(got.cpu(), ref(scores, sizes, r_min, r_max, budget).cpu())


def test_nan_ties_with_minus_inf(device):
    scores = torch.tensor([float("nan"), float("-inf"), float("inf")], device=device)
    assert ours(scores, [3], [0], [3], 2).tolist() == [True, False, True]
    assert ref(scores, [3], [0], [3], 2).tolist() == [True, False, True]


def test_bounds_table_stays_on_the_cpu_under_a_default_device():
    with torch.device("meta"):
        assert ops.realloc_bounds([4, 4], [0, 0], [4, 4]).device.type == "cpu"


def test_sizes_past_the_scores_are_refused_not_a_crash():
    # Sizes whose int64 sum wrapped to the score count passed the check and sorted outside the
    # buffer (a segfault).
    bounds = torch.tensor([[2**62 + 1, 2**62, 2**62, 2**62], [0] * 4, [1] * 4])
    with pytest.raises(RuntimeError, match=r"sizes\[0\] = 4611686018427387905 is negative or runs "
                                           r"past the 1 scores"):
        ops.topk_realloc(torch.rand(1), bounds, 1)
    with pytest.raises(RuntimeError, match="bounds must be a CPU tensor"):
        ops.topk_realloc(torch.rand(3), ops.realloc_bounds([3], [0], [3]).to("meta"), 1)


def test_budget_below_sum_r_min_is_refused(device):
    with pytest.raises(ValueError, match=r"budget 3 is below the sum of r_min \(4\)"):
        ours(torch.rand(8, device=device), [4, 4], [2, 2], [4, 4], 3)
    with pytest.raises(ValueError, match="below the sum of r_min"):
        ref(torch.rand(8), [4, 4], [2, 2], [4, 4], 3)


def test_rejects_bad_input():
    with pytest.raises(RuntimeError, match="sizes add up to 7 but scores holds 8"):
        ours(torch.rand(8), [4, 3], [0, 0], [4, 3], 4)
    with pytest.raises(RuntimeError, match="layer 1 needs 0 <= r_min <= r_max"):
        ours(torch.rand(8), [4, 4], [0, 3], [4, 2], 4)
    with pytest.raises(RuntimeError, match="scores must be float32 or float64"):
        ours(torch.ones(8, dtype=torch.long), [4, 4], [0, 0], [4, 4], 4)
    with pytest.raises(RuntimeError, match=r"bounds must be a CPU int64 tensor \[3, L\]"):
        ops.topk_realloc(torch.rand(8), torch.tensor([[4, 4], [0, 0], [4, 4]]).int(), 4)
    with pytest.raises(RuntimeError, match=r"bounds must be a CPU int64 tensor \[3, L\]"):
        ops.topk_realloc(torch.rand(8), torch.tensor([[4, 4], [4, 4]]), 4)
    with pytest.raises(RuntimeError, match="bounds must name at least one layer"):
        ops.topk_realloc(torch.rand(0), ops.realloc_bounds([], [], []), 0)
    with pytest.raises(ValueError, match="bounds must name at least one layer"):
        reference.topk_realloc(torch.rand(0), ops.realloc_bounds([], [], []), 0)
    with pytest.raises(ValueError, match=r"need one entry per layer, got lengths \{'sizes': 2, "
                                         r"'r_min': 1, 'r_max': 2\}"):
        ops.realloc_bounds([4, 4], [0], [4, 4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bounds_on_the_device_are_refused():
    # The table is read on the host; a CUDA copy would cost a sync per call, so it is an error.
    with pytest.raises(RuntimeError, match="bounds must be a CPU int64 tensor"):
        ops.topk_realloc(torch.rand(8, device="cuda"), ops.realloc_bounds([8], [0], [8]).cuda(), 4)


def test_opcheck(device):
    scores, sizes, r_min, r_max, budget = random_case(3)
    torch.library.opcheck(torch.ops.tsqlora_ext.topk_realloc.default,
                          (scores.to(device), ops.realloc_bounds(sizes, r_min, r_max), budget))


# ---- properties ------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@st.composite
def cases(draw):
    n_layers = draw(st.integers(1, 6))
    sizes = [draw(st.integers(0, 10)) for _ in range(n_layers)]
    r_min = [draw(st.integers(0, s)) for s in sizes]
    r_max = [draw(st.integers(lo, s + 2)) for lo, s in zip(r_min, sizes)]
    n = sum(sizes)
    scores = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.5]), min_size=n, max_size=n))
    budget = draw(st.integers(sum(r_min), sum(r_min) + n + 2))
    return torch.tensor(scores, dtype=torch.float32), sizes, r_min, r_max, budget


def per_layer(keep, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(int(keep[start:start + s].sum()))
        start += s
    return out


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(cases())
def test_budget_met_exactly_and_bounds_hold(case):
    scores, sizes, r_min, r_max, budget = case
    keep = ours(scores, sizes, r_min, r_max, budget)
    feasible = sum(min(h, s) for h, s in zip(r_max, sizes))
    assert int(keep.sum()) == min(budget, feasible)
    for k, lo, hi, s in zip(per_layer(keep, sizes), r_min, r_max, sizes):
        assert lo <= k <= min(hi, s)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(cases(), st.integers(0, 10**6), st.sampled_from([0.1, 1.0, 5.0]))
def test_raising_a_kept_score_never_removes_it(case, pick, raise_by):
    scores, sizes, r_min, r_max, budget = case
    keep = ours(scores, sizes, r_min, r_max, budget)
    kept = torch.nonzero(keep).flatten()
    hypothesis.assume(kept.numel() > 0)
    c = int(kept[pick % kept.numel()])
    raised = scores.clone()
    raised[c] += raise_by
    assert bool(ours(raised, sizes, r_min, r_max, budget)[c])


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(st.integers(2, 6), st.integers(2, 8), st.integers(0, 10**6))
def test_a_layer_can_grow_back(n_layers, size, seed):
    # Layer 0 starts unimportant and is cut to r_min; once its (inactive) components score higher
    # than the others, it regains rank at the same budget.
    g = torch.Generator().manual_seed(seed)
    sizes, r_min, r_max = [size] * n_layers, [0] * n_layers, [size] * n_layers
    budget = size
    scores = torch.rand(n_layers * size, generator=g) + 1.0
    scores[:size] = torch.rand(size, generator=g) * 0.5
    before = per_layer(ours(scores, sizes, r_min, r_max, budget), sizes)[0]
    scores[:size] += 10.0
    after = per_layer(ours(scores, sizes, r_min, r_max, budget), sizes)[0]
    assert before == 0 and after == size
