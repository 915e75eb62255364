"""RankAllocator: budget schedule, initial allocation, reallocation, checkpoints."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from tsqlora_ext import RankAllocator, ops
from tsqlora_ext.allocator import budget_schedule, orthogonality_penalty, proportional_ranks
from tsqlora_ext import layers as layers_module
from tsqlora_ext import reference
from tsqlora_ext.config import TsqLoRAConfig
from tsqlora_ext.layers import VarRankLoRALinear


class Tiny(nn.Module):
    def __init__(self, cfg: TsqLoRAConfig, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        dims = [(8, 16), (16, 16), (16, 12), (12, 4)]
        self.layers = nn.ModuleList(
            VarRankLoRALinear(nn.Linear(i, o), cfg.r_max, cfg.r_init, cfg.lora_alpha, init="adalora")
            for i, o in dims)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def data(n_batches, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g).to(device), torch.randn(16, 4, generator=g).to(device))
            for _ in range(n_batches)]


def train_step(model, opt, batch):
    x, y = batch
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    opt.step()


CFG = TsqLoRAConfig(r_init=4, target_r=2, r_min=1, r_max=6, t_init=2, t_final=3, delta_t=2,
                    total_steps=14)


def test_budget_schedule_hand_computed():
    # B_0 = 12, b_T = 6, span T - t_final - t_init = 9: b = 6 + 6 (1 - (t-2)/9)^3, rounded down
    want = {0: 12, 1: 12, 2: 12, 3: 10, 4: 8, 6: 7, 8: 6, 10: 6, 11: 6, 14: 6}
    for t, b in want.items():
        assert budget_schedule(t, 12, 6, 2, 3, 14) == b, t


def test_proportional_ranks():
    assert proportional_ranks([1, 2, 7], 10, 0, 10) == [1, 2, 7]
    assert proportional_ranks([1, 1, 1], 10, 0, 10) == [4, 3, 3]  # remainder tie -> lower index
    assert proportional_ranks([100, 1, 1], 12, 0, 6) == [6, 3, 3]  # clipped, rest re-shared
    assert proportional_ranks([0, 1, 1], 6, 1, 6) == [1, 3, 2]
    assert proportional_ranks([0, 0], 5, 0, 4) == [3, 2]          # all-zero: equal shares
    assert proportional_ranks([3, 1], 100, 0, 4) == [4, 4]        # total clamped to n * r_max
    with pytest.raises(ValueError, match="finite and >= 0"):
        proportional_ranks([1, float("nan")], 4, 0, 4)


def test_proportional_ranks_meet_the_budget_when_both_bounds_bind():
    # One dominant layer above r_max and three below r_min in the same round: pinning both sides
    # at once left 2 of the 16 unshared.
    assert proportional_ranks([1000, 1, 1, 1], 16, 2, 8) == [8, 3, 3, 2]
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 10)
        weights = [0.0 if rng.random() < 0.2 else 10 ** rng.uniform(-3, 3) for _ in range(n)]
        r_min = rng.randint(0, 4)
        r_max = rng.randint(max(r_min, 1), r_min + 12)
        total = rng.randint(0, n * r_max + 5)
        ranks = proportional_ranks(weights, total, r_min, r_max)
        case = (weights, total, r_min, r_max, ranks)
        assert sum(ranks) == min(max(total, n * r_min), n * r_max), case
        assert all(r_min <= r <= r_max for r in ranks), case
        # Each rank rounds the exact water-filling share clip(lam * w, r_min, r_max) whose sum is
        # the budget (lam by bisection; all-zero weights share equally, and zero weights share
        # what is left when every other layer is at r_max).
        w = weights if sum(weights) > 0 else [1.0] * n
        zeros = w.count(0.0)
        if (n - zeros) * r_max + zeros * r_min < sum(ranks):
            exact = [r_max if x else (sum(ranks) - (n - zeros) * r_max) / zeros for x in w]
        else:
            lo, hi = 0.0, 1e12
            for _ in range(200):
                lam = (lo + hi) / 2
                if sum(min(max(lam * x, r_min), r_max) for x in w) < sum(ranks):
                    lo = lam
                else:
                    hi = lam
            exact = [min(max(hi * x, r_min), r_max) for x in w]
        assert all(abs(r - e) < 1 + 1e-6 for r, e in zip(ranks, exact)), (*case, exact)


def test_schedule_is_followed_at_every_step(device):
    model = Tiny(CFG).to(device)
    alloc = RankAllocator(model, CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # 4 layers: B_0 = 16, b_T = 8; b = 8 + 8 (1 - (t-2)/9)^3 rounded down, at t % 2 == 0 after
    # t_init = 2, and once more at T - t_final = 11
    realloc_steps = {4: 11, 6: 9, 8: 8, 10: 8, 11: 8}
    prev = alloc.ranks()
    for t, batch in enumerate(data(CFG.total_steps, device=device), start=1):
        train_step(model, opt, batch)
        result = alloc.step()
        opt.zero_grad()
        ranks = alloc.ranks()
        if t in realloc_steps:
            assert result == ranks
            assert sum(ranks.values()) == realloc_steps[t]
            assert all(CFG.r_min <= r <= CFG.r_max for r in ranks.values())
        else:
            assert result is None and ranks == prev
        prev = ranks
    assert [h["step"] for h in alloc.history] == [0, *realloc_steps]
    assert [h["budget"] for h in alloc.history] == [16, *realloc_steps.values()]
    # the scores are updated up to T - t_final, then frozen
    assert alloc.counters.tolist() == [CFG.total_steps - CFG.t_final, 0]


def test_a_parameter_budget_is_followed_at_every_step(device):
    cfg = CFG.replace(budget_unit="params")
    model = Tiny(cfg).to(device)
    alloc = RankAllocator(model, cfg)
    costs = [i + o + 1 for i, o in [(8, 16), (16, 16), (16, 12), (12, 4)]]
    assert alloc.costs == costs and (alloc.b0, alloc.b_t) == (4 * 104, 2 * 104)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bounds = ops.realloc_bounds(alloc.sizes, [cfg.r_min] * 4, [cfg.r_max] * 4)
    cost = torch.tensor(costs).repeat_interleave(cfg.r_max)

    def chosen(k):
        return ops.topk_realloc(alloc.scores.cpu(), bounds, k)

    reallocs = 0
    for t, batch in enumerate(data(cfg.total_steps, device=device), start=1):
        train_step(model, opt, batch)
        ranks = alloc.step()
        opt.zero_grad()
        if ranks is None:
            continue
        reallocs += 1
        budget = budget_schedule(t, alloc.b0, alloc.b_t, cfg.t_init, cfg.t_final, cfg.total_steps)
        k = sum(ranks.values())
        # the k best components (the rank budget's choice for k) ...
        assert torch.equal(alloc.active_mask.cpu(), chosen(k))
        # ... whose parameters fit, where k + 1 of them would not
        spent = sum(r * c for r, c in zip(ranks.values(), costs))
        assert spent == int(cost[chosen(k)].sum()) <= budget
        assert int(cost[chosen(k + 1)].sum()) > budget
        assert alloc.history[-1] == {"step": t, "budget": budget, "ranks": ranks}
    assert reallocs == 5
    # the last budget is b_T: 208 parameters, where 2 components per layer would spend exactly that
    assert alloc.history[-1]["budget"] == 208


def test_calibration_shares_a_parameter_budget_by_layer_sensitivity():
    cfg = CFG.replace(budget_unit="params", calibration_batches=3, r_max=12)
    model = Tiny(cfg)
    alloc = RankAllocator(model, cfg)
    ranks = alloc.calibrate([x for x, _ in data(3)], model=model,
                            loss_fn=lambda out, batch: out.pow(2).mean())
    sens, costs = list(alloc.layer_sensitivity.values()), alloc.costs
    # layer l gets parameters in proportion to S_l: rank in proportion to S_l / cost_l
    weights = [s / c for s, c in zip(sens, costs)]
    total = round(alloc.b0 * sum(weights) / sum(sens))
    assert list(ranks.values()) == proportional_ranks(weights, total, cfg.r_min, cfg.r_max)
    spent = sum(r * c for r, c in zip(ranks.values(), costs))
    assert alloc.history[-1]["budget"] == spent
    assert abs(spent - alloc.b0) <= max(costs)
    # more sensitive per parameter -> more parameters
    order = sorted(range(4), key=lambda i: sens[i])
    params = [r * c for r, c in zip(ranks.values(), costs)]
    assert params[order[-1]] >= params[order[0]]


def test_topk_realloc_choice_grows_with_the_budget():
    # the parameter budget's search relies on it: the best k + 1 hold the best k
    g = torch.Generator().manual_seed(3)
    sizes, r_min, r_max = [5, 7, 3, 9], [1, 0, 2, 0], [4, 7, 3, 6]
    bounds = ops.realloc_bounds(sizes, r_min, r_max)
    for _ in range(5):
        scores = torch.randint(0, 6, (24,), generator=g).float()  # ties on purpose
        prev = ops.topk_realloc(scores, bounds, sum(r_min))
        for k in range(sum(r_min) + 1, sum(min(h, s) for h, s in zip(r_max, sizes)) + 2):
            keep = ops.topk_realloc(scores, bounds, k)
            assert bool((keep | ~prev).all()), k
            prev = keep


def test_active_mask_follows_the_layers(device):
    model = Tiny(CFG).to(device)
    alloc = RankAllocator(model, CFG.replace(t_init=0, delta_t=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in data(3, device=device):
        train_step(model, opt, batch)
        alloc.step()
        opt.zero_grad()
    for off, layer in zip(alloc.offsets, alloc.layers.values()):
        want = torch.zeros(layer.r_max, dtype=torch.bool, device=device)
        want[layer.active] = True
        assert torch.equal(alloc.active_mask[off:off + layer.r_max], want)


@pytest.mark.parametrize("how", ["load_state_dict", "set_active", "assignment", "buffer swap", "copy into"])
def test_an_active_set_changed_outside_the_allocator_is_followed(how, device):
    # The allocator read the active sets once: after a model checkpoint loaded later, the update
    # scored the now-inactive components, and allow_growth=False brought back pruned ones.
    cfg = CFG.replace(allow_growth=False)
    model = Tiny(cfg).to(device)
    with torch.no_grad():  # (E starts at 0, which gives every component a score of 0)
        for layer in model.layers:
            layer.lora_E.normal_()
    alloc = RankAllocator(model, cfg)
    first = model.layers[0]
    ids = torch.tensor([1, 4], device=device)
    if how == "copy into":  # as AveragedModel writes buffers: in place, so the same length
        ids = torch.tensor([0, 1, 4, 5], device=device)
        first.active.copy_(ids)
    elif how == "load_state_dict":
        donor = copy.deepcopy(model)
        donor.layers[0].set_active(ids)
        model.load_state_dict(donor.state_dict())
    elif how == "set_active":
        first.set_active(ids)
    elif how == "assignment":
        first.active = ids
    else:  # as torch.func.functional_call and accelerate's loaders do
        first._buffers["active"] = ids
    x, y = data(1, device=device)[0]
    (model(x) - y).pow(2).mean().backward()
    before = alloc.scores.clone()
    alloc.update_scores()
    inactive = first.inactive
    assert torch.equal(alloc.scores[inactive], before[inactive])
    assert (alloc.scores[ids] != before[ids]).all()
    alloc.reallocate(sum(alloc.ranks().values()) - 1)
    assert set(first.active.tolist()) <= set(ids.tolist())


def test_without_growth_layers_only_shrink():
    cfg = CFG.replace(allow_growth=False, t_init=0, delta_t=1, target_r=1, total_steps=10, t_final=0)
    model = Tiny(cfg)
    alloc = RankAllocator(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prev = {n: set(m.active.tolist()) for n, m in alloc.layers.items()}
    for batch in data(10):
        train_step(model, opt, batch)
        alloc.step()
        opt.zero_grad()
        now = {n: set(m.active.tolist()) for n, m in alloc.layers.items()}
        assert all(now[n] <= prev[n] for n in now)
        prev = now
    assert sum(alloc.ranks().values()) == 4


def test_without_growth_a_nan_score_does_not_revive_an_inactive_component():
    cfg = CFG.replace(allow_growth=False)
    alloc = RankAllocator(Tiny(cfg), cfg)
    first = next(iter(alloc.layers.values()))
    first.set_active(torch.tensor([2, 3, 4, 5]))
    alloc.scores.copy_(torch.rand(alloc.scores.shape))
    alloc.scores[3] = float("nan")  # an active component of the first layer
    alloc.reallocate(sum(alloc.ranks().values()))
    assert first.active.tolist() == [2, 3, 4, 5]


def test_dynamic_off_keeps_ranks():
    cfg = CFG.replace(dynamic=False)
    model = Tiny(cfg)
    alloc = RankAllocator(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = alloc.ranks()
    for batch in data(6):
        train_step(model, opt, batch)
        assert alloc.step() is None
        opt.zero_grad()
    assert alloc.ranks() == before and alloc.global_step == 6


def test_non_finite_step_is_skipped(device):
    model = Tiny(CFG).to(device)
    alloc = RankAllocator(model, CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_step(model, opt, data(1, device=device)[0])
    model.layers[1].lora_B.grad[0, 0] = float("inf")
    alloc.step()
    assert alloc.skipped_steps == 1 and alloc.counters.tolist() == [0, 1]
    # A caller that knows the step was bad (the training loop's gradient norm) skips it unread,
    # and the schedule still counts it as an optimizer step.
    before = [t.clone() for t in alloc.ipt_avg + alloc.unc_avg] + [alloc.scores.clone()]
    model.layers[1].lora_B.grad[0, 0] = 1.0
    alloc.step(grads_finite=False)
    assert alloc.counters.tolist() == [0, 2] and alloc.global_step == 2
    assert all(torch.equal(a, b) for a, b in zip(alloc.ipt_avg + alloc.unc_avg + [alloc.scores], before))
    alloc.step(grads_finite=True)
    assert alloc.counters.tolist() == [1, 2]


def test_a_reallocation_due_on_a_skipped_step_waits_for_the_next_good_one(device):
    # It ran on the stale scores of the skipped step: a run stopped after skipped steps then held
    # its last good step's parameters with other active sets.
    model = Tiny(CFG).to(device)
    alloc = RankAllocator(model, CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = data(CFG.total_steps, device=device)
    for t in range(1, 4):
        train_step(model, opt, batches[t - 1])
        alloc.step()
        opt.zero_grad()
    ranks = alloc.ranks()
    assert alloc.step(grads_finite=False) is None and alloc.ranks() == ranks  # step 4 was due
    resumed = RankAllocator(Tiny(CFG).to(device), CFG)
    resumed.load_state_dict(copy.deepcopy(alloc.state_dict()))
    train_step(model, opt, batches[4])
    got = alloc.step()  # step 5: not due, but the deferred one runs, at step 5's budget
    assert got == alloc.ranks() and sum(got.values()) == budget_schedule(5, 16, 8, 2, 3, 14) == 10
    assert alloc.history[-1]["step"] == 5 and not alloc.deferred
    assert resumed.deferred  # carried by the state
    # At the end of the budget phase (step 11) too: the final budget waits for a good step.
    for t in range(6, 11):
        train_step(model, opt, batches[t - 1])
        alloc.step()
        opt.zero_grad()
    assert alloc.step(grads_finite=False) is None
    assert alloc.step(grads_finite=False) is None  # step 12: frozen phase, still deferred
    assert sum(alloc.step(grads_finite=True).values()) == 8  # step 13: b_T
    assert alloc.step(grads_finite=False) is None  # step 14: frozen, and counted as skipped
    assert alloc.skipped_steps == 4  # steps 4, 11, 12 and 14


def test_a_due_step_whose_gradients_the_op_finds_non_finite_waits_too(device):
    # The Trainer callback does not know whether the gradients are finite (grads_finite=None):
    # the op found the NaN and skipped the update, but the reallocation due then still ran.
    model = Tiny(CFG).to(device)
    alloc = RankAllocator(model, CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = data(5, device=device)
    for t in range(1, 4):
        train_step(model, opt, batches[t - 1])
        alloc.step()
        opt.zero_grad()
    ranks = alloc.ranks()
    train_step(model, opt, batches[3])
    model.layers[1].lora_B.grad[0, 0] = float("nan")
    assert alloc.step() is None and alloc.ranks() == ranks and alloc.deferred  # step 4 was due
    assert alloc.skipped_steps == 1
    opt.zero_grad()
    train_step(model, opt, batches[4])
    assert alloc.step() is not None and alloc.history[-1]["step"] == 5 and not alloc.deferred


def test_calibration_shares_b0_by_layer_sensitivity(monkeypatch):
    cfg = CFG.replace(calibration_batches=3)
    model = Tiny(cfg)
    alloc = RankAllocator(model, cfg)
    batches = [x for x, _ in data(5)]

    def loss_fn(out, batch):
        return out.pow(2).mean()

    # A gradient the caller holds (a step under way) must come back as it was.
    held = torch.randn_like(model.layers[0].lora_A)
    model.layers[0].lora_A.grad = held.clone()
    ranks = alloc.calibrate(batches, model=model, loss_fn=loss_fn)
    assert torch.equal(model.layers[0].lora_A.grad, held)
    model.layers[0].lora_A.grad = None
    # explicit S_l: mean over the 3 batches of sum |W ⊙ dL/dW|, with W made trainable on a copy.
    # The native op refuses a trainable base weight by design, so the copy runs the reference math.
    monkeypatch.setattr(layers_module.ops, "varrank_lora", reference.varrank_lora)
    ref = copy.deepcopy(model)
    want = torch.zeros(4, dtype=torch.float64)
    for x in batches[:3]:
        ws = [layer.base_layer.weight.detach().requires_grad_(True) for layer in ref.layers]
        for layer, w in zip(ref.layers, ws):
            layer.base_layer.weight = nn.Parameter(w)
        loss_fn(ref(x), x).backward()
        for i, layer in enumerate(ref.layers):
            want[i] += (layer.base_layer.weight * layer.base_layer.weight.grad).abs().sum().double()
    want /= 3
    got = torch.tensor(list(alloc.layer_sensitivity.values()), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert list(ranks.values()) == proportional_ranks(want.tolist(), 16, cfg.r_min, cfg.r_max)
    assert sum(ranks.values()) == 16
    # calibration leaves no gradient behind, and the history's step-0 entry is the new allocation
    assert all(p.grad is None for p in model.parameters())
    assert alloc.history == [{"step": 0, "budget": 16, "ranks": ranks}]


def test_calibration_keeps_the_strongest_trained_components():
    # The initial allocation set every layer to components 0..r-1: a layer cut below r_init after
    # a warm-up lost the components it had trained, whatever they carried.
    from tsqlora_ext.allocator import _initial_components

    layer = VarRankLoRALinear(nn.Linear(8, 6), r_max=6, r_init=4, alpha=4.0, init="adalora")
    assert _initial_components(layer, 2).tolist() == [0, 1]  # untrained (E = 0): by id
    assert _initial_components(layer, 6).tolist() == [0, 1, 2, 3, 4, 5]
    layer.set_active([0, 2, 3, 5])
    with torch.no_grad():  # (unit rows of A and columns of B: the strength is |E|)
        layer.lora_A.fill_(8 ** -0.5)
        layer.lora_B.fill_(6 ** -0.5)
        layer.lora_E.copy_(torch.tensor([0.1, 9.0, -3.0, 0.2, 7.0, -5.0]))
    assert sorted(_initial_components(layer, 2).tolist()) == [2, 5]  # |E| 3 and 5 among the active
    assert sorted(_initial_components(layer, 5).tolist()) == [0, 1, 2, 3, 5]  # all kept, 1 added
    model = Tiny(CFG)
    with torch.no_grad():
        for m in model.layers:
            m.lora_E.copy_(torch.randn(m.r_max))
    strength = {n: (m.lora_E.abs() * m.lora_A.norm(dim=1) * m.lora_B.norm(dim=0)).detach()
                for n, m in zip(RankAllocator(model, CFG).names, model.layers)}
    alloc = RankAllocator(model, CFG)
    ranks = alloc.calibrate([x for x, _ in data(2)], model=model, loss_fn=lambda out, b: out.pow(2).mean())
    for name, m in alloc.layers.items():
        if ranks[name] < CFG.r_init:
            assert sorted(m.active.tolist()) == sorted(strength[name][:CFG.r_init].topk(ranks[name]).indices.tolist())


def test_calibration_off_gives_r_init():
    cfg = CFG.replace(sensitivity_init=False)
    model = Tiny(cfg)
    alloc = RankAllocator(model, cfg)
    assert set(alloc.calibrate([]).values()) == {cfg.r_init}


def test_state_dict_round_trip_resumes_exactly(device):
    cfg = CFG.replace(t_init=0, delta_t=1, total_steps=12, t_final=2)
    model = Tiny(cfg).to(device)
    alloc = RankAllocator(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = data(10, device=device)
    for batch in batches[:4]:
        train_step(model, opt, batch)
        alloc.step()
        opt.zero_grad()
    state = copy.deepcopy(alloc.state_dict())
    model2 = copy.deepcopy(model)
    for layer in model2.layers:
        layer.set_active(torch.arange(cfg.r_init))  # a fresh model's sets; load must restore them
    alloc2 = RankAllocator(model2, cfg)
    alloc2.load_state_dict(state)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    for batch in batches[4:]:
        for m, a, o in ((model, alloc, opt), (model2, alloc2, opt2)):
            train_step(m, o, batch)
            a.step()
            o.zero_grad()
        assert alloc.ranks() == alloc2.ranks()
    assert torch.equal(alloc.scores, alloc2.scores)
    assert all(torch.equal(a, b) for a, b in zip(alloc.ipt_avg, alloc2.ipt_avg))
    assert alloc.history == alloc2.history and alloc.global_step == alloc2.global_step == 10


def test_load_state_dict_rejects_another_model():
    alloc = RankAllocator(Tiny(CFG), CFG)
    state = alloc.state_dict()
    state["active"] = {"other": torch.arange(2)}
    with pytest.raises(ValueError, match="do not match this model"):
        alloc.load_state_dict(state)


def test_load_state_dict_checks_everything_before_changing_anything():
    # A rejected state must leave the allocator (and the model's active sets) as they were: the
    # EMAs were copied one tensor at a time before a bad shape was found, and a list one tensor
    # short was accepted (zip stopped early).
    cfg = CFG.replace(total_steps=20)
    model = Tiny(cfg)
    alloc = RankAllocator(model, cfg)
    donor = RankAllocator(copy.deepcopy(model), cfg)
    for t in donor.ipt_avg + donor.unc_avg:
        t.fill_(1.0)
    donor.layers[next(iter(donor.layers))].set_active([0])
    before = copy.deepcopy(alloc.state_dict())

    def tampered(edit):
        state = copy.deepcopy(donor.state_dict())
        edit(state)
        return state

    cases = [
        (lambda st: st["ipt_avg"].pop(), "ipt_avg holds"),
        (lambda st: st["unc_avg"].__setitem__(-1, st["unc_avg"][-1][:-1]), r"unc_avg\[.*\] has shape"),
        (lambda st: st.__setitem__("scores", st["scores"][:-1]), "scores has shape"),
        (lambda st: st["active"].__setitem__(alloc.names[-1], torch.tensor([0, 99])), "active ids"),
        (lambda st: st["schedule"].__setitem__("total_steps", 40),
         r"another rank schedule: total_steps 40 \(saved\) vs 20 \(now\)"),
        (lambda st: st["schedule"].__setitem__("b_t", 1), "b_t 1 .saved."),
        # a state from before budget_unit was saved counted rank: it loads into a rank allocator
        # (the untampered load below), and is refused by one that counts parameters (next test)
        (lambda st: st["schedule"].__setitem__("budget_unit", "params"),
         "budget_unit params .saved. vs rank .now."),
        # These three were refused only after the EMAs and scores had been overwritten.
        (lambda st: st.__setitem__("counters", torch.zeros(3, dtype=torch.long)), r"counters has shape \(3,\)"),
        (lambda st: st["active"].__setitem__(alloc.names[0], torch.ones(6, dtype=torch.bool)), "active ids"),
        (lambda st: st.pop("history"), r"lacks \['history'\]"),
        (lambda st: st["history"].append({"step": 3}), "malformed history"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            alloc.load_state_dict(tampered(edit))
        after = alloc.state_dict()
        for key in ("ipt_avg", "unc_avg"):
            assert all(torch.equal(a, b) for a, b in zip(after[key], before[key])), (message, key)
        assert all(torch.equal(after["active"][n], before["active"][n]) for n in alloc.names), message
    alloc.load_state_dict(donor.state_dict())  # the untampered state loads
    assert alloc.ranks() == donor.ranks()
    older = donor.state_dict()
    del older["schedule"]["budget_unit"]
    alloc.load_state_dict(older)


def test_a_rank_budget_state_is_refused_by_a_parameter_budget_allocator():
    state = RankAllocator(Tiny(CFG), CFG).state_dict()
    del state["schedule"]["budget_unit"]  # (as an older state: it counted rank all the same)
    params = RankAllocator(Tiny(CFG), CFG.replace(budget_unit="params"))
    with pytest.raises(ValueError, match="another rank schedule: .*budget_unit rank .saved. vs params"):
        params.load_state_dict(state)


def test_orthogonality_penalty_over_active_components():
    model = Tiny(CFG)
    model.layers[0].set_active([0, 2, 5])
    with torch.no_grad():  # inactive values never enter (inf * 0 would be NaN)
        model.layers[0].lora_A[1] = float("inf")
        model.layers[0].lora_B[:, 3] = float("nan")
    got = orthogonality_penalty(model.layers, 0.3)
    torch.testing.assert_close(got, explicit_orthogonality(model.layers, 0.3))
    got.backward()
    assert (model.layers[0].lora_A.grad[1] == 0).all()  # inactive component untouched
    assert model.layers[0].lora_A.grad[2].abs().sum() > 0


def explicit_orthogonality(layers, weight):
    total = torch.zeros(())
    for layer in layers:
        a, b = layer.lora_A[layer.active], layer.lora_B[:, layer.active]
        eye = torch.eye(len(layer.active))
        total = total + torch.linalg.norm(a @ a.T - eye) + torch.linalg.norm(b.T @ b - eye)
    return weight * total


def test_orthogonality_penalty_compiles_to_one_graph_for_every_rank():
    # Under torch.compile a layer's rank is unknown (its ids' length is unbacked): a branch on it
    # failed a fullgraph compile of the allocator's documented step, and so did autograd of an
    # r x r product of it.
    from torch._dynamo.testing import CompileCounterWithBackend
    model = Tiny(CFG)
    params = [p for layer in model.layers for p in (layer.lora_A, layer.lora_B)]
    counter = CompileCounterWithBackend("inductor")
    penalty = torch.compile(lambda: orthogonality_penalty(model.layers, 0.3), fullgraph=True,
                            backend=counter)
    for ids in ([0, 2, 5], [], [4], list(range(CFG.r_max))):
        model.layers[0].set_active(ids)
        model.layers[1].set_active(ids[:1])
        got, want = penalty(), explicit_orthogonality(model.layers, 0.3)
        torch.testing.assert_close(got, want)
        for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(g, w)
    assert counter.frame_count == 1


def test_step_without_total_steps_says_what_to_do():
    cfg = CFG.replace(total_steps=None)
    alloc = RankAllocator(Tiny(cfg), cfg)
    with pytest.raises(ValueError, match="set_total_steps"):
        alloc.step()
    alloc.set_total_steps(20)
    assert alloc.budget(1) == 16  # r_init * 4 layers until t_init


def test_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="no VarRankLoRALinear"):
        RankAllocator(nn.Linear(3, 3), CFG)


def test_allocator_built_before_the_model_moves_follows_it(device):
    model = Tiny(CFG)
    alloc = RankAllocator(model, CFG.replace(t_init=0, delta_t=1))
    model.to(device, torch.float64)  # another device (on CUDA runs) and dtype for the adapters
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in data(2, device=device):
        train_step(model, opt, tuple(t.double() for t in batch))
        assert alloc.step() is not None
        opt.zero_grad()
    assert alloc.scores.device.type == device and alloc.counters.tolist() == [2, 0]
    assert sum(alloc.ranks().values()) == alloc.history[-1]["budget"]



def test_update_scores_treats_a_missing_gradient_as_zero(device):
    # Layer 2 gets no gradient in one model (set to None) and an explicit zero one in its copy:
    # the allocator's cached zero stand-in must give exactly the same EMAs and scores, stay zero,
    # and be reused across steps.
    models = [Tiny(CFG).to(device), Tiny(CFG).to(device)]
    for m in models:  # E != 0, so that A and B get nonzero gradients too
        with torch.no_grad():
            for layer in m.layers:
                layer.lora_E.copy_(torch.linspace(0.5, 1.5, layer.r_max))
    allocs = [RankAllocator(m, CFG) for m in models]
    for batch in data(3, device=device):
        for m, explicit in zip(models, (False, True)):
            m.zero_grad(set_to_none=True)
            (m(batch[0]) - batch[1]).pow(2).mean().backward()
            for p in m.layers[2].parameters():
                p.grad = torch.zeros_like(p) if explicit and p.requires_grad else None
        for a in allocs:
            a.update_scores()
    zeros = allocs[0]._zeros
    assert len(zeros) == 3 and all(not z.any() for z in zeros.values())
    for a, b in zip(allocs[0].ipt_avg + allocs[0].unc_avg + [allocs[0].scores],
                    allocs[1].ipt_avg + allocs[1].unc_avg + [allocs[1].scores]):
        assert torch.equal(a, b)
    assert allocs[0].ipt_avg[0].abs().sum() > 0  # the other layers did update
