"""Typed Python entry points to the native ops (torch.ops.tsqlora_ext.*).

Fake kernels and autograd formulas are registered here through torch.library, so every op works
under autograd, torch.compile and torch.library.opcheck.
"""

from __future__ import annotations

import torch

from . import reference


# TEMPORARY (issue 3 replaces this with torch.ops.tsqlora_ext.varrank_lora + its autograd): the
# layer and everything above it are written against this signature.
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
    return reference.varrank_lora(x, x_lora, weight, bias, lora_A, lora_E, lora_B, active, scaling)


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
) -> None:
    """Fused importance update over all adapted layers, in place (see reference.sensitivity_update).

    One call per optimizer step; no host sync. ipt_avg / unc_avg / scores are float32,
    counters int64 [2] = [updates applied, steps skipped because a gradient was NaN/inf].
    """
    torch.ops.tsqlora_ext.sensitivity_update.default(
        lora_A, lora_E, lora_B, grad_A, grad_E, grad_B, ipt_avg, unc_avg, active_mask, scores,
        counters, float(beta1), float(beta2))


def layer_sensitivity(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Σ |weight ⊙ (grad_outᵀ x)| as a 0-d tensor, never materializing grad_outᵀ x in full."""
    return torch.ops.tsqlora_ext.layer_sensitivity.default(weight, x, grad_out)


def topk_realloc(
    scores: torch.Tensor, sizes: list[int], r_min: list[int], r_max: list[int], budget: int
) -> torch.Tensor:
    """Bool keep-mask [n]: the best min(budget, Σ r_max) components, r_min[l] <= kept in layer l
    <= r_max[l], ties by lower flat index (see reference.topk_realloc). No host sync on CUDA."""
    return torch.ops.tsqlora_ext.topk_realloc.default(
        scores, [int(s) for s in sizes], [int(v) for v in r_min], [int(v) for v in r_max], int(budget))


@torch.library.register_fake("tsqlora_ext::sensitivity_update")
def _(lora_A, lora_E, lora_B, grad_A, grad_E, grad_B, ipt_avg, unc_avg, active_mask, scores,
      counters, beta1, beta2):
    return None


@torch.library.register_fake("tsqlora_ext::layer_sensitivity")
def _(weight, x, grad_out):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "layer_sensitivity: x must be [..., in]")
    torch._check(grad_out.shape[-1] == weight.shape[0],
                 lambda: "layer_sensitivity: grad_out must be [..., out]")
    dbl = torch.float64 in (weight.dtype, x.dtype, grad_out.dtype)
    return weight.new_empty((), dtype=torch.float64 if dbl else torch.float32)


@torch.library.register_fake("tsqlora_ext::topk_realloc")
def _(scores, sizes, r_min, r_max, budget):
    return scores.new_empty(scores.shape, dtype=torch.bool)
