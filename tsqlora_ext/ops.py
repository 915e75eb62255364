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
