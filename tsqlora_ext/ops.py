"""Typed Python entry points to the native ops (torch.ops.tsqlora_ext.*).

Fake kernels are registered here through torch.library, so every op works under torch.compile and
torch.library.opcheck; varrank_lora's autograd and autocast rule are C++
(csrc/lora/varrank_lora_autograd.cpp).
"""

from __future__ import annotations

import torch


# ---- variable-rank LoRA linear (issue 3; csrc/lora/) -------------------------------------------


def varrank_lora(
    x: torch.Tensor,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    active: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · ((x_lora A_actᵀ) ⊙ E_act) B_actᵀ, differentiable in x, x_lora and
    the adapter (reference: `reference.varrank_lora`).

    x: [..., in]; x_lora: the adapter's (dropped-out) copy of x, or None for x itself;
    weight: [out, in] and bias: [out] are frozen (they get no gradient, so they must not require
    one); lora_A: [r_max, in]; lora_E: [r_max]; lora_B: [out, r_max]; active: the int64 ids of the
    active components in increasing order without repeats (as `VarRankLoRALinear.active` holds
    them), [r] with 0 <= r <= r_max (r = 0 gives the base output). Gradients of
    lora_A/E/B are zero outside the active components.
    """
    y, _ = torch.ops.tsqlora_ext.varrank_lora.default(
        x, x_lora, weight, bias, lora_A, lora_E, lora_B, active, float(scaling))
    return y


def _check_devices(op: str, anchor: str, tensors: dict) -> None:
    """Every tensor (or list of them) in ``tensors`` on the device of ``tensors[anchor]``. The fake
    kernels also serve the meta device: one meta tensor among CPU ones routes a call to them, past
    the native kernels' own checks, where it would return uninitialised memory."""
    device = tensors[anchor].device
    for name, value in tensors.items():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if t is not None:
                torch._check(t.device == device,
                             lambda name=name, t=t: f"{op}: {name} is on {t.device} but {anchor} is on {device}")


@torch.library.register_fake("tsqlora_ext::varrank_lora")
def _varrank_lora_fake(x, x_lora, weight, bias, lora_A, lora_E, lora_B, active, scaling):
    _check_devices("varrank_lora", "x", {"x": x, "x_lora": x_lora, "weight": weight, "bias": bias,
                                         "lora_A": lora_A, "lora_E": lora_E, "lora_B": lora_B,
                                         "active": active})
    torch._check(x.shape[-1] == weight.shape[1], lambda: "varrank_lora: x's last dim != in_features")
    lead = tuple(x.shape[:-1])
    return x.new_empty(lead + (weight.shape[0],)), x.new_empty(lead + (active.shape[0],))


@torch.library.register_fake("tsqlora_ext::varrank_lora_backward")
def _varrank_lora_backward_fake(grad_y, x, x_lora, weight, lora_A, lora_E, lora_B, active,
                                scaling, xa, need_dx, need_dx_lora):
    _check_devices("varrank_lora_backward", "x", {
        "grad_y": grad_y, "x": x, "x_lora": x_lora, "weight": weight, "lora_A": lora_A,
        "lora_E": lora_E, "lora_B": lora_B, "active": active, "xa": xa})
    # The kernels return every gradient contiguous whatever its input's strides (empty_like would
    # copy them).
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dx_lora = x.new_empty(x.shape) if (x_lora is not None and need_dx_lora) else x.new_empty(0)
    return (dx, dx_lora, lora_A.new_empty(lora_A.shape), lora_E.new_empty(lora_E.shape),
            lora_B.new_empty(lora_B.shape))


# ---- sensitivity and rank reallocation (csrc/sensitivity/, csrc/realloc/) ----------------------


def sensitivity_update(
    lora_A: list[torch.Tensor],
    lora_E: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    grad_A: list[torch.Tensor],
    grad_E: list[torch.Tensor],
    grad_B: list[torch.Tensor],
    ipt_avg: list[torch.Tensor],
    unc_avg: list[torch.Tensor],
    active_mask: torch.Tensor,
    scores: torch.Tensor,
    counters: torch.Tensor,
    beta1: float,
    beta2: float,
    check_finite: bool = True,
) -> None:
    """Fused importance update over all adapted layers, in place (see reference.sensitivity_update).

    One call per optimizer step; no host sync. ipt_avg / unc_avg / scores are float32,
    counters int64 [2] = [updates applied, steps skipped because a gradient was NaN/inf].
    ``check_finite=False`` skips the op's own scan of the gradients, for a caller that already
    knows them finite (a NaN would then poison the EMAs).
    """
    torch.ops.tsqlora_ext.sensitivity_update.default(
        lora_A, lora_E, lora_B, grad_A, grad_E, grad_B, ipt_avg, unc_avg, active_mask, scores,
        counters, float(beta1), float(beta2), bool(check_finite))


def layer_sensitivity(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Σ |weight ⊙ (grad_outᵀ x)| as a 0-d tensor, never materializing grad_outᵀ x in full."""
    return torch.ops.tsqlora_ext.layer_sensitivity.default(weight, x, grad_out)


def realloc_bounds(sizes, r_min, r_max) -> torch.Tensor:
    """The per-layer table topk_realloc reads: a CPU int64 [3, L] tensor with rows sizes, r_min,
    r_max. Build it once and reuse it: it is host metadata, so a call needs no host sync and no
    per-call conversion of 3 x L Python ints."""
    rows = {"sizes": sizes, "r_min": r_min, "r_max": r_max}
    lengths = {name: len(v) for name, v in rows.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"realloc_bounds: sizes, r_min and r_max need one entry per layer, got "
                         f"lengths {lengths}")
    # On the CPU even under torch.device("cuda") or set_default_device: the op reads it on the host.
    return torch.tensor([list(row) for row in rows.values()], dtype=torch.int64, device="cpu")


def topk_realloc(scores: torch.Tensor, bounds: torch.Tensor, budget: int) -> torch.Tensor:
    """Bool keep-mask [n]: the best min(budget, Σ min(r_max, size)) components, r_min[l] <= kept
    in layer l <= r_max[l], ties by lower flat index (see reference.topk_realloc); ``bounds`` from
    :func:`realloc_bounds`. No host sync on CUDA."""
    return torch.ops.tsqlora_ext.topk_realloc.default(scores, bounds, int(budget))


@torch.library.register_fake("tsqlora_ext::sensitivity_update")
def _(lora_A, lora_E, lora_B, grad_A, grad_E, grad_B, ipt_avg, unc_avg, active_mask, scores,
      counters, beta1, beta2, check_finite=True):
    _check_devices("sensitivity_update", "active_mask", {
        "lora_A": lora_A, "lora_E": lora_E, "lora_B": lora_B, "grad_A": grad_A, "grad_E": grad_E,
        "grad_B": grad_B, "ipt_avg": ipt_avg, "unc_avg": unc_avg, "active_mask": active_mask,
        "scores": scores, "counters": counters})
    return None


@torch.library.register_fake("tsqlora_ext::layer_sensitivity")
def _(weight, x, grad_out):
    _check_devices("layer_sensitivity", "weight", {"weight": weight, "x": x, "grad_out": grad_out})
    torch._check(x.shape[-1] == weight.shape[1], lambda: "layer_sensitivity: x must be [..., in]")
    torch._check(grad_out.shape[-1] == weight.shape[0],
                 lambda: "layer_sensitivity: grad_out must be [..., out]")
    torch._check(x.dim() == grad_out.dim(), lambda: "layer_sensitivity: x and grad_out must have "
                 "the same leading dimensions (one output gradient per input row)")
    for a, b in zip(x.shape[:-1], grad_out.shape[:-1]):
        torch._check(a == b, lambda: "layer_sensitivity: x and grad_out must have the same leading "
                     "dimensions (one output gradient per input row)")
    dbl = torch.float64 in (weight.dtype, x.dtype, grad_out.dtype)
    return weight.new_empty((), dtype=torch.float64 if dbl else torch.float32)


@torch.library.register_fake("tsqlora_ext::topk_realloc")
def _(scores, bounds, budget):
    torch._check(bounds.device.type == "cpu",
                 lambda: f"topk_realloc: bounds must be a CPU tensor (realloc_bounds), got {bounds.device}")
    return scores.new_empty(scores.shape, dtype=torch.bool)
