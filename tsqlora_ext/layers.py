"""VarRankLoRALinear: a frozen linear layer plus an SVD-form adapter whose rank moves in training.

ΔW = B · diag(E) · A with A: [r_max, in], E: [r_max], B: [out, r_max]. Only the components in the
active set take part in compute and receive gradients. The Parameters are allocated once at r_max
and never re-created, so optimizer state stays attached to them when the active set changes; the
rank is a runtime argument of the op (the length of the active-index tensor), never a compile-time
constant. scaling = alpha / r_init is fixed, so moving rank does not rescale the layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops

INITS = ("lora", "adalora")


class VarRankLoRALinear(nn.Module):
    """An adapted ``nn.Linear``.

    Args:
        base_layer: the frozen linear layer (kept as ``self.base_layer``).
        r_max: components allocated; the rank can never exceed it.
        r_init: the initial rank (the first ``r_init`` components are active) and the scaling
            denominator.
        alpha: scaling numerator; scaling = alpha / r_init.
        dropout: dropout on the adapter's input only.
        init: ``"lora"`` (A Kaiming-uniform, E = 1, B = 0: ΔW = 0 and learns like LoRA) or
            ``"adalora"`` (E = 0, A and B ~ N(0, 0.02), as PEFT's AdaLoRA).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r_max: int,
        r_init: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "lora",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be nn.Linear, got {type(base_layer).__name__}")
        if r_max < 1:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        if not 1 <= r_init <= r_max:
            raise ValueError(f"r_init must be in [1, r_max={r_max}], got {r_init}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r_max = r_max
        self.r_init = r_init
        self.alpha = alpha
        self.scaling = alpha / r_init
        self.init = init
        w = base_layer.weight
        factory = dict(device=w.device, dtype=w.dtype)
        self.lora_A = nn.Parameter(torch.empty(r_max, self.in_features, **factory))
        self.lora_E = nn.Parameter(torch.empty(r_max, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r_max, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Sorted ids of the active components. A buffer so it follows .to() and lands in
        # state_dict; its length is the rank.
        self.register_buffer("active", torch.arange(r_init, device=w.device, dtype=torch.long))
        self.merged = False
        self.reset_adapter()

    def reset_adapter(self) -> None:
        with torch.no_grad():
            if self.init == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.ones_(self.lora_E)
                nn.init.zeros_(self.lora_B)
            else:
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_B, std=0.02)

    # ---- the active set ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.active.numel())

    def active_indices(self) -> torch.Tensor:
        """Sorted int64 ids of the active components (a copy)."""
        return self.active.clone()

    def set_active(self, indices) -> None:
        """Make exactly ``indices`` the active components. Parameters are never re-created."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten().to(self.active.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.r_max):
            raise ValueError(f"active indices must lie in [0, r_max={self.r_max}), got {idx.tolist()}")
        idx = torch.unique(idx)  # sorted, duplicates removed
        if self.merged:
            raise RuntimeError("unmerge() the layer before changing its active set")
        self.active = idx

    # ---- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        x_lora = self.lora_dropout(x) if self.training and not isinstance(self.lora_dropout, nn.Identity) else None
        return ops.varrank_lora(
            x, x_lora, self.base_layer.weight, self.base_layer.bias,
            self.lora_A, self.lora_E, self.lora_B, self.active, self.scaling,
        )

    def delta_weight(self) -> torch.Tensor:
        """scaling · B_act diag(E_act) A_act, shape [out, in]."""
        a = self.lora_A.index_select(0, self.active)
        e = self.lora_E.index_select(0, self.active)
        b = self.lora_B.index_select(1, self.active)
        return self.scaling * (b * e) @ a

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; forward then costs one GEMM."""
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, r_max={self.r_max}, scaling={self.scaling:g}, init={self.init}")
