"""The variable-rank LoRA op (torch.ops.tsqlora_ext.varrank_lora + its backward) against the
pure-PyTorch reference, on every device present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tsqlora_ext  # noqa: F401  (registers the ops)
from tsqlora_ext import ops, reference

# Max error allowed, relative to the largest magnitude of the reference (computed in float64).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def dtypes_for(device):
    return [torch.float64, torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


def active_ids(kind: str, r_max: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "empty":
        return torch.empty(0, dtype=torch.long)
    if kind == "full":
        return torch.arange(r_max)
    if kind == "prefix":
        return torch.arange(max(1, r_max // 2))
    # scattered: a random subset of about half, never empty, never a prefix when avoidable
    n = max(1, r_max // 2)
    return torch.randperm(r_max, generator=gen)[:n].sort().values


def make_inputs(lead, n_in, n_out, r_max, kind, dtype, device, *, bias=True, with_x_lora=False,
                seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = rnd(*lead, n_in)
    t = dict(
        x=x,
        # a dropped-out copy: about half the entries zeroed and the rest rescaled, as nn.Dropout does
        x_lora=(x * (torch.rand(x.shape, generator=gen) > 0.5) * 2.0) if with_x_lora else None,
        weight=rnd(n_out, n_in) / n_in**0.5,
        bias=rnd(n_out) if bias else None,
        lora_A=rnd(r_max, n_in) / n_in**0.5,
        lora_E=rnd(r_max),
        lora_B=rnd(n_out, r_max),
    )
    t = {k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in t.items()}
    t["active"] = active_ids(kind, r_max, gen).to(device)
    t["scaling"] = 16 / 12  # alpha / r_init, inexact in float32 (float64 keeps every digit)
    return t


ARGS = ("x", "x_lora", "weight", "bias", "lora_A", "lora_E", "lora_B", "active", "scaling")
GRAD_OF = ("x", "x_lora", "lora_A", "lora_E", "lora_B")


def run(fn, t, grad_y):
    """Forward and the gradients of every differentiable input, for t's tensors (detached copies)."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in GRAD_OF and v is not None else v)
              for k, v in t.items()}
    y = fn(*(leaves[k] for k in ARGS))
    y.backward(grad_y.to(y.dtype))
    grads = {k: leaves[k].grad for k in GRAD_OF if leaves[k] is not None}
    return y.detach(), grads


def assert_matches_reference(t, dtype):
    ref_t = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in t.items()}
    gen = torch.Generator().manual_seed(1)
    n_out = t["weight"].shape[0]
    grad_y = torch.randn(*t["x"].shape[:-1], n_out, generator=gen, dtype=torch.float64).to(t["x"].device)
    y, grads = run(ops.varrank_lora, t, grad_y)
    y_ref, grads_ref = run(reference.varrank_lora, ref_t, grad_y)

    def close(name, got, want):
        assert got.dtype == dtype and got.shape == want.shape, name
        if want.numel() == 0:
            return
        scale = want.abs().max().item() + 1.0
        err = (got.double() - want).abs().max().item()
        assert err <= TOL[dtype] * scale, f"{name}: max error {err:.3g} > {TOL[dtype]:.1g} x {scale:.3g}"

    close("y", y, y_ref)
    for k in grads_ref:
        close(f"d{k}", grads[k], grads_ref[k])
    # Inactive components get exactly zero gradient.
    inactive = torch.ones(t["lora_E"].shape[0], dtype=torch.bool, device=y.device)
    inactive[t["active"]] = False
    assert (grads["lora_A"][inactive] == 0).all()
    assert (grads["lora_E"][inactive] == 0).all()
    assert (grads["lora_B"][:, inactive] == 0).all()


@pytest.mark.parametrize("kind", ["empty", "full", "prefix", "scattered"])
@pytest.mark.parametrize("with_x_lora", [False, True])
def test_matches_reference_active_sets(device, kind, with_x_lora):
    for dtype in dtypes_for(device):
        t = make_inputs((37,), 48, 40, 16, kind, dtype, device, with_x_lora=with_x_lora)
        assert_matches_reference(t, dtype)


@pytest.mark.parametrize("n_in,n_out,r_max,kind", [
    (1, 3, 1, "full"),
    (1, 3, 1, "empty"),
    (5, 3, 256, "scattered"),
    (33, 1, 7, "scattered"),
    (64, 96, 256, "full"),
    (4, 0, 6, "full"),  # out = 0: dE is an empty sum, so exact zeros
])
def test_matches_reference_odd_sizes(device, n_in, n_out, r_max, kind):
    for dtype in dtypes_for(device):
        t = make_inputs((19,), n_in, n_out, r_max, kind, dtype, device, seed=n_in + r_max)
        assert_matches_reference(t, dtype)


