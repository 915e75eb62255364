"""sensitivity_update and layer_sensitivity against their references, PEFT, and opcheck."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import tsqlora_ext  # noqa: F401  (loads the ops)
from tsqlora_ext import ops, reference

# (r, in, out) per layer. (8, 300, 600) spans several B tiles on both backends (CPU: 2048 rows
# each at r 8, CUDA: 512); r 300 is above the CUDA block size (a thread's column moves as it
# strides) and its A rows are short; (4, 8, 2000) has many B tiles of a narrow layer; (6, 70, 37)
# leaves a remainder after the CPU's whole blocks of summing lanes (64 per A row, 96 per B tile).
SHAPES = [(6, 5, 7), (4, 33, 3), (8, 300, 2600), (300, 4, 20), (4, 8, 2000), (6, 70, 37)]


def make_state(device, dtype=torch.float32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    A = [rnd(r, i) for r, i, _ in shapes]
    E = [rnd(r) for r, _, _ in shapes]
    B = [rnd(o, r) for r, _, o in shapes]
    n_state = [r * i + r + o * r for r, i, o in shapes]
    ipt = [torch.rand(n, generator=g).to(device) for n in n_state]
    unc = [torch.rand(n, generator=g).to(device) for n in n_state]
    n_comp = sum(r for r, _, _ in shapes)
    mask = (torch.rand(n_comp, generator=g) < 0.6).to(device)
    scores = torch.rand(n_comp, generator=g).to(device)
    counters = torch.zeros(2, dtype=torch.long, device=device)
    return A, E, B, ipt, unc, mask, scores, counters


def grads_like(A, E, B, seed):
    g = torch.Generator().manual_seed(seed)

    def like(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)

    return [like(a) for a in A], [like(e) for e in E], [like(b) for b in B]


def per_component(state, r, n_in, n_out):
    """A layer's state buffer (the elements of A [r, in], E [r], B [out, r] in that order) as one
    row per component: its row of A, its E and its column of B."""
    a, e, b = state.split([r * n_in, r, n_out * r])
    return torch.cat([a.view(r, n_in), e.view(r, 1), b.view(n_out, r).t()], dim=1)


def clone_all(xs):
    return [x.clone() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_update_matches_reference_over_steps(device, dtype):
    A, E, B, ipt, unc, mask, scores, counters = make_state(device, dtype)
    r_ipt, r_unc, r_scores, r_counters = clone_all(ipt), clone_all(unc), scores.clone(), counters.clone()
    for step in range(3):
        gA, gE, gB = grads_like(A, E, B, seed=100 + step)
        reference.sensitivity_update(A, E, B, gA, gE, gB, r_ipt, r_unc, mask, r_scores, r_counters,
                                     0.85, 0.7)
        ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.7)
    for got, want in zip(ipt + unc, r_ipt + r_unc):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, r_scores, rtol=1e-4, atol=1e-6)
    assert counters.tolist() == [3, 0]


def test_update_gives_the_same_bits_on_every_run(device):
    # Every sum has a fixed order (no float atomics on CUDA), so reallocation ties cannot flip
    # between runs of the same training.
    shapes = SHAPES + [(12, 64, 5632)]
    results = []
    for _ in range(2):
        A, E, B, ipt, unc, mask, scores, counters = make_state(device, shapes=shapes)
        gA, gE, gB = grads_like(A, E, B, seed=4)
        ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85)
        results.append([scores] + ipt + unc)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_update_leaves_inactive_components_alone(device):
    A, E, B, ipt, unc, mask, scores, counters = make_state(device)
    before = clone_all(ipt) + clone_all(unc)
    before_scores = scores.clone()
    gA, gE, gB = grads_like(A, E, B, seed=5)
    ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85)
    assert torch.equal(scores[~mask], before_scores[~mask])
    assert not torch.equal(scores[mask], before_scores[mask])
    # In every layer, an inactive component's row of A, its E and its column of B keep the bits
    # of both EMAs; an active one's all change.
    offset = 0
    for l, (r, n_in, n_out) in enumerate(SHAPES):
        active = mask[offset:offset + r]
        offset += r
        for now, was in ((ipt[l], before[l]), (unc[l], before[len(SHAPES) + l])):
            now, was = per_component(now, r, n_in, n_out), per_component(was, r, n_in, n_out)
            assert torch.equal(now[~active], was[~active])
            assert (now[active] != was[active]).all()

@pytest.mark.parametrize("where", ["A", "E", "B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_step_is_skipped_and_counted(device, where, bad):
    A, E, B, ipt, unc, mask, scores, counters = make_state(device)
    mask[:] = True
    before = clone_all(ipt) + clone_all(unc) + [scores.clone()]
    gA, gE, gB = grads_like(A, E, B, seed=9)
    target = {"A": gA[2], "E": gE[2], "B": gB[2]}[where]
    target.view(-1)[3] = bad
    ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85)
    assert counters.tolist() == [0, 1]
    for got, want in zip(clone_all(ipt) + clone_all(unc) + [scores], before):
        assert torch.equal(got, want)
    # the next finite step is applied again
    gA, gE, gB = grads_like(A, E, B, seed=10)
    ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85)
    assert counters.tolist() == [1, 1]


def test_float64_gradient_beyond_float32_range_counts_as_inf(device):
    # The update computes in float32, where 1e39 is inf: the op (both backends) and the reference
    # skip the step alike.
    A, E, B, ipt, unc, mask, scores, counters = make_state(device, torch.float64)
    mask[:] = True
    gA, gE, gB = grads_like(A, E, B, seed=11)
    gB[0].view(-1)[2] = 1e39
    r_ipt, r_unc, r_scores, r_counters = clone_all(ipt), clone_all(unc), scores.clone(), counters.clone()
    before = clone_all(ipt)
    reference.sensitivity_update(A, E, B, gA, gE, gB, r_ipt, r_unc, mask, r_scores, r_counters,
                                 0.85, 0.85)
    ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85)
    assert counters.tolist() == r_counters.tolist() == [0, 1]
    for got, want, old in zip(ipt, r_ipt, before):
        assert torch.equal(got, old) and torch.equal(want, old)


def test_caller_vouching_for_finite_gradients_gets_the_same_update(device):
    """check_finite=False (the training loop already knows the global gradient norm is finite)
    skips the op's scan and nothing else: the same EMAs and scores as the checked update."""
    A, E, B, ipt, unc, mask, scores, counters = make_state(device)
    u_ipt, u_unc, u_scores, u_counters = clone_all(ipt), clone_all(unc), scores.clone(), counters.clone()
    r_ipt, r_unc, r_scores, r_counters = clone_all(ipt), clone_all(unc), scores.clone(), counters.clone()
    for step in range(2):
        gA, gE, gB = grads_like(A, E, B, seed=40 + step)
        ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.7)
        ops.sensitivity_update(A, E, B, gA, gE, gB, u_ipt, u_unc, mask, u_scores, u_counters, 0.85,
                               0.7, check_finite=False)
        reference.sensitivity_update(A, E, B, gA, gE, gB, r_ipt, r_unc, mask, r_scores, r_counters,
                                     0.85, 0.7, check_finite=False)
    for got, want in zip(u_ipt + u_unc + [u_scores], ipt + unc + [scores]):
        assert torch.equal(got, want)
    torch.testing.assert_close(u_scores, r_scores, rtol=1e-4, atol=1e-6)
    assert u_counters.tolist() == r_counters.tolist() == [2, 0]


