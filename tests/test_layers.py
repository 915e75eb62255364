"""VarRankLoRALinear: the layer API, merge/unmerge, dropout, torch.compile, and AdamW across
active-set changes (protect_inactive)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from tsqlora_ext import reference
from tsqlora_ext.layers import VarRankLoRALinear, protect_inactive


def make_layer(device, n_in=24, n_out=20, r_max=8, r_init=4, dropout=0.0, init="adalora", seed=0,
               dtype=torch.float32):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out).to(device=device, dtype=dtype)
    # init="adalora" has E, A, B all random, so the adapter term is not zero from the start.
    layer = VarRankLoRALinear(base, r_max=r_max, r_init=r_init, alpha=8.0, dropout=dropout, init=init)
    with torch.no_grad():
        layer.lora_E.normal_()
    return layer


def ref_forward(layer, x, x_lora=None):
    return reference.varrank_lora(x, x_lora, layer.base_layer.weight, layer.base_layer.bias,
                                  layer.lora_A, layer.lora_E, layer.lora_B, layer.active, layer.scaling)


def test_layer_forward_matches_reference_and_rank_is_runtime(device):
    layer = make_layer(device)
    x = torch.randn(3, 5, 24, device=device)
    params = [id(p) for p in layer.parameters()]
    for ids in ([0, 1, 2, 3], [7, 1, 4], [], list(range(8))):
        layer.set_active(ids)
        assert layer.rank == len(ids)
        assert layer.active_indices().tolist() == sorted(ids)
        torch.testing.assert_close(layer(x), ref_forward(layer, x))
    assert [id(p) for p in layer.parameters()] == params  # never re-created
    layer.set_active([])
    assert torch.equal(layer(x), layer.base_layer(x))


def test_scaling_is_alpha_over_r_init():
    layer = make_layer("cpu", r_init=4)
    assert layer.scaling == 8.0 / 4
    layer.set_active(range(8))
    assert layer.scaling == 8.0 / 4  # moving rank does not rescale the layer


def test_lora_init_starts_at_the_base_output():
    torch.manual_seed(0)
    layer = VarRankLoRALinear(nn.Linear(16, 12), r_max=6, r_init=3, alpha=6.0)
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert not layer.base_layer.weight.requires_grad


def test_set_active_rejects_bad_ids():
    layer = make_layer("cpu", r_max=8)
    with pytest.raises(ValueError, match=r"\[0, r_max=8\).*\[8\]"):
        layer.set_active([0, 8])
    with pytest.raises(ValueError, match=r"\[-1\]"):
        layer.set_active([-1, 2])
    with pytest.raises(TypeError, match="integers"):
        layer.set_active(torch.tensor([0.0, 1.5]))
    assert layer.active_indices().tolist() == [0, 1, 2, 3]  # unchanged after the errors
    layer.set_active([5, 2, 5])
    assert layer.active_indices().tolist() == [2, 5]
    assert layer.inactive.tolist() == [0, 1, 3, 4, 6, 7]


def test_set_active_under_inference_mode_then_train():
    # An evaluation pass under torch.inference_mode() that prunes must not leave inference-tensor
    # buffers, which the next training step cannot use.
    layer = make_layer("cpu")
    x = torch.randn(3, 24)
    with torch.inference_mode():
        layer(x)
        layer.set_active(torch.tensor([0, 2, 5]))
    assert not layer.active.is_inference() and not layer.inactive.is_inference()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.1)
    protect_inactive(opt, layer)
    layer(x).square().sum().backward()
    opt.step()
    assert layer.active_indices().tolist() == [0, 2, 5]


def test_merge_unmerge(device):
    layer = make_layer(device)
    layer.set_active([1, 3, 6])
    x = torch.randn(7, 24, device=device)
    w0 = layer.base_layer.weight.clone()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight())
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_active([0])
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y)


def test_dropout_applies_to_the_adapter_input_only(device):
    layer = make_layer(device, dropout=0.5)
    x = torch.randn(6, 24, device=device, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_lora = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, ref_forward(layer, x, x_lora))
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    (dx_ref,) = torch.autograd.grad(ref_forward(layer, x, x_lora), x, g)
    torch.testing.assert_close(dx, dx_ref)
    layer.eval()
    torch.testing.assert_close(layer(x), ref_forward(layer, x))


def test_bfloat16_layer(device):
    layer = make_layer(device, dtype=torch.bfloat16)
    x = torch.randn(4, 9, 24, device=device, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref_forward(layer, x).float(), rtol=3e-2, atol=3e-2)


def test_state_dict_roundtrip_with_another_rank():
    a = make_layer("cpu", seed=0)
    a.set_active([0, 5, 6])
    b = make_layer("cpu", seed=1)  # rank 4: another length than the saved active set
    b.load_state_dict(a.state_dict())
    assert b.active_indices().tolist() == [0, 5, 6]
    assert b.inactive.tolist() == [1, 2, 3, 4, 7]
    x = torch.randn(3, 24)
    torch.testing.assert_close(b(x), a(x))
    # The ids are saved and required like a buffer's (they are not one: see the compile test).
    without_ids = {k: v for k, v in a.state_dict().items() if k != "active"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "active"'):
        b.load_state_dict(without_ids)
    b.load_state_dict(without_ids, strict=False)
    assert b.active_indices().tolist() == [0, 5, 6]


def test_ids_written_or_swapped_into_the_buffer_are_the_ones_computed_with():
    # The ids are a buffer, which tools write in place (AveragedModel copies buffers()), swap
    # (torch.func.functional_call; accelerate's loaders write _buffers directly) or assign.
    # Compiled code reads an alias of it that writes and assignments keep current.
    src = make_layer("cpu", seed=0)
    dst = copy.deepcopy(src)
    compiled = torch.compile(dst, backend="eager", fullgraph=True)
    x = torch.randn(3, 24)

    def with_ids(ids):
        return reference.varrank_lora(x, None, dst.base_layer.weight, dst.base_layer.bias,
                                      dst.lora_A, dst.lora_E, dst.lora_B, torch.tensor(ids),
                                      dst.scaling)

    src.set_active([0, 1, 2, 5])
    for b_dst, b_src in zip(dst.buffers(), src.buffers()):
        b_dst.detach().copy_(b_src)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    torch.testing.assert_close(compiled(x), src(x), rtol=0, atol=0)
    torch.testing.assert_close(torch.func.functional_call(dst, {"active": torch.tensor([1, 5])}, (x,)),
                               with_ids([1, 5]))
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)  # (restored after the call)
    dst._buffers["active"] = torch.tensor([2, 4, 6])
    torch.testing.assert_close(dst(x), with_ids([2, 4, 6]))
    dst.active = torch.tensor([0, 7])
    torch.testing.assert_close(compiled(x), with_ids([0, 7]))


def test_a_placeholder_for_a_missing_merged_flag_is_not_a_merge():
    # torch.distributed.checkpoint (and accelerate's load_checkpoint_in_model through it) passes
    # a placeholder object to set_extra_state for a state dict without the flag; its truth is
    # True, so the layer called itself merged and returned the base output alone.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    src = make_layer("cpu", seed=0)
    older = {k: v for k, v in src.state_dict().items() if k != "_extra_state"}
    dst = make_layer("cpu", seed=1)
    set_model_state_dict(dst, older, options=StateDictOptions(full_state_dict=True))
    x = torch.randn(3, 24)
    assert not dst.merged
    torch.testing.assert_close(dst(x), src(x))


def test_assign_load_adopts_the_saved_active_set_and_its_device():
    # A layer built on the meta device (how large models are instantiated) and filled with
    # load_state_dict(assign=True) kept its id buffers on meta: NaN outputs, no error.
    a = make_layer("cpu", seed=0)
    a.set_active([1, 4, 6])
    with torch.device("meta"):
        b = VarRankLoRALinear(nn.Linear(24, 20), r_max=8, r_init=4, alpha=8.0)
    b.load_state_dict(a.state_dict(), assign=True)
    assert b.active.device.type == b.inactive.device.type == "cpu"
    assert b.active_indices().tolist() == [1, 4, 6] and b.inactive.tolist() == [0, 2, 3, 5, 7]
    x = torch.randn(3, 24)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_merged_state_dict_loads_as_merged():
    # A merged layer's base weight holds ΔW; its state must say so, or loading it into an unmerged
    # layer adds ΔW a second time.
    x = torch.randn(3, 24)
    a = make_layer("cpu", seed=0)
    a.set_active([1, 3, 6])
    y = a(x)
    a.merge()
    merged_state = a.state_dict()
    b = make_layer("cpu", seed=1)
    b.load_state_dict(merged_state)
    assert b.merged and b.active_indices().tolist() == [1, 3, 6]
    torch.testing.assert_close(b(x), y, rtol=1e-5, atol=1e-5)
    b.unmerge()
    torch.testing.assert_close(b(x), y, rtol=1e-5, atol=1e-5)

    # Into a merged layer, here its own state (whose tensors are its own Parameters).
    a.load_state_dict(merged_state)
    assert a.merged
    torch.testing.assert_close(a(x), y, rtol=1e-5, atol=1e-5)
    c = make_layer("cpu", seed=2)
    c.merge()
    c.load_state_dict(b.state_dict())  # b is unmerged now
    assert not c.merged
    torch.testing.assert_close(c(x), y, rtol=1e-5, atol=1e-5)

    # Without the base weight, a merged state adds ΔW to the layer's own base weight.
    adapter_only = {k: v for k, v in merged_state.items() if not k.startswith("base_layer.")}
    d = make_layer("cpu", seed=0)
    with torch.no_grad():
        d.lora_A.normal_()
    d.merge()
    d.load_state_dict(adapter_only, strict=False)
    assert d.merged
    torch.testing.assert_close(d(x), y, rtol=1e-5, atol=1e-5)

    # A state dict from before the flag was saved is of an unmerged layer and loads strictly.
    old = {k: v for k, v in b.state_dict().items() if k != "_extra_state"}
    e = make_layer("cpu", seed=3)
    e.merge()
    e.load_state_dict(old)
    assert not e.merged
    torch.testing.assert_close(e(x), y, rtol=1e-5, atol=1e-5)


def test_state_dict_of_another_r_max_named():
    a = make_layer("cpu", r_max=16)
    a.set_active([0, 9, 12])
    b = make_layer("cpu", r_max=8)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"active was saved from a layer with r_max=16, but "
                                               r"this layer has r_max=8"):
            b.load_state_dict(a.state_dict(), strict=strict)
    a.set_active([0, 1])  # ids that fit, from a layer of another size all the same
    with pytest.raises(RuntimeError, match=r"r_max=16, but this layer has r_max=8"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match=r"active was saved from a layer with r_max > 9"):
        b.load_state_dict({"active": torch.tensor([0, 9])}, strict=False)
    assert b.active_indices().tolist() == [0, 1, 2, 3]  # kept through the failed loads


def test_torch_compile_fullgraph_one_graph_for_every_rank(device):
    # The rank is a runtime argument under torch.compile too: one graph serves every active set,
    # ranks 0 and 1 included (each new rank used to recompile it, up to Dynamo's limit).
    layer = make_layer("cpu", n_in=16, n_out=12, r_max=6).to(device)  # (ids moved by .to keep
    counter = CompileCounterWithBackend("inductor")                   # their mark on CUDA)
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x = torch.randn(5, 16, device=device, requires_grad=True)
    for ids in (None, [0, 2, 5], [1, 3], [], [4], list(range(6))):
        if ids is not None:
            layer.set_active(ids)
        y = compiled(x)
        torch.testing.assert_close(y, ref_forward(layer, x))
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_E, layer.lora_B), g)
        want = torch.autograd.grad(ref_forward(layer, x), (x, layer.lora_A, layer.lora_E, layer.lora_B), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("how", ["set_active", "assignment", "buffer swap"])
def test_adamw_keeps_inactive_components_across_active_set_changes(device, foreach, how):
    # An assignment of ids (or a swap of the buffer, as torch.func.functional_call does) used to
    # leave the guard protecting the previous inactive set: the new active components never
    # trained and the new inactive ones decayed.
    model = nn.Sequential(make_layer(device, seed=0), nn.ReLU(), make_layer(device, n_in=20, seed=1))
    layers = [model[0], model[2]]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    guard = protect_inactive(opt, model)

    def put(layer, ids):
        if how == "set_active":
            layer.set_active(ids)
        elif how == "assignment":
            layer.active = torch.tensor(ids, dtype=torch.long, device=device)
        else:
            layer._buffers["active"] = torch.tensor(ids, dtype=torch.long, device=device)

    schedule = [([0, 1, 2, 3], [0, 1]), ([1, 5], [0, 1, 2, 6, 7]), ([], [3]), (list(range(8)), [4])]
    for ids0, ids1 in schedule:
        put(layers[0], ids0)
        put(layers[1], ids1)
        before = [(l.inactive.clone(), l.active.clone(), l.lora_A.detach().clone(),
                   l.lora_E.detach().clone(), l.lora_B.detach().clone(),
                   {k: v.clone() for k, v in opt.state[l.lora_A].items()}) for l in layers]
        opt.zero_grad()
        model(torch.randn(8, 24, device=device)).square().mean().backward()
        opt.step()
        for l, (inact, act, A0, E0, B0, stA) in zip(layers, before):
            assert torch.equal(l.lora_A[inact], A0[inact])
            assert torch.equal(l.lora_E[inact], E0[inact])
            assert torch.equal(l.lora_B[:, inact], B0[:, inact])
            if act.numel():
                assert not torch.equal(l.lora_A[act], A0[act])  # the active ones did train
            for k in ("exp_avg", "exp_avg_sq"):
                if k in stA:
                    assert torch.equal(opt.state[l.lora_A][k][inact], stA[k][inact])
    guard.remove()
    layers[0].set_active([0])
    A0 = layers[0].lora_A.detach().clone()
    opt.zero_grad()
    model(torch.randn(8, 24, device=device)).square().mean().backward()
    opt.step()
    assert not torch.equal(layers[0].lora_A[1:], A0[1:])  # unprotected: weight decay moves them


def test_guard_follows_ids_copied_into_the_buffer(device):
    # AveragedModel and other tools write buffers in place: the same tensor, other ids.
    layer = make_layer(device, seed=0)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    protect_inactive(opt, layer)
    layer.set_active([0, 1, 2, 3])
    layer(torch.randn(4, 24, device=device)).square().mean().backward()
    opt.step()
    layer.active.copy_(torch.tensor([4, 5, 6, 7], device=device))
    A0 = layer.lora_A.detach().clone()
    opt.zero_grad()
    layer(torch.randn(4, 24, device=device)).square().mean().backward()
    opt.step()
    assert torch.equal(layer.lora_A[:4], A0[:4]) and not torch.equal(layer.lora_A[4:], A0[4:])


def test_guard_protects_a_layer_pruned_after_steps_with_every_component_active(device):
    # protect_inactive re-reads which layers have inactive components only when an active set
    # changed (VarRankLoRALinear.active_sets_version): a layer that trained with every component
    # active must be protected from the first step after it is pruned.
    layer = make_layer(device, r_max=8, r_init=8)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    protect_inactive(opt, layer)
    for ids in (range(8), range(8), [0, 2, 5]):
        layer.set_active(ids)
        before = layer.lora_A.detach().clone()
        opt.zero_grad()
        layer(torch.randn(8, 24, device=device)).square().mean().backward()
        opt.step()
    inactive = layer.inactive
    assert inactive.numel() == 5 and torch.equal(layer.lora_A[inactive], before[inactive])
    assert not torch.equal(layer.lora_A[layer.active], before[layer.active])


class _PerTensorGuard:
    """The plain form of protect_inactive: per tensor, gather the inactive slices before the step
    and scatter them back after it. The batched guard must match it bit for bit."""

    def __init__(self, opt, layers):
        self.opt, self.layers, self.saved = opt, layers, []
        opt.register_step_pre_hook(self.save)
        opt.register_step_post_hook(self.restore)

    def tensors(self, p):
        return [p] + [t for t in self.opt.state.get(p, {}).values()
                      if torch.is_tensor(t) and t.shape == p.shape]

    @torch.no_grad()
    def save(self, *_):
        self.saved = []
        for l in self.layers:
            for p, dim in ((l.lora_A, 0), (l.lora_E, 0), (l.lora_B, 1)):
                if l.inactive.numel() and p.grad is not None:
                    ts = self.tensors(p)
                    self.saved.append((ts, dim, l.inactive, [t.index_select(dim, l.inactive) for t in ts]))

    @torch.no_grad()
    def restore(self, *_):
        for ts, dim, idx, rows in self.saved:
            for t, r in zip(ts, rows):
                t.index_copy_(dim, idx, r)


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize("foreach", [False, True])
def test_batched_guard_is_bit_identical_to_per_tensor_save_restore(device, foreach):
    # Layers of three shapes (two share one, so their tensors are stacked in one group), one layer
    # left out of the forward (no gradient: not protected), active sets changing between steps
    # (including all-active and none-active), several AdamW steps with weight decay.
    def build():
        return nn.ModuleList([make_layer(device, seed=0), make_layer(device, seed=1),
                              make_layer(device, n_in=20, n_out=24, r_max=6, seed=2),
                              make_layer(device, n_in=24, n_out=20, seed=3)])

    models = [build(), build()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
            for m in models]
    guard = protect_inactive(opts[0], models[0])
    _PerTensorGuard(opts[1], list(models[1]))
    schedule = [([0, 1, 2, 3], [0, 5], [0, 1], [1]), ([1, 5], list(range(8)), [2, 3, 4], [0]),
                ([], [3, 7], [5], [2]), ([1, 5], [3, 7], [5], [2]), (list(range(8)), [4], [], [])]
    x = torch.randn(5, 24, device=device)
    for active in schedule:
        for m in models:
            for layer, ids in zip(m, active):
                layer.set_active(ids)
        for m, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            m[1](m[2](m[0](x)).relu()).square().mean().backward()  # m[3] gets no gradient
            opt.step()
        for la, lb in zip(models[0], models[1]):
            for name in ("lora_A", "lora_E", "lora_B"):
                pa, pb = getattr(la, name), getattr(lb, name)
                assert torch.equal(_bits(pa), _bits(pb)), name
                sa, sb = opts[0].state.get(pa, {}), opts[1].state.get(pb, {})
                assert sa.keys() == sb.keys()
                for k in sa:
                    assert torch.equal(_bits(sa[k].float()), _bits(sb[k].float())), (name, k)
    guard.remove()


def test_guard_follows_changes_that_leave_the_active_sets_alone(device):
    # The guard rebuilds what it protects only when that changes. After step 2 no active set
    # changes; what does is which layers get a gradient (layer 2 joins the forward at step 4), the
    # optimizer's state tensors (swapped for copies at step 5, replaced by load_state_dict at
    # step 6) and nothing at all (steps 3 and 7). Steps 0-1 run with every component active, so
    # the components pruned at step 2 carry AdamW moments that an unprotected step would decay.
    # Every step must match the per-tensor guard bit for bit.
    def build():
        return nn.ModuleList([make_layer(device, seed=0), make_layer(device, n_in=20, seed=1),
                              make_layer(device, n_in=20, seed=2)])

    models = [build(), build()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in models]
    guard = protect_inactive(opts[0], models[0])
    _PerTensorGuard(opts[1], list(models[1]))
    x = torch.randn(5, 24, device=device)
    for step in range(8):
        for m, opt in zip(models, opts):
            if step in (0, 2):
                subsets = ([0, 3], [1, 2, 5], [4]) if step == 2 else [range(8)] * 3
                for layer, ids in zip(m, subsets):
                    layer.set_active(ids)
            if step == 3:
                # Entries the guard must pass over: a key that is not a parameter (torch.optim
                # allows them) and a Python counter that is a new object every step.
                opt.state["global"] = "not a parameter's dict"
                opt.register_step_pre_hook(_count_calls)
            if step == 5:
                for state in opt.state.values():
                    if isinstance(state, dict):
                        for k in ("exp_avg", "exp_avg_sq"):
                            state[k] = state[k].clone()
            if step == 6:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt.zero_grad(set_to_none=True)
            h = m[1](m[0](x)).relu()
            (m[2](h) if step >= 4 else h).square().mean().backward()
            opt.step()
        for la, lb in zip(models[0], models[1]):
            for name in ("lora_A", "lora_E", "lora_B"):
                pa, pb = getattr(la, name), getattr(lb, name)
                assert torch.equal(_bits(pa), _bits(pb)), (step, name)
                sa, sb = opts[0].state.get(pa, {}), opts[1].state.get(pb, {})
                assert sa.keys() == sb.keys()
                for k in sa:
                    if torch.is_tensor(sa[k]):
                        assert torch.equal(_bits(sa[k].float()), _bits(sb[k].float())), (step, name, k)
                    else:
                        assert sa[k] == sb[k], (step, name, k)
    guard.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guard_follows_the_model_to_another_device():
    # model.to("cuda") mid-run replaces each layer's inactive buffer, and moving the optimizer
    # state with `t.data = t.data.to(...)` keeps every state tensor's identity: the guard must
    # still rebuild its masks on the new device (it raised a device mismatch when it did not).
    def build():
        return nn.ModuleList([make_layer("cpu", seed=0), make_layer("cpu", n_in=20, seed=1)])

    models = [build(), build()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in models]
    protect_inactive(opts[0], models[0])
    _PerTensorGuard(opts[1], list(models[1]))
    x = torch.randn(5, 24)
    for step, subsets in enumerate(([range(8)] * 2, ([0, 3], [1, 2, 5]), None, None)):
        for m, opt in zip(models, opts):
            if subsets is not None:
                for layer, ids in zip(m, subsets):
                    layer.set_active(ids)
            if step == 2:
                m.to("cuda")
                for p, state in opt.state.items():
                    for t in state.values():
                        if torch.is_tensor(t) and t.shape == p.shape:
                            t.data = t.data.to("cuda")
            opt.zero_grad(set_to_none=True)
            m[1](m[0](x.to(m[0].lora_A.device))).square().mean().backward()
            opt.step()
        for la, lb in zip(*models):
            for name in ("lora_A", "lora_E", "lora_B"):
                pa, pb = getattr(la, name), getattr(lb, name)
                assert torch.equal(_bits(pa), _bits(pb)), (step, name)
                assert torch.equal(_bits(opts[0].state[pa]["exp_avg"]),
                                   _bits(opts[1].state[pb]["exp_avg"])), (step, name)


def _count_calls(opt, *_):
    """A step pre-hook keeping a Python int in every parameter's state (once AdamW has made it),
    a new object each step."""
    for p in (p for group in opt.param_groups for p in group["params"]):
        if opt.state.get(p):
            opt.state[p]["calls"] = opt.state[p].get("calls", 10**6) + 1


def test_protect_inactive_needs_a_layer():
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="no VarRankLoRALinear"):
        protect_inactive(opt, nn.Linear(2, 2))
