"""Pure-PyTorch references for every native op.

These are the specification the C++/CUDA kernels are tested against: written for clarity, not
speed, with no in-place tricks. Each function documents the math it implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """y = x Wᵀ + b + scaling · ((x_lora A_actᵀ) ⊙ E_act) B_actᵀ.

    x: [..., in]; x_lora: the adapter's (dropped-out) copy of x, or None for x itself;
    weight: [out, in]; lora_A: [r_max, in]; lora_E: [r_max]; lora_B: [out, r_max];
    active: sorted int64 ids of the active components, [r] with 0 <= r <= r_max.
    """
    if x_lora is None:
        x_lora = x
    y = F.linear(x, weight, bias)
    a = lora_A.index_select(0, active)
    e = lora_E.index_select(0, active)
    b = lora_B.index_select(1, active)
    return y + scaling * F.linear(F.linear(x_lora, a) * e, b)