@pytest.mark.parametrize("check_finite", [True, False])
def test_nan_in_an_inactive_component_is_not_read(device, check_finite):
    A, E, B, ipt, unc, mask, scores, counters = make_state(device)
    mask[0] = False  # component 0 of layer 0
    offset_of_layer_2 = SHAPES[0][0] + SHAPES[1][0]
    mask[offset_of_layer_2 + 3] = False  # a column of B in the middle of a wide layer's rows
    gA, gE, gB = grads_like(A, E, B, seed=11)
    gA[0][0, 0] = float("nan")
    gB[0][4, 0] = float("inf")
    gB[2][1500, 3] = float("nan")
    ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85,
                           check_finite=check_finite)
    assert counters.tolist() == [1, 0]
    assert all(torch.isfinite(t).all() for t in ipt + unc + [scores])


def test_a_mask_byte_other_than_one_is_active_in_the_check_too(device):
    # A bool tensor viewed from uint8 can hold 2: torch reads it as True, and the update applied
    # that component while the finite check, reading one bit, missed a NaN in its B column.
    A, E, B, ipt, unc, mask, scores, counters = make_state(device)
    raw = mask.to(torch.uint8)
    raw[0] = 2
    mask = raw.view(torch.bool)
    before = clone_all(ipt) + clone_all(unc)
    gA, gE, gB = grads_like(A, E, B, seed=12)
    gB[0][2, 0] = float("nan")
    ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85)
    assert counters.tolist() == [0, 1]
    assert all(torch.equal(a, b) for a, b in zip(ipt + unc, before))