@pytest.mark.parametrize("lead", [(3, 11), (2, 1, 5), (0,)])
def test_matches_reference_leading_shapes(device, lead):
    for dtype in dtypes_for(device):
        t = make_inputs(lead, 24, 20, 8, "scattered", dtype, device, bias=False, with_x_lora=True)
        assert_matches_reference(t, dtype)


def test_noncontiguous_input(device):
    t = make_inputs((16, 24), 24, 20, 8, "scattered", torch.float32, device)
    t["x"] = t["x"].transpose(0, 1)  # [24, 16, in]: a transposed view, not contiguous
    assert not t["x"].is_contiguous()
    assert_matches_reference(t, torch.float32)


@pytest.mark.parametrize("with_x_lora", [False, True])
def test_backward_inside_an_autocast_region_keeps_float32(device, with_x_lora):
    # A float32 forward whose backward runs inside autocast: the backward op's GEMMs must not be
    # cast to bf16 (the gradients would change dtype and precision).
    t = make_inputs((4, 6), 24, 20, 8, "scattered", torch.float32, device, with_x_lora=with_x_lora)
    grad_y = torch.randn(4, 6, 20, generator=torch.Generator().manual_seed(3)).to(device)
    y, want = run(ops.varrank_lora, t, grad_y)
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in GRAD_OF and v is not None else v)
              for k, v in t.items()}
    y = ops.varrank_lora(*(leaves[k] for k in ARGS))
    with torch.autocast(device, dtype=torch.bfloat16):
        y.backward(grad_y)
    for k, g in want.items():
        assert leaves[k].grad.dtype == torch.float32, k
        torch.testing.assert_close(leaves[k].grad, g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("region", [torch.bfloat16, torch.float16])
def test_autocast_region_runs_the_op_in_its_dtype(device, region):
    # Inside autocast the op gets the activations in the region's dtype and float32 parameters:
    # every float32 input is cast to the region's dtype (bf16 or fp16, as the region says), the
    # result is the op on those cast inputs, and float32 leaves get float32 gradients, equal to
    # the cast inputs' gradients widened. float64 is left alone, as autocast leaves it for a
    # matmul.
    t = make_inputs((4, 6), 24, 20, 8, "scattered", torch.float32, device, with_x_lora=True)
    grad_y = torch.randn(4, 6, 20, generator=torch.Generator().manual_seed(3)).to(device)

    def in_region(*args):
        with torch.autocast(device, dtype=region):
            return ops.varrank_lora(*args)

    y, grads = run(in_region, t, grad_y)
    assert y.dtype == region
    cast = {k: (v.to(region) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in t.items()}
    y_cast, grads_cast = run(ops.varrank_lora, cast, grad_y)
    assert torch.equal(y, y_cast)
    for k, g in grads.items():
        assert g.dtype == torch.float32, k
        assert torch.equal(g, grads_cast[k].float()), k

    t64 = make_inputs((4, 6), 24, 20, 8, "scattered", torch.float64, device)
    y64, _ = run(in_region, t64, grad_y)
    assert y64.dtype == torch.float64
    assert torch.equal(y64, ops.varrank_lora(*(t64[k] for k in ARGS)))


@pytest.mark.parametrize("lead", [(9,), (2, 5)])
def test_rank_zero_is_exactly_the_base_layer(device, lead):
    t = make_inputs(lead, 24, 20, 8, "empty", torch.float32, device)
    y = ops.varrank_lora(*(t[k] for k in ARGS))
    assert torch.equal(y, F.linear(t["x"], t["weight"], t["bias"]))


def _sample_args(device):
    for kind, bias, xl, lead in [("scattered", True, False, (7,)), ("full", False, True, (2, 3)),
                                 ("empty", True, True, (5,))]:
        t = make_inputs(lead, 12, 10, 6, kind, torch.float32, device, bias=bias, with_x_lora=xl)
        for k in GRAD_OF:
            if t[k] is not None:
                t[k].requires_grad_(True)
        yield tuple(t[k] for k in ARGS)
    # Transposed views: the fake kernels must give the real outputs' (contiguous) strides.
    for kind in ("scattered", "empty", "full"):
        t = make_inputs((3, 4), 12, 10, 6, kind, torch.float32, device, with_x_lora=True)
        for k in ("x", "x_lora"):
            t[k] = t[k].transpose(0, 1)
        for k in ("lora_A", "lora_B"):  # same shape, column-major
            t[k] = t[k].t().contiguous().t()
        for k in GRAD_OF:
            t[k].requires_grad_(True)
        yield tuple(t[k] for k in ARGS)


def test_opcheck(device):
    for args in _sample_args(device):
        torch.library.opcheck(torch.ops.tsqlora_ext.varrank_lora.default, args)


def test_opcheck_backward(device):
    for args in _sample_args(device):
        x, x_lora, weight, bias, A, E, B, active, s = (a.detach() if torch.is_tensor(a) else a for a in args)
        y, xa = torch.ops.tsqlora_ext.varrank_lora.default(x, x_lora, weight, bias, A, E, B, active, s)
        for need_dx, need_dx_lora in [(True, True), (False, True), (True, False)]:
            torch.library.opcheck(torch.ops.tsqlora_ext.varrank_lora_backward.default,
                                  (torch.randn_like(y), x, x_lora, weight, A, E, B, active, s, xa,
                                   need_dx, need_dx_lora))


@pytest.mark.parametrize("with_x_lora", [False, True])
def test_gradcheck_float64(device, with_x_lora):
    t = make_inputs((2, 3), 5, 4, 6, "scattered", torch.float64, device, with_x_lora=with_x_lora)
    names = [k for k in GRAD_OF if t[k] is not None]

    def fn(*grad_inputs):
        args = dict(t, **dict(zip(names, grad_inputs)))
        return ops.varrank_lora(*(args[k] for k in ARGS))

    inputs = tuple(t[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, inputs)


class _BackwardCalls(TorchDispatchMode):
    """Records the need_dx / need_dx_lora flags of every varrank_lora_backward call."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.tsqlora_ext.varrank_lora_backward.default:
            self.flags.append((args[10], args[11]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_no_grad_needed_for_x(device, x_requires_grad):
    """A frozen input (e.g. after frozen embeddings) skips the dx GEMM; adapter grads still come."""
    t = make_inputs((6,), 8, 8, 4, "prefix", torch.float32, device)
    x = t["x"].requires_grad_(x_requires_grad)
    A = t["lora_A"].clone().requires_grad_(True)
    A_ref = t["lora_A"].clone().requires_grad_(True)
    with _BackwardCalls() as calls:
        y = ops.varrank_lora(x, None, t["weight"], t["bias"], A, t["lora_E"], t["lora_B"],
                             t["active"], 0.5)
        y.sum().backward()
    assert calls.flags == [(x_requires_grad, False)]
    assert (x.grad is not None) == x_requires_grad
    reference.varrank_lora(x.detach(), None, t["weight"], t["bias"], A_ref, t["lora_E"],
                           t["lora_B"], t["active"], 0.5).sum().backward()
    torch.testing.assert_close(A.grad, A_ref.grad)


def test_bad_inputs_name_the_input():
    t = make_inputs((4,), 8, 6, 5, "prefix", torch.float32, "cpu")

    def call(**over):
        args = dict(t, **over)
        return ops.varrank_lora(*(args[k] for k in ARGS))

    with pytest.raises(RuntimeError, match="active\\[1\\] = 9 is outside"):
        call(active=torch.tensor([0, 9]))
    with pytest.raises(RuntimeError, match="strictly increasing .* active\\[1\\] = 2 follows 2"):
        call(active=torch.tensor([2, 2]))
    # All r_max ids, out of order: the op takes r == r_max as 0..r_max-1, so it must refuse them.
    with pytest.raises(RuntimeError, match="active\\[1\\] = 0 follows 1"):
        call(active=torch.tensor([1, 0, 2, 3, 4]))
    with pytest.raises(RuntimeError, match="active must be a 1-D int64"):
        call(active=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="lora_B must be"):
        call(lora_B=t["lora_B"][:, :3])
    with pytest.raises(RuntimeError, match="x's last dim 7"):
        call(x=torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="lora_E has dtype"):
        call(lora_E=t["lora_E"].double())
    with pytest.raises(ValueError, match="weight and bias are the frozen"):
        call(weight=t["weight"].clone().requires_grad_(True))
    # Under no_grad no gradient can reach them (an evaluation of a model whose every parameter
    # requires grad raised).
    with torch.no_grad():
        torch.testing.assert_close(call(weight=t["weight"].clone().requires_grad_(True)), call())
    # One meta tensor among CPU ones routed the call to the fake kernel: uninitialised memory.
    for name in ("lora_A", "active", "bias"):
        with pytest.raises(RuntimeError, match=f"varrank_lora: {name} is on meta but x is on cpu"):
            call(**{name: t[name].to("meta")})


def test_double_backward_is_refused_not_wrong():
    # The backward op has no derivative: a gradient penalty got wrong second derivatives silently.
    t = make_inputs((3,), 5, 4, 4, "scattered", torch.float64, "cpu")
    for k in GRAD_OF:
        if t[k] is not None:
            t[k].requires_grad_(True)
    y = ops.varrank_lora(*(t[k] for k in ARGS))
    with pytest.raises(RuntimeError, match="double backward \\(create_graph=True\\) is not supported"):
        torch.autograd.grad(y.sum(), t["x"], create_graph=True)
