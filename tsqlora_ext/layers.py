"""VarRankLoRALinear: a frozen linear layer plus an SVD-form adapter whose rank moves in training.

ΔW = B · diag(E) · A with A: [r_max, in], E: [r_max], B: [out, r_max]. Only the components in the
active set take part in compute and receive gradients. The Parameters are allocated once at r_max
and never re-created, so optimizer state stays attached to them when the active set changes; the
rank is a runtime argument of the op (the length of the active-index tensor), never a compile-time
constant, and under torch.compile one graph serves every rank. scaling = alpha / r_init is fixed,
so moving rank does not rescale the layer.

Inactive components get exactly zero gradient, but an optimizer with weight decay or momentum
(AdamW) would still move them; `protect_inactive(optimizer, model)` keeps them (and their optimizer
state) bit-for-bit unchanged across steps, so a component that is switched back on resumes from
where it was switched off.
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
        # Sorted ids of the active components; its length is the rank. A buffer, so it follows
        # .to(), lands in state_dict and is seen by tools that copy or swap buffers
        # (functional_call, accelerate's loaders); compiled code reads an alias (see compute_ids).
        self.register_buffer("active", torch.empty(0, device=w.device, dtype=torch.long))
        self.active = torch.arange(r_init, device=w.device, dtype=torch.long)  # (sets the alias)
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

    # The base layer's weight and bias, read through the adapted layer as through the nn.Linear it
    # replaced: some models read them directly (T5's feed-forward casts to self.wo.weight.dtype).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # ---- the active set ------------------------------------------------------------------------
    # The ids in the ``active`` buffer are the one record of the active set: whatever else follows
    # it (protect_inactive's masks, RankAllocator's) is derived from that tensor and rebuilt when
    # the buffer is another tensor or was written in place (``ids_key``), so set_active, an
    # assignment, load_state_dict, .to(), a tool that swaps the buffer and one that copies into it
    # (AveragedModel) are all seen alike.

    def ids_key(self) -> tuple[int, int]:
        """Changes whenever the active ids may have: the id tensor's identity and its in-place
        version counter (read without a host sync)."""
        ids = self.active
        return id(ids), ids._version

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "active":
            torch._dynamo.decorators.mark_unbacked(value, 0)
            super().__setattr__("_compiled_ids", value)

    def compute_ids(self) -> torch.Tensor:
        """The active ids that computation uses. Eagerly the buffer itself, whatever swapped it in.
        Under torch.compile a plain-attribute alias of it, which every assignment, set_active,
        .to() and load_state_dict keep current: Dynamo guards a module buffer's shape statically
        (whatever its marks), so through the buffer each new rank recompiled a compiled model
        and, past the recompile limit, ran it eagerly. The alias's length is marked unbacked, so
        one graph takes every rank, 0 and 1 included; nothing that reads it branches on it."""
        return self._compiled_ids if torch.compiler.is_compiling() else self.active

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.active = self.active  # the moved buffer: the alias follows it
        return self

    @property
    def rank(self) -> int:
        return int(self.active.numel())

    def active_indices(self) -> torch.Tensor:
        """Sorted int64 ids of the active components (a copy)."""
        return self.active.clone()

    def inactive_mask(self) -> torch.Tensor:
        """Bool [r_max], True for the inactive components (on the ids' device, no host sync)."""
        ids = self.active
        return torch.ones(self.r_max, dtype=torch.bool, device=ids.device).index_fill_(0, ids, False)

    @property
    def inactive(self) -> torch.Tensor:
        """Sorted int64 ids of the inactive components (a host sync on a GPU)."""
        return torch.nonzero(self.inactive_mask()).flatten()

    # Buffers made under torch.inference_mode() (an evaluation pass that prunes) would be inference
    # tensors, which the next training step cannot use.
    def set_active(self, indices) -> None:
        """Make exactly ``indices`` (ints in [0, r_max); order and repeats do not matter) the active
        components. Parameters are never re-created, so optimizer state stays attached."""
        self._set_active(indices, self.active.device)

    @torch.inference_mode(False)
    def _set_active(self, indices, device: torch.device) -> None:
        """set_active, with the id tensors placed on ``device``."""
        if self.merged:
            raise RuntimeError("unmerge() the layer before changing its active set")
        idx = indices if torch.is_tensor(indices) else torch.as_tensor(list(indices))
        if idx.numel() == 0:
            idx = idx.to(torch.long)  # an empty list arrives as float32
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"set_active: indices must be integers, got dtype {idx.dtype}")
        idx = idx.to(torch.long).flatten().cpu()
        bad = idx[(idx < 0) | (idx >= self.r_max)]
        if bad.numel():
            raise ValueError(f"set_active: component ids must lie in [0, r_max={self.r_max}), "
                             f"got {bad.tolist()}")
        idx = torch.unique(idx)  # sorted, duplicates removed
        if self.active.device == device and device.type == "cpu" and torch.equal(idx, self.active):
            # The same tensors keep protect_inactive's masks, which are cached on them. (Not
            # compared on a GPU, where reading the ids would cost a host sync per layer.)
            return
        self.active = idx.to(device)

    def get_extra_state(self) -> torch.Tensor:
        # Whether base_layer.weight holds ΔW: a merged layer's state must load as merged, or the
        # adapter would be added a second time on top of the merged weight.
        return torch.tensor(self.merged)

    def set_extra_state(self, state: torch.Tensor) -> None:
        # Anything but a saved flag (torch.distributed.checkpoint passes a stand-in object for
        # a state dict without one, and its truth is True) leaves the flag _load_from_state_dict
        # set: a merge nobody saved would silently drop the adapter from the output.
        if torch.is_tensor(state) or isinstance(state, bool):
            self.merged = bool(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Load onto an unmerged layer, as the adapter may change. base_layer, loaded after this
        # module, then receives the saved weight (merged or not, as the saved flag says) or keeps
        # its own. A saved weight may be this very Parameter (a state_dict() loaded back), so
        # unmerging only takes ΔW out when no saved weight is to replace it.
        if prefix + "base_layer.weight" in state_dict:
            self.merged = False
        else:
            self.unmerge()
        state_dict = dict(state_dict)
        # The saved active set may have another length than the current one, which the default
        # in-place copy into the buffer would reject: adopt it through set_active instead.
        key = prefix + "active"
        if key in state_dict:
            saved = state_dict[key]
            lora_a = state_dict.get(prefix + "lora_A")
            saved_r_max = None if lora_a is None else lora_a.shape[0]
            beyond = saved.numel() > 0 and int(saved.max()) >= self.r_max
            if saved_r_max not in (None, self.r_max) or beyond:
                # Collected, not raised: load_state_dict reports every layer's error at once and
                # this layer keeps its active set.
                source = (f"a layer with r_max={saved_r_max}" if saved_r_max is not None else
                          f"a layer with r_max > {int(saved.max())}")
                error_msgs.append(f"{key} was saved from {source}, but this layer has "
                                  f"r_max={self.r_max}: wrap the model with the saved r_max")
            else:
                # load_state_dict(assign=True) adopts the saved tensors and their device (a
                # model built on the meta device is filled so); otherwise the ids stay put.
                assign = local_metadata.get("assign_to_params_buffers", False)
                self._set_active(saved, saved.device if assign else self.active.device)
            state_dict[key] = self.active
        # State dicts written before the flag was saved are of unmerged layers.
        state_dict.setdefault(prefix + "_extra_state", torch.tensor(False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.merged and prefix + "base_layer.weight" not in state_dict:
            # No saved weight holding ΔW: base_layer keeps its own, so ΔW is added to it.
            self.merged = False
            self.merge()

    # ---- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        x_lora = self.lora_dropout(x) if self.training and not isinstance(self.lora_dropout, nn.Identity) else None
        return ops.varrank_lora(
            x, x_lora, self.base_layer.weight, self.base_layer.bias,
            self.lora_A, self.lora_E, self.lora_B, self.compute_ids(), self.scaling,
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


def refuse_merged(model: nn.Module, who: str) -> None:
    """Refuse a model with merged adapters: a merged layer's forward is the base GEMM alone, so
    its adapter gets no gradient (training, scoring and the sensitivity update would see it as
    absent) and its active set cannot change (the allocator's reallocation would fail)."""
    merged = [name for name, m in model.named_modules() if isinstance(m, VarRankLoRALinear) and m.merged]
    if merged:
        raise ValueError(f"{who}: {len(merged)} adapted layer(s) are merged into their base weight "
                         f"({', '.join(merged[:3])}{' ...' if len(merged) > 3 else ''}); unmerge() "
                         "them first")


def _lora_layers(modules) -> list[VarRankLoRALinear]:
    if isinstance(modules, nn.Module):
        modules = [modules]
    found = []
    for m in modules:
        found += [sub for sub in m.modules() if isinstance(sub, VarRankLoRALinear)]
    return found


class _InactiveGuard:
    """Handle returned by protect_inactive(); ``remove()`` detaches its optimizer hooks.

    The save and restore are batched so that a step costs a handful of ops whatever the number of
    layers (small models are bound by the host's per-op cost, not by bytes moved): the tensors to
    protect (each adapter parameter whose layer has inactive components and that has a gradient,
    plus its per-element optimizer state) are grouped by (parameter kind, shape, dtype, device).
    Per group the pre-hook takes one ``torch.stack`` snapshot; the post-hook selects, elementwise,
    the snapshot on inactive components and the stepped value elsewhere (``torch.where`` against a
    cached component mask) and writes every member back with one ``torch._foreach_copy_``. A
    selection, not arithmetic, so the kept values are bit-for-bit the saved ones, and the active
    ones bit-for-bit what the optimizer wrote. The groups and their masks are rebuilt only when
    what they are made of changes (see ``_groups``).
    """

    # Component dim of each adapter parameter: A is [r_max, in], E [r_max], B [out, r_max]; the
    # mask [r_max] is viewed so that it broadcasts over a member of that shape. The stacked group
    # mask is then materialised at full size: torch.where runs markedly faster on CPU without
    # broadcasting, for one byte per protected element, built only when a group changes.
    _KINDS = (("lora_A", lambda m: m.view(-1, 1)), ("lora_E", lambda m: m),
              ("lora_B", lambda m: m.view(1, -1)))

    def __init__(self, optimizer: torch.optim.Optimizer, layers: list[VarRankLoRALinear]) -> None:
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # (layer, parameter, kind index)
        self._targets = [
            (layer, getattr(layer, name), kind)
            for layer in layers
            for kind, (name, _) in enumerate(self._KINDS)
            if id(getattr(layer, name)) in in_optimizer
        ]
        self._optimizer = optimizer
        self._layers = list(dict.fromkeys(t[0] for t in self._targets))
        # The targets whose layer has inactive components, as of the active-id tensors _actives.
        self._protected: list = []
        self._actives: list[torch.Tensor] = []  # held, so their ids stay theirs
        self._active_keys: list[tuple[int, int]] = []
        self._saved: list = []
        # _groups()'s result and what it was built from (see there)
        self._fingerprint: tuple = ()
        self._fingerprint_tensors: list[torch.Tensor] = []  # held, as _actives
        self._cached_groups: list = []
        # layer -> (its ids_key when the mask was built, bool inactive mask [r_max])
        self._layer_masks: dict[VarRankLoRALinear, tuple[tuple[int, int], torch.Tensor]] = {}
        self._handles = [optimizer.register_step_pre_hook(self._save),
                         optimizer.register_step_post_hook(self._restore)]

    def _layer_mask(self, layer: VarRankLoRALinear) -> torch.Tensor:
        cached = self._layer_masks.get(layer)
        if cached is not None and cached[0] == layer.ids_key():
            return cached[1]
        mask = layer.inactive_mask()
        self._layer_masks[layer] = (layer.ids_key(), mask)
        return mask

    def _groups(self) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """[(member tensors, stacked inactive mask)] for this step.

        Walking every protected parameter's optimizer state costs about 14 us per adapted layer
        in Python (3 ms a step for 210 layers, host time a GPU step of a small model pays), yet
        the groups change only when an active set does (a layer's id tensor is another one), when
        a parameter gains or loses its gradient, or when the optimizer's state tensors do (created
        by the first step, replaced by load_state_dict or by the user). The fingerprint covers
        the active ids and the state with the identities of their tensors, read without hashing a
        parameter, and keeps those tensors alive, so no id is reused while it stands. Entries of
        ``optimizer.state`` that are not a parameter's dict, and non-tensor values (a Python step
        counter), are not members and do not count.
        """
        state = self._optimizer.state
        keys = [layer.ids_key() for layer in self._layers]
        if keys != self._active_keys:
            self._protected = [t for t in self._targets if t[0].active.numel() < t[0].r_max]
            self._actives = [layer.active for layer in self._layers]
            self._active_keys = keys
        tensors = [v for per_param in state.values() if isinstance(per_param, dict)
                   for v in per_param.values() if isinstance(v, torch.Tensor)]
        fingerprint = (keys, [t[1].grad is None for t in self._protected], [id(v) for v in tensors])
        if fingerprint != self._fingerprint:
            self._cached_groups = self._build_groups(state)
            self._fingerprint, self._fingerprint_tensors = fingerprint, tensors
        return self._cached_groups

    def _build_groups(self, state) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        members: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for layer, p, kind in self._protected:
            if p.grad is None:
                continue
            mask = self._layer_mask(layer)
            key = (kind, tuple(p.shape), p.dtype, p.device)
            tensors, masks = members.setdefault(key, ([], []))
            # The parameter and every per-element state tensor (AdamW's exp_avg, exp_avg_sq, ...);
            # scalar state such as "step" is shared by all components and left alone.
            for t in [p, *state.get(p, {}).values()]:
                if torch.is_tensor(t) and t.shape == p.shape and t.dtype == p.dtype \
                        and t.device == p.device:
                    tensors.append(t)
                    masks.append(mask)
        return [(tensors, torch.stack([self._KINDS[key[0]][1](m).expand(key[1]) for m in masks]))
                for key, (tensors, masks) in members.items()]

    @torch.no_grad()
    def _save(self, optimizer, args, kwargs) -> None:
        self._saved = [(tensors, mask, torch.stack(tensors)) for tensors, mask in self._groups()]

    @torch.no_grad()
    def _restore(self, optimizer, args, kwargs) -> None:
        # State tensors created by this very step (the first one) are not in a group: they only
        # saw zero gradients for the inactive components, so they stay as the optimizer left them.
        for tensors, mask, saved in self._saved:
            stepped = torch.stack(tensors)
            torch.where(mask, saved, stepped, out=stepped)
            torch._foreach_copy_(tensors, stepped.unbind(0))
        self._saved = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def protect_inactive(optimizer: torch.optim.Optimizer, modules) -> _InactiveGuard:
    """Keep inactive adapter components exactly as they are across ``optimizer.step()``.

    The op gives inactive components zero gradient, but optimizers with weight decay or momentum
    (AdamW) would still move them, so a component pruned now would come back changed. This
    registers a step pre-hook that copies the inactive rows of lora_A / lora_E / columns of lora_B
    (and the same slices of every per-element optimizer state tensor) and a post-hook that writes
    them back. The active sets are read at each step, so they may change between steps. Cost per
    step: about five ops per group of same-shaped adapter tensors (not per layer), moving the
    protected tensors a few times over, and no host synchronisation. Shared scalar
    state (AdamW's ``step``) keeps counting for all components, so a reactivated component's bias
    correction follows the parameter's step count while its moment rows resume where they stopped.
    A state tensor counts as per-element when it has the parameter's shape, dtype and device, and
    the optimizer must update it in place, as torch.optim's do: one that it replaces during the
    step is written back to the replaced tensor, and the new one goes unprotected. The state a
    parameter's first step creates is left as that step made it: with coupled weight decay (Adam or
    SGD with ``weight_decay``, not AdamW) an inactive component's moment rows then hold the decay
    term of that one step, which it resumes with if it is reactivated.

    ``modules``: a module (searched for VarRankLoRALinear layers) or an iterable of modules.
    Returns a handle whose ``remove()`` detaches the hooks.
    """
    layers = _lora_layers(modules)
    if not layers:
        raise ValueError("protect_inactive: no VarRankLoRALinear layer found in the given modules")
    return _InactiveGuard(optimizer, layers)