def test_ema_weights_are_rounded_as_the_reference_rounds_them(device):
    # 1 - beta rounded from double, as the reference (and PEFT) weigh the new value; 1.f -
    # float(beta) is an ulp off, which beta2 = 0 (Ubar = |I - Ibar|, a cancellation) turned into a
    # nonzero Ubar where the reference gives 0. Ibar starts at I, so every cancellation is exact.
    n = 512
    g = torch.Generator().manual_seed(6)
    A, E, B = (torch.randn(n, 1, generator=g).to(device), torch.randn(n, generator=g).to(device),
               torch.randn(1, n, generator=g).to(device))
    gA, gE, gB = (torch.randn(t.shape, generator=g).to(device) for t in (A, E, B))
    I = torch.cat([(A * gA).flatten(), E * gE, (B * gB).flatten()]).abs()
    states = []
    for update in (ops.sensitivity_update, reference.sensitivity_update):
        ipt, unc = [I.clone()], [torch.zeros(3 * n, device=device)]
        update([A], [E], [B], [gA], [gE], [gB], ipt, unc, torch.ones(n, dtype=torch.bool, device=device),
               torch.zeros(n, device=device), torch.zeros(2, dtype=torch.long, device=device), 0.85, 0.0)
        states.append((ipt[0], unc[0]))
    (ipt_op, unc_op), (ipt_ref, unc_ref) = states
    assert torch.equal(ipt_op, ipt_ref) and torch.equal(unc_op, unc_ref)


def test_update_rejects_bad_input():
    A, E, B, ipt, unc, mask, scores, counters = make_state("cpu")
    gA, gE, gB = grads_like(A, E, B, seed=1)
    with pytest.raises(RuntimeError, match=r"ipt_avg\[1\] must be a contiguous float32"):
        ops.sensitivity_update(A, E, B, gA, gE, gB, [ipt[0], ipt[1][:-1], *ipt[2:]], unc, mask,
                               scores, counters, 0.85, 0.85)
    with pytest.raises(RuntimeError, match=r"grad_B\[0\] has shape"):
        ops.sensitivity_update(A, E, B, gA, gE, [gB[0].t().contiguous()] + gB[1:], ipt, unc, mask,
                               scores, counters, 0.85, 0.85)
    with pytest.raises(RuntimeError, match="active_mask must be a contiguous bool"):
        ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask[:-1], scores, counters, 0.85, 0.85)
    with pytest.raises(RuntimeError, match="beta1 and beta2 must lie in"):
        ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 1.0, 0.85)
    with pytest.raises(RuntimeError, match=r"lora_E\[0\] must be a contiguous .* got non-contiguous"):
        E_strided = [torch.randn(2 * E[0].numel())[::2]] + E[1:]
        ops.sensitivity_update(A, E_strided, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85)
    with pytest.raises(RuntimeError, match="lora_A must be float32, float64, bfloat16 or float16"):
        f8 = [[t.to(torch.float8_e4m3fn) for t in ts] for ts in (A, E, B, gA, gE, gB)]
        ops.sensitivity_update(*f8, ipt, unc, mask, scores, counters, 0.85, 0.85)


def test_update_opcheck(device):
    A, E, B, ipt, unc, mask, scores, counters = make_state(device, shapes=SHAPES[:2])
    gA, gE, gB = grads_like(A, E, B, seed=3)
    for check_finite in (True, False):
        torch.library.opcheck(torch.ops.tsqlora_ext.sensitivity_update.default,
                              (A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85,
                               check_finite))


# ---- against PEFT's own RankAllocator ------------------------------------------------------------
class _PeftLike(nn.Module):
    """Parameters named as PEFT AdaLoRA names them (lora_A.default, lora_E.default [r, 1], ...)."""

    def __init__(self, A, E, B):
        super().__init__()
        self.blocks = nn.ModuleList()
        for a, e, b in zip(A, E, B):
            m = nn.Module()
            m.lora_A = nn.ParameterDict({"default": nn.Parameter(a.clone())})
            m.lora_E = nn.ParameterDict({"default": nn.Parameter(e.clone().view(-1, 1))})
            m.lora_B = nn.ParameterDict({"default": nn.Parameter(b.clone())})
            self.blocks.append(m)


def test_update_matches_peft_rank_allocator(device):
    layer_mod = pytest.importorskip("peft.tuners.adalora.layer")
    A, E, B, _, _, _, _, _ = make_state(device)
    model = _PeftLike(A, E, B).to(device)
    cfg = types.SimpleNamespace(beta1=0.85, beta2=0.85, target_r=2, tinit=0, tfinal=0, deltaT=1,
                                total_step=10)
    peft_alloc = layer_mod.RankAllocator(model, cfg, "default")
    n_comp = sum(a.shape[0] for a in A)
    ipt = [torch.zeros(a.numel() + e.numel() + b.numel(), device=device) for a, e, b in zip(A, E, B)]
    unc = [torch.zeros_like(t) for t in ipt]
    mask = torch.ones(n_comp, dtype=torch.bool, device=device)
    scores = torch.zeros(n_comp, device=device)
    counters = torch.zeros(2, dtype=torch.long, device=device)
    for step in range(4):
        gA, gE, gB = grads_like(A, E, B, seed=200 + step)
        for blk, ga, ge, gb in zip(model.blocks, gA, gE, gB):
            blk.lora_A["default"].grad = ga.clone()
            blk.lora_E["default"].grad = ge.clone().view(-1, 1)
            blk.lora_B["default"].grad = gb.clone()
        peft_alloc.update_ipt(model)
        ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask, scores, counters, 0.85, 0.85)
    want_scores = []
    for i, (a, e, b) in enumerate(zip(A, E, B)):
        name = f"blocks.{i}.%s.default"
        for state, peft_state in ((ipt[i], peft_alloc.exp_avg_ipt), (unc[i], peft_alloc.exp_avg_unc)):
            want = torch.cat([peft_state[name % p].flatten() for p in ("lora_A", "lora_E", "lora_B")])
            torch.testing.assert_close(state, want, rtol=1e-5, atol=1e-7)
        s_a = peft_alloc._element_score(name % "lora_A").mean(dim=1, keepdim=True)
        s_b = peft_alloc._element_score(name % "lora_B").mean(dim=0).view(-1, 1)
        want_scores.append(peft_alloc._combine_ipt(peft_alloc._element_score(name % "lora_E"),
                                                   torch.cat([s_a, s_b], dim=1)))
    torch.testing.assert_close(scores, torch.cat(want_scores), rtol=1e-5, atol=1e-8)
    # PEFT's mask_to_budget keeps the components above its k-th smallest score: the same set as
    # our reallocator with no per-layer bounds (scores are distinct here).
    budget = n_comp // 2
    pattern = peft_alloc.mask_to_budget(model, budget)
    peft_keep = torch.tensor(sum((pattern[f"blocks.{i}.lora_E.default"] for i in range(len(A))), []))
    sizes = [a.shape[0] for a in A]
    keep = ops.topk_realloc(scores, ops.realloc_bounds(sizes, [0] * len(A), sizes), budget)
    assert torch.equal(keep.cpu(), peft_keep)


# ---- layer sensitivity ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3), (40,), (3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_sensitivity_matches_explicit(device, shape, dtype):
    g = torch.Generator().manual_seed(7)
    out, n_in = 300, 200  # 60k elements: more than one CPU tile
    W = torch.randn(out, n_in, generator=g, dtype=dtype).to(device)
    x = torch.randn(*shape, n_in, generator=g, dtype=dtype).to(device)
    d = torch.randn(*shape, out, generator=g, dtype=dtype).to(device)
    got = ops.layer_sensitivity(W, x, d)
    # explicit: the gradient of sum(d * (x W^T)) w.r.t. W is dᵀx
    Wg = W.detach().clone().requires_grad_(True)
    (d * torch.nn.functional.linear(x, Wg)).sum().backward()
    explicit = (W * Wg.grad).abs().sum()
    assert got.shape == () and got.dtype == dtype
    torch.testing.assert_close(got, explicit, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
    torch.testing.assert_close(got, reference.layer_sensitivity(W, x, d),
                               rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)


def test_layer_sensitivity_past_the_float32_range_is_inf_as_the_reference():
    w, x, d = torch.full((64, 64), 1e35), torch.ones(4, 64), torch.ones(4, 64)
    assert torch.isinf(ops.layer_sensitivity(w, x, d)) and torch.isinf(reference.layer_sensitivity(w, x, d))


def test_a_meta_input_among_cpu_ones_is_refused():
    # The call went to the fake kernel: a garbage scalar, or an update that did nothing.
    w, x, d = torch.randn(6, 5), torch.randn(3, 5), torch.randn(3, 6)
    with pytest.raises(RuntimeError, match="layer_sensitivity: grad_out is on meta but weight is on cpu"):
        ops.layer_sensitivity(w, x, d.to("meta"))
    A, E, B, ipt, unc, mask, scores, counters = make_state("cpu")
    gA, gE, gB = grads_like(A, E, B, seed=1)
    with pytest.raises(RuntimeError, match="sensitivity_update: lora_A is on cpu but active_mask is on meta"):
        ops.sensitivity_update(A, E, B, gA, gE, gB, ipt, unc, mask.to("meta"), scores, counters, 0.85, 0.85)


def test_layer_sensitivity_gives_the_same_bits_on_every_run(device):
    g = torch.Generator().manual_seed(12)
    W = torch.randn(700, 300, generator=g).to(device)
    x = torch.randn(64, 300, generator=g).to(device)
    d = torch.randn(64, 700, generator=g).to(device)
    assert torch.equal(ops.layer_sensitivity(W, x, d), ops.layer_sensitivity(W, x, d))


def test_layer_sensitivity_half_inputs_compute_in_float(device):
    g = torch.Generator().manual_seed(8)
    W = torch.randn(64, 48, generator=g).to(device, torch.bfloat16)
    x = torch.randn(10, 48, generator=g).to(device, torch.bfloat16)
    d = torch.randn(10, 64, generator=g).to(device, torch.bfloat16)
    got = ops.layer_sensitivity(W, x, d)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference.layer_sensitivity(W, x, d), rtol=1e-5, atol=0)


def test_layer_sensitivity_ignores_an_enclosing_autocast_region(device):
    # Inside autocast the op's own GEMM would come back in bf16; it computes in float32 regardless.
    g = torch.Generator().manual_seed(10)
    W = torch.randn(40, 30, generator=g).to(device)
    x = torch.randn(2, 6, 30, generator=g).to(device)
    d = torch.randn(2, 6, 40, generator=g).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = ops.layer_sensitivity(W, x, d)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference.layer_sensitivity(W, x, d), rtol=1e-5, atol=0)


def test_layer_sensitivity_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match=r"weight must be a non-empty \[out, in\] matrix, got \[3, 0\]"):
        ops.layer_sensitivity(torch.randn(3, 0), torch.randn(2, 0), torch.randn(2, 3))
    W = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match=r"x must be \[\.\.\., in=4\]"):
        ops.layer_sensitivity(W, torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="same leading dimensions"):
        ops.layer_sensitivity(W, torch.randn(3, 4), torch.randn(2, 6))
    # as many rows, laid out differently: rows of different tokens would be paired
    with pytest.raises(RuntimeError, match="same leading dimensions"):
        ops.layer_sensitivity(W, torch.randn(2, 6, 4), torch.randn(3, 4, 6))
    with pytest.raises(RuntimeError, match="same leading dimensions"):
        ops.layer_sensitivity(W, torch.randn(12, 4), torch.randn(3, 4, 6))
    with pytest.raises(RuntimeError, match="same leading dimensions"):  # the fake kernel too
        with torch._subclasses.fake_tensor.FakeTensorMode():
            ops.layer_sensitivity(torch.empty(6, 4), torch.empty(2, 6, 4), torch.empty(3, 4, 6))


def test_layer_sensitivity_opcheck(device):
    g = torch.Generator().manual_seed(9)
    W = torch.randn(12, 10, generator=g).to(device)
    x = torch.randn(2, 5, 10, generator=g).to(device)
    d = torch.randn(2, 5, 12, generator=g).to(device)
    torch.library.opcheck(torch.ops.tsqlora_ext.layer_sensitivity.default, (W, x, d))
