"""Model-based quality score: one batched pass giving every example's G, D, C and Q.

For example i with loss ℓ_i and per-example gradient g_i = ∇_θ ℓ_i over the scored parameters θ:
- G_i = ‖g_i‖₂;
- D_i = ℓ_i(θ) − ℓ_i(θ − η g_i), the loss drop of one SGD step on that example alone
  ('exact'), or its first-order value η·G_i² ('first_order');
- C_i = cos(g_i, ḡ), ḡ the mean gradient of the pool;
- Q_i = α1·z(G_i) + α2·z(D_i) + α3·z(C_i), z = (v − median) / (1.4826·MAD) over the pool;
- score_i, what the Gumbel-top-k selection samples by (p_i ∝ exp(score_i / τ)): Q_i itself
  (preference 'high', the paper), −|Q_i − median Q| (preference 'moderate': the examples of
  typical Q) or 0 (preference 'uniform', the default: the pass only feeds the wrong-label guard,
  because no Q preference beat a random sample at full size); see ``selection_score``.

Per-example gradients are never materialised for the whole model. Every scored parameter belongs to
an ``nn.Linear`` (the task head) or to a ``VarRankLoRALinear`` adapter; a forward hook keeps each
such layer's input x [B, T, in] and a hook on its output keeps the output gradient δ [B, T, out]
of the sum-reduced loss, which is exactly example i's own δ for rows of example i (attention and
layer norm never mix examples). From x and δ:
- nn.Linear: g_W,i = Σ_t δ_t x_tᵀ. Its squared norm is either Σ_{t,t'} (δ_t·δ_t')(x_t·x_t')
  ("ghost norm", cost T²(in+out)) or ‖bmm(δᵀ, x)‖² (cost T·in·out), whichever is cheaper — the
  choice Opacus' ghost clipping makes; bias: ‖Σ_t δ_t‖².
- VarRankLoRALinear (y = base(x) + s·((x A_actᵀ) ⊙ E_act) B_actᵀ): with h = x A_actᵀ and
  u = δ B_act, both [B, T, r], g_B,i = s Σ_t δ_t (h_t⊙E)ᵀ, g_A,i = s Σ_t (u_t⊙E)ᵀ x_t,
  g_E,i = s Σ_t u_t⊙h_t. Only active components count (inactive ones get no gradient).
Dot products with a fixed gradient Ḡ (for C) are Σ_t δ_t·(Ḡ x_t) per linear, so C costs one more
pass once ḡ is known. The exact look-ahead D runs one more batched forward in which every scored
layer computes its output with its own per-example weights θ − η g_i (x' (W − η g_W,i)ᵀ =
x' Wᵀ − η (x' xᵀ) δ for a linear; the r-sized per-example adapter factors for an adapter): exact,
batched, at the cost of one extra forward per batch.

Modes: 'full' scores every trainable parameter; 'head' scores the task head and the adapters of the
last adapted block only; everything else is frozen during the pass, so autograd stops early and
the backward is a small fraction of the forward.

The pass runs in eval mode (dropout off, deterministic) and leaves ``.grad`` untouched.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_QUALITY_WEIGHTS, LOOKAHEADS, MODES, PREFERENCES
from .layers import VarRankLoRALinear, protect_inactive, refuse_merged
from .mislabel import flag_losses, flag_mislabeled, guard_abstains, high_loss_spread
from .files import atomic_write
from .train import _autocast, grad_norm, lora_layers

SCORE_FIELDS = ("index", "loss", "G", "D", "C", "Q", "score", "p_mislabeled")
_NON_INPUT_KEYS = ("labels", "index")


# ---- robust standardization ---------------------------------------------------------------------
def robust_z(values) -> np.ndarray:
    """(v − median) / (1.4826·MAD): the standard score that a few extreme values cannot dominate.

    Falls back to the standard deviation when more than half the values are equal (MAD = 0) and
    returns zeros for a constant input.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v.copy()
    med = float(np.median(v))
    scale = 1.4826 * float(np.median(np.abs(v - med)))
    if scale == 0.0:
        scale = float(v.std())
    if scale == 0.0:
        return np.zeros_like(v)
    return (v - med) / scale


def combine(G, D, C, weights: Sequence[float]) -> np.ndarray:
    """Q = α1·z(G) + α2·z(D) + α3·z(C); a zero weight leaves its term out (C may then be NaN)."""
    a1, a2, a3 = (float(w) for w in weights)
    q = np.zeros(len(G))
    for a, v in ((a1, G), (a2, D), (a3, C)):
        if a != 0.0:
            q += a * robust_z(v)
    return q


def selection_score(Q, preference: str = "uniform") -> np.ndarray:
    """What the selection samples by: p_i ∝ exp(score_i / τ).

    'high': score = Q, the paper's rule: the largest gradients and look-ahead gains first.
    'moderate': score = −|Q − median Q|: the examples of typical Q first, the two extremes last
    (Moderate Coreset, Xia et al., ICLR 2023, selects by the distance to the median score the same
    way). Q rises with the loss, so its top end holds what the model cannot fit — wrong labels and
    ambiguous texts — and its bottom end what it has already learned. Measured on 2,000 Rotten
    Tomatoes reviews (python/experiments/selection_rules.py, results/selection_rules.md): 'high'
    lost 10 points of accuracy to a random subset on clean labels and 20 with 20% flipped (it kept
    45.5% flipped), 'moderate' was +0.2 and -1.6 points from random and kept 7.3% flipped.
    'uniform' (the default): score = 0 wherever Q is finite: a uniform sample of what the gate and
    the wrong-label guard keep, so the scoring pass serves the guard alone. At full size (MiniLM,
    30% of Rotten Tomatoes and BBC News, 3 seeds) 'moderate' lost 1.2 and 0.8 points to a random
    sample on clean labels; 'uniform' is the random sample wherever the guard abstains, and with
    20% flipped BBC labels it kept 0.6% of them (random 19.3%).
    """
    q = np.asarray(Q, dtype=np.float64)
    if preference == "uniform":
        return np.where(np.isfinite(q), 0.0, q)
    if preference == "high":
        return q.copy()
    if preference == "moderate":
        finite = np.isfinite(q)
        if not finite.any():
            return q.copy()
        return -np.abs(q - float(np.median(q[finite])))
    raise ValueError(f"quality preference must be one of {PREFERENCES}, got {preference!r}")


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Every module's train/eval flag: one a caller set on a part of the model (dropout in eval in
    a model in train mode) must come back too, which model.train(flag) would overwrite."""
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


# ---- which parameters are scored ----------------------------------------------------------------
def _block_key(name: str) -> str:
    """The block a module belongs to: its name up to its first numeric component, the index into
    the model's list of blocks ('bert.encoder.layer.5.attention.self.query' -> 'bert.encoder.layer.5';
    T5's 'decoder.block.5.layer.1.EncDecAttention.q' -> 'decoder.block.5', where the last number
    would split the block by its sub-layers)."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: k + 1])
    return name


def scored_modules(model: nn.Module, mode: str = "full") -> list[tuple[str, nn.Module]]:
    """The layers whose trainable parameters the score covers, in model order.

    'full': every layer holding a trainable parameter. 'head': the trainable layers that are not
    adapters (the task head, modules_to_save) plus the adapters of the last adapted block.
    Raises ValueError naming any trainable parameter held by a layer type the pass cannot handle.
    """
    if mode not in MODES:
        raise ValueError(f"score_mode must be one of {MODES}, got {mode!r}")
    owners: list[tuple[str, nn.Module]] = []
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        full = f"{mname}.{own[0][0]}" if mname else own[0][0]
        parent_lora = mname.endswith(".base_layer") or mname == "base_layer"
        if isinstance(module, VarRankLoRALinear):
            owners.append((mname, module))
        elif isinstance(module, nn.Linear) and not parent_lora:
            owners.append((mname, module))
        elif parent_lora:
            raise ValueError(
                f"quality score: trainable parameter {full!r} is the frozen base of an adapter; the "
                "scoring pass covers adapters and task heads only — freeze it (requires_grad_(False))")
        else:
            raise ValueError(
                f"quality score: trainable parameter {full!r} belongs to a {type(module).__name__}, "
                "which the ghost-norm pass does not handle (only nn.Linear heads and "
                "VarRankLoRALinear adapters); freeze it or leave it out of modules_to_save")
    if not owners:
        raise ValueError("quality score: the model has no trainable parameters to score")
    if mode == "full":
        return owners
    adapters = [(n, m) for n, m in owners if isinstance(m, VarRankLoRALinear)]
    last_block = _block_key(adapters[-1][0]) if adapters else None
    return [(n, m) for n, m in owners
            if not isinstance(m, VarRankLoRALinear) or _block_key(n) == last_block]


def _module_params(module: nn.Module) -> list[nn.Parameter]:
    if isinstance(module, VarRankLoRALinear):
        return [p for p in (module.lora_A, module.lora_E, module.lora_B) if p.requires_grad]
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


# ---- per-layer tap: inputs, output grads, and what follows from them ----------------------------
def _widen(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32. The scores' Gram matrices and squared norms overflow float16's
    range (65504) at ordinary activation sizes, and lose most digits in bfloat16."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _outer_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t x_tᵀ‖_F² per example; x [B, T, d], g [B, T, p] -> [B]."""
    T, d, p = x.shape[1], x.shape[2], g.shape[2]
    if T * (d + p) < d * p:  # ghost form: two [B, T, T] Gram matrices
        return (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), x).square().sum((1, 2))


class _Tap:
    """Hooks on one scored layer: keeps its input and output gradient for the current batch, and,
    while ``perturb`` is set, replaces its output by the per-example look-ahead output."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.is_lora = isinstance(module, VarRankLoRALinear)
        self.x: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self.perturb: dict | None = None
        self.out_shape: torch.Size | None = None
        self.handle = module.register_forward_hook(self._forward)

    def reset(self) -> None:
        self.x = self.g = None
        self.perturb = None

    def _forward(self, module, inputs, output):
        if self.perturb is not None:
            return self._perturbed_output(inputs[0], output)
        if self.x is not None:
            raise RuntimeError(
                f"quality score: layer {self.name!r} ran twice in one forward; shared (tied) scored "
                "layers are not supported")
        x = inputs[0].detach()
        self.out_shape = output.shape
        self.x = _widen(x.reshape(x.shape[0], -1, x.shape[-1]))
        if output.requires_grad:
            output.register_hook(self._grad)
        return None

    def _grad(self, grad: torch.Tensor) -> None:
        self.g = _widen(grad.detach().reshape(grad.shape[0], -1, grad.shape[-1]))

    # -- quantities of the current batch ---------------------------------------------------------
    def _lora_parts(self):
        m = self.module
        act = m.active
        a = m.lora_A.detach().index_select(0, act).to(self.x.dtype)    # [r, in]
        e = m.lora_E.detach().index_select(0, act).to(self.x.dtype)    # [r]
        b = m.lora_B.detach().index_select(1, act).to(self.x.dtype)    # [out, r]
        h = self.x @ a.t()                            # [B, T, r]
        u = self.g @ b                                # [B, T, r]
        return act, a, e, b, h, u

    def sq_norms(self) -> torch.Tensor:
        """‖g_i‖² over this layer's scored parameters, [B]."""
        if self.g is None:  # the loss does not depend on this layer: zero gradient
            return torch.zeros(self.x.shape[0], dtype=self.x.dtype, device=self.x.device)
        if self.is_lora:
            m = self.module
            if m.rank == 0:
                return torch.zeros(self.x.shape[0], dtype=self.x.dtype, device=self.x.device)
            _, _, e, _, h, u = self._lora_parts()
            s2 = m.scaling ** 2
            total = torch.zeros(self.x.shape[0], dtype=self.x.dtype, device=self.x.device)
            if m.lora_B.requires_grad:
                total = total + s2 * _outer_sq_norms(h * e, self.g)
            if m.lora_A.requires_grad:
                total = total + s2 * _outer_sq_norms(self.x, u * e)
            if m.lora_E.requires_grad:
                total = total + s2 * (u * h).sum(1).square().sum(1)
            return total
        total = torch.zeros(self.x.shape[0], dtype=self.x.dtype, device=self.x.device)
        if self.module.weight.requires_grad:
            total = total + _outer_sq_norms(self.x, self.g)
        if self.module.bias is not None and self.module.bias.requires_grad:
            total = total + self.g.sum(1).square().sum(1)
        return total

    def dots(self, ref: dict[str, torch.Tensor]) -> torch.Tensor:
        """g_i · Ḡ over this layer's scored parameters, [B]; ref maps parameter attr -> Ḡ."""
        B = self.x.shape[0]
        zero = torch.zeros(B, dtype=self.x.dtype, device=self.x.device)
        if self.g is None:
            return zero
        if self.is_lora:
            m = self.module
            if m.rank == 0:
                return zero
            act, _, e, _, h, u = self._lora_parts()
            s = m.scaling
            total = zero
            if "lora_B" in ref:
                rb = ref["lora_B"].index_select(1, act)                     # [out, r]
                total = total + s * (((h * e) @ rb.t()) * self.g).sum((1, 2))
            if "lora_A" in ref:
                ra = ref["lora_A"].index_select(0, act)                     # [r, in]
                total = total + s * ((self.x @ ra.t()) * (u * e)).sum((1, 2))
            if "lora_E" in ref:
                re_ = ref["lora_E"].index_select(0, act)                    # [r]
                total = total + s * ((u * h).sum(1) @ re_)
            return total
        total = zero
        if "weight" in ref:
            total = total + ((self.x @ ref["weight"].t()) * self.g).sum((1, 2))
        if "bias" in ref:
            total = total + self.g.sum(1) @ ref["bias"]
        return total

    def arm_lookahead(self, eta: float) -> None:
        """Prepare the per-example weights θ − η g_i for the look-ahead forward."""
        m = self.module
        if self.is_lora:
            if self.g is None or m.rank == 0:
                self.perturb = {"skip": True}
                return
            act, a, e, b, h, u = self._lora_parts()
            s = m.scaling
            B = self.x.shape[0]
            pa = a.expand(B, -1, -1)
            pe = e.expand(B, -1)
            pb = b.expand(B, -1, -1)
            if m.lora_A.requires_grad:
                pa = a - eta * s * torch.bmm((u * e).transpose(1, 2), self.x)       # [B, r, in]
            if m.lora_E.requires_grad:
                pe = e - eta * s * (u * h).sum(1)                                   # [B, r]
            if m.lora_B.requires_grad:
                pb = b - eta * s * torch.bmm(self.g.transpose(1, 2), h * e)         # [B, out, r]
            self.perturb = {"A": pa, "E": pe, "B": pb}
        else:
            if self.g is None:
                self.perturb = {"skip": True}
                return
            self.perturb = {"x": self.x, "g": self.g, "eta": eta,
                            "w": m.weight.requires_grad,
                            "b": m.bias is not None and m.bias.requires_grad}

    def _perturbed_output(self, x_new: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        p = self.perturb
        if p.get("skip"):
            return output
        B = x_new.shape[0]
        x3 = x_new.reshape(B, -1, x_new.shape[-1])
        x3w = _widen(x3)  # the perturbation was built in the taps' (widened) dtype
        if self.is_lora:
            m = self.module
            base = m.base_layer(x3)
            lora = torch.bmm(torch.bmm(x3w, p["A"].transpose(1, 2)) * p["E"][:, None, :],
                             p["B"].transpose(1, 2))
            return (base + m.scaling * lora).to(output.dtype).reshape(output.shape)
        out3 = output.reshape(B, -1, output.shape[-1])
        corr = torch.zeros_like(out3, dtype=x3w.dtype)
        if p["w"]:
            corr = corr + torch.bmm(torch.bmm(x3w, p["x"].transpose(1, 2)), p["g"])
        if p["b"]:
            corr = corr + p["g"].sum(1, keepdim=True)
        return (out3 - p["eta"] * corr).to(output.dtype).reshape(output.shape)


# ---- the pass -----------------------------------------------------------------------------------
@dataclass
class QualityScores:
    """Per-example scores of one pool, aligned with ``index`` (the examples' ids in the pool)."""

    index: np.ndarray
    loss: np.ndarray
    G: np.ndarray
    D: np.ndarray
    C: np.ndarray
    Q: np.ndarray
    score: np.ndarray
    p_mislabeled: np.ndarray
    likely_mislabeled: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.index.size)

    def rows(self) -> list[dict]:
        cols = [getattr(self, f) for f in SCORE_FIELDS]
        out = []
        for *vals, flag in zip(*cols, self.likely_mislabeled):
            row = {"index": int(vals[0])}
            for f, v in zip(SCORE_FIELDS[1:], vals[1:]):
                v = float(v)
                row[f] = v if math.isfinite(v) else None
            # The guard's decision itself: p_mislabeled alone cannot tell whether it abstained.
            row["likely_mislabeled"] = bool(flag)
            out.append(row)
        return out


def sequence_classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-example cross-entropy [B] of a sequence-classification model on one batch."""
    inputs = {k: v for k, v in batch.items() if k not in _NON_INPUT_KEYS}
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out
    labels = batch["labels"]
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"quality score: expected logits [B, classes] and labels [B], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels.long(), reduction="none")


def _to_device(batch: dict, device: torch.device) -> dict:
    if "labels" not in batch:
        raise ValueError(f"quality score: every batch needs 'labels'; got keys {sorted(batch)}")
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels, batch_size: int = 32,
                 index=None) -> list[dict]:
    """Cut a tokenized pool into scoring batches (each keeps the examples' pool ``index``)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.shape[0]
    if input_ids.shape[0] != n or attention_mask.shape[0] != n:
        raise ValueError(f"make_batches: input_ids {tuple(input_ids.shape)}, attention_mask "
                         f"{tuple(attention_mask.shape)} and labels ({n},) disagree on the pool size")
    if batch_size < 1:
        raise ValueError(f"make_batches: batch_size must be >= 1, got {batch_size}")
    index = torch.arange(n) if index is None else torch.as_tensor(index, dtype=torch.long)
    if index.shape != (n,):
        raise ValueError(f"make_batches: index has shape {tuple(index.shape)}, expected one id per "
                         f"example ({n},)")
    return [{"input_ids": input_ids[i:i + batch_size], "attention_mask": attention_mask[i:i + batch_size],
             "labels": labels[i:i + batch_size], "index": index[i:i + batch_size]}
            for i in range(0, n, batch_size)]


def _progress(it, total, desc, enabled):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, unit="batch", leave=False)


def _batch_pass(model, batches, taps, params, loss_fn, desc, progress, on_batch) -> None:
    """One forward and backward per batch (sum-reduced loss, so each example's output gradients
    are its own); ``on_batch(batch, losses, grads)`` then reads the taps."""
    device = params[0].device
    try:
        total = len(batches)
    except TypeError:
        total = None
    for batch in _progress(batches, total, desc, progress):
        batch = _to_device(batch, device)
        for t in taps:
            t.reset()
        with torch.enable_grad():
            losses = loss_fn(model, batch)
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
        B = losses.shape[0]
        for t in taps:
            if t.x is None:
                raise RuntimeError(f"quality score: scored layer {t.name!r} was not called in the "
                                   "forward; its parameters cannot be scored")
            if t.x.shape[0] != B:
                raise RuntimeError(f"quality score: layer {t.name!r} saw a batch of {t.x.shape[0]}, "
                                   f"the loss has {B}; the first dimension of every scored layer's "
                                   "input must be the batch")
        on_batch(batch, losses.detach(), grads)


def _per_layer_refs(taps, flat: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split a gradient given per scored parameter (in ``params`` order) into per-tap dicts."""
    refs, pos = [], 0
    for t in taps:
        ref = {}
        for nm in (("lora_A", "lora_E", "lora_B") if t.is_lora else ("weight", "bias")):
            p = getattr(t.module, nm, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                ref[nm] = flat[pos].to(torch.promote_types(p.dtype, torch.float32))
                pos += 1
        refs.append(ref)
    return refs


def score_pool(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    mode: str = "head",
    lookahead: str = "first_order",
    eta: float = 1e-3,
    weights: Sequence[float] = DEFAULT_QUALITY_WEIGHTS,
    compute_alignment: bool | None = None,
    alignment_reference: Iterable[dict] | None = None,
    mislabel_guard: bool = True,
    mislabel_threshold: float = 0.5,
    mislabel_max_spread: float = 0.55,
    preference: str = "uniform",
    loss_fn=sequence_classification_loss,
    progress: bool = True,
) -> QualityScores:
    """Score every example of a pool in batched passes.

    Args:
        model: a model whose trainable parameters are held by ``VarRankLoRALinear`` adapters and
            ``nn.Linear`` heads (what ``tsqlora_ext.wrap`` produces).
        batches: dicts of tensors with ``labels`` [B], the model's inputs (``input_ids``,
            ``attention_mask``, ...) and optionally ``index`` [B] (the examples' ids; else their
            running position). Iterated once, or twice when C is aligned with the pool's own mean.
        mode: 'full' or 'head' (see the module docstring).
        lookahead: 'exact' (one extra batched forward per batch) or 'first_order' (D = η·G²).
        eta: the look-ahead step size η.
        weights: α1..α3 of Q.
        compute_alignment: compute C; default: only when α3 > 0. Without it C is NaN (null).
        alignment_reference: None: ḡ is the pool's mean gradient (the paper's C; a second pass
            over the pool). Batches of a held-out set with trusted labels: ḡ is their mean
            gradient, computed in a pass over them before the pool, and C costs nothing extra.
        mislabel_guard: flag examples whose loss marks them as likely mislabeled.
        mislabel_threshold: flag when P(wrong label) exceeds it.
        mislabel_max_spread: flag nothing when the high-loss component's std / mean exceeds it
            (a tail of model errors, not a cluster of wrong labels; see tsqlora_ext.mislabel).
        preference: 'high', 'moderate' or 'uniform': how ``score`` follows from Q
            (``selection_score``).
        loss_fn: (model, batch) -> per-example losses [B]; the default is cross-entropy on
            ``model(**inputs).logits``.
        progress: show a tqdm bar.
    """
    if lookahead not in LOOKAHEADS:
        raise ValueError(f"lookahead must be one of {LOOKAHEADS}, got {lookahead!r}")
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if len(weights) != 3 or not all(math.isfinite(float(w)) for w in weights):
        raise ValueError(f"weights must be 3 finite numbers (alpha1..3), got {weights}")
    if preference not in PREFERENCES:
        raise ValueError(f"preference must be one of {PREFERENCES}, got {preference!r}")
    if compute_alignment is None:
        compute_alignment = float(weights[2]) != 0.0 or alignment_reference is not None
    if not compute_alignment and float(weights[2]) != 0.0:
        raise ValueError(f"quality score: weights {tuple(weights)} give C the weight alpha3 = "
                         f"{weights[2]}, but compute_alignment=False leaves C undefined (every Q "
                         "would be NaN); set alpha3 to 0 or compute the alignment")
    pool_reference = compute_alignment and alignment_reference is None
    refuse_merged(model, "quality score")
    layers = scored_modules(model, mode)
    params = [p for _, m in layers for p in _module_params(m)]
    scored = {id(p) for p in params}
    if pool_reference and not isinstance(batches, (list, tuple)):
        batches = list(batches)  # iterated twice
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in scored]
    modes = _modes(model)
    taps = [_Tap(n, m) for n, m in layers]
    t0 = time.perf_counter()
    idx_l, loss_l, sq_l, d_l, dot_l = [], [], [], [], []
    grad_sum = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    count = [0]
    refs = None

    def accumulate(batch, losses, grads):
        for acc, g in zip(grad_sum, grads):
            if g is not None:
                acc += g.double()
        count[0] += losses.shape[0]

    def main(batch, losses, grads):
        B = losses.shape[0]
        if pool_reference:
            accumulate(batch, losses, grads)
        sq_l.append(sum(t.sq_norms().double() for t in taps).cpu())
        if refs is not None:
            dot_l.append(sum(t.dots(r).double() for t, r in zip(taps, refs)).cpu())
        if lookahead == "exact":
            for t in taps:
                t.arm_lookahead(eta)
            with torch.no_grad():
                after = loss_fn(model, batch)
            for t in taps:
                t.perturb = None
            d_l.append((losses - after).double().cpu())
        idx = batch.get("index")
        start = sum(x.numel() for x in idx_l)
        idx = torch.arange(start, start + B) if idx is None else torch.as_tensor(idx).cpu().long()
        if idx.shape != (B,):
            raise ValueError(f"quality score: a batch's 'index' has shape {tuple(idx.shape)} for its "
                             f"{B} examples; it needs one id per example")
        idx_l.append(idx)
        loss_l.append(losses.double().cpu())

    def reference():
        mean = [g / count[0] for g in grad_sum]
        return _per_layer_refs(taps, mean), math.sqrt(sum(float(g.square().sum()) for g in mean))

    try:
        for p in frozen:  # 'head' mode: autograd stops at the first scored layer
            p.requires_grad_(False)
        model.eval()
        if alignment_reference is not None and compute_alignment:
            _batch_pass(model, alignment_reference, taps, params, loss_fn,
                        "alignment reference", progress, accumulate)
            if count[0] == 0:
                raise ValueError("quality score: alignment_reference holds no examples")
            refs, ref_norm = reference()
        _batch_pass(model, batches, taps, params, loss_fn, f"scoring ({mode})", progress, main)
        seen = sum(x.numel() for x in idx_l)
        if seen == 0:
            raise ValueError("quality score: the pool is empty")
        if pool_reference:
            refs, ref_norm = reference()
            _batch_pass(model, batches, taps, params, loss_fn, f"alignment ({mode})", progress,
                        lambda b, l, g: dot_l.append(
                            sum(t.dots(r).double() for t, r in zip(taps, refs)).cpu()))
    finally:
        for t in taps:
            t.handle.remove()
            t.reset()
        for p in frozen:
            p.requires_grad_(True)
        _restore_modes(modes)
    index = torch.cat(idx_l).numpy()
    if np.unique(index).size != index.size:
        raise ValueError("quality score: batch 'index' values repeat; each example needs a unique id")
    loss = torch.cat(loss_l).numpy()
    bad = ~np.isfinite(loss)
    if bad.any():
        # Said here: the wrong-label guard's mixture fit would refuse them naming neither.
        raise FloatingPointError(f"quality score: {int(bad.sum())} of {seen} examples have a NaN/inf "
                                 f"loss (the first: index {int(index[bad][0])}): the model's outputs "
                                 "are not finite (a warm-up that diverged?)")
    G = torch.cat(sq_l).clamp_min(0).sqrt().numpy()
    D = torch.cat(d_l).numpy() if lookahead == "exact" else eta * G ** 2
    C = np.full(seen, np.nan)
    if compute_alignment:
        dot = torch.cat(dot_l).numpy()
        denom = G * ref_norm
        C = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    # P(wrong label) is reported even with the guard off; only the guard flags examples.
    if seen >= 2:
        p_wrong, flagged, mix = flag_mislabeled(loss, mislabel_threshold,
                                                max_spread=mislabel_max_spread)
        mixture = {"weights": mix.weights, "means": mix.means, "stds": mix.stds,
                   "converged": mix.converged, "high_loss_spread": high_loss_spread(mix),
                   "guard_abstains": guard_abstains(mix, max_spread=mislabel_max_spread)}
    else:
        p_wrong, flagged, mixture = np.zeros(seen), np.zeros(seen, bool), None
    if not mislabel_guard:
        flagged = np.zeros(seen, bool)
    Q = combine(G, D, C, weights)
    meta = {"mode": mode, "lookahead": lookahead, "eta": eta, "weights": [float(w) for w in weights],
            "alignment": (None if not compute_alignment else "pool" if pool_reference else "held_out"),
            "n": int(seen), "scored_parameters": int(sum(p.numel() for p in params)),
            "scored_layers": [n for n, _ in layers],
            "mislabel_guard": bool(mislabel_guard), "mislabel_threshold": float(mislabel_threshold),
            "mislabel_max_spread": float(mislabel_max_spread),
            "n_likely_mislabeled": int(flagged.sum()), "mixture": mixture,
            "seconds": round(time.perf_counter() - t0, 3)}
    meta["preference"] = preference
    return QualityScores(index, loss, G, D, C, Q, selection_score(Q, preference), p_wrong, flagged,
                         meta)


def score_pool_from_config(model: nn.Module, batches: Iterable[dict], config, *, eta: float = 1e-3,
                           alignment_reference: Iterable[dict] | None = None,
                           progress: bool = True) -> QualityScores:
    """``score_pool`` with mode, look-ahead, weights and guard taken from a ``TsqLoRAConfig``
    (warm up first with ``warmup(model, optimizer, pool, config.score_warmup, seed=config.seed)``)."""
    return score_pool(model, batches, mode=config.score_mode, lookahead=config.lookahead, eta=eta,
                      weights=config.quality_weights, alignment_reference=alignment_reference,
                      mislabel_guard=config.mislabel_guard,
                      mislabel_threshold=config.mislabel_threshold,
                      mislabel_max_spread=config.mislabel_max_spread,
                      preference=config.quality_preference, progress=progress)


# ---- warm-up ------------------------------------------------------------------------------------
def warmup(model: nn.Module, optimizer: torch.optim.Optimizer, pool: dict, steps: int, *,
           batch_size: int = 32, seed: int = 0, loss_fn=sequence_classification_loss,
           max_grad_norm: float = 0.0, bf16: str = "off", progress: bool = True) -> dict:
    """Run ``steps`` optimizer steps on random minibatches of ``pool`` before scoring.

    ``pool`` maps input names (``input_ids``, ``attention_mask``, ``labels``, ...) to tensors with
    the pool on the first dimension. The model carries on into training afterwards (the pipeline's
    training starts a fresh optimizer, and its initial allocation keeps each layer's strongest
    warmed-up components), and the steps get the training loop's protections: inactive adapter
    components stay exactly as they are (``protect_inactive``), the gradient norm is clipped to
    ``max_grad_norm`` (0: not clipped), a step with NaN/inf gradients is skipped whole, and ``bf16``
    is TrainArgs.bf16. Returns a record for the report: steps, examples drawn, steps skipped, seed,
    the mean loss of the first and last steps. Raises FloatingPointError when every step was
    skipped.
    """

    if steps < 0:
        raise ValueError(f"warmup: steps must be >= 0, got {steps}")
    if "labels" not in pool:
        raise ValueError(f"warmup: the pool needs 'labels'; got keys {sorted(pool)}")
    n = int(pool["labels"].shape[0])
    if n == 0 and steps > 0:
        raise ValueError("warmup: the pool is empty")
    refuse_merged(model, "warmup")
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    skipped = 0
    modes = _modes(model)
    model.train()
    guard = protect_inactive(optimizer, model) if lora_layers(model) else None
    t0 = time.perf_counter()
    try:
        for _ in _progress(range(steps), steps, "warm-up", progress):
            pick = torch.randint(n, (min(batch_size, n),), generator=gen)
            batch = {k: v[pick].to(device) for k, v in pool.items() if k != "index"}
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, bf16):
                loss = loss_fn(model, batch).mean()
            loss.backward()
            if math.isfinite(grad_norm(params, max_grad_norm)):
                optimizer.step()
                losses.append(float(loss.detach()))
            else:
                skipped += 1
        optimizer.zero_grad(set_to_none=True)
    finally:
        if guard is not None:
            guard.remove()
        _restore_modes(modes)
    if steps > 0 and skipped == steps:
        raise FloatingPointError(f"warmup: all {steps} steps had NaN/inf gradients and were skipped; "
                                 "lower the learning rate or check the data")
    # Two windows that do not overlap, so that the two losses say whether the loss fell.
    k = max(1, min(5, len(losses) // 2))
    return {"steps": steps, "batch_size": batch_size, "examples": steps * min(batch_size, n),
            "skipped": skipped,
            "seed": seed, "first_loss": float(np.mean(losses[:k])) if losses else None,
            "last_loss": float(np.mean(losses[-k:])) if losses else None,
            "seconds": round(time.perf_counter() - t0, 3)}


# ---- scores file --------------------------------------------------------------------------------
def write_scores(path: str | os.PathLike, scores: QualityScores) -> Path:
    """Write one JSON object per example (index, loss, G, D, C, Q, score, p_mislabeled, and the
    guard's likely_mislabeled) atomically; ``tsqlora select --scores`` reads it (``score`` is what it samples by)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in scores.rows():
                f.write(json.dumps(row, allow_nan=False) + "\n")
    return atomic_write(path, write)


def read_scores(path: str | os.PathLike, mislabel_threshold: float = 0.5) -> QualityScores:
    """Read a scores file; a malformed line raises ValueError naming the file and the line.

    ``likely_mislabeled`` is the guard's decision as written. A file without it (written before
    the field existed) gets the guard refitted on its ``loss`` column with ``mislabel_threshold``,
    as ``tsqlora select --scores`` does.
    """
    path = Path(path)
    cols: dict[str, list] = {f: [] for f in SCORE_FIELDS}
    flags: list = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in SCORE_FIELDS if k not in row]
            if missing:
                raise ValueError(f"{where}: field(s) {missing} missing")
            if not isinstance(row["index"], int) or isinstance(row["index"], bool) or row["index"] < 0:
                raise ValueError(f"{where}: field 'index' must be a non-negative integer, got {row['index']!r}")
            for k in SCORE_FIELDS[1:]:
                v = row[k]
                if v is None:  # how rows() writes a value that is not finite (C, D: not computed)
                    v = math.nan
                elif not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise ValueError(f"{where}: field {k!r} must be a number, got {v!r}")
                cols[k].append(float(v))
            flag = row.get("likely_mislabeled")
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"{where}: field 'likely_mislabeled' must be true or false, got {flag!r}")
            if flags and (flag is None) != (flags[-1] is None):
                raise ValueError(f"{where}: field 'likely_mislabeled' is on some lines and not on others")
            flags.append(flag)
            cols["index"].append(row["index"])
    if not cols["index"]:
        raise ValueError(f"{path}: no scores (the file is empty)")
    index = np.asarray(cols["index"], dtype=np.int64)
    if np.unique(index).size != index.size:
        raise ValueError(f"{path}: an 'index' appears more than once")
    arrays = {k: np.asarray(cols[k]) for k in SCORE_FIELDS[1:]}
    flagged = (np.asarray(flags, dtype=bool) if flags[0] is not None
               else flag_losses(arrays["loss"], mislabel_threshold)[0])
    return QualityScores(index=index, likely_mislabeled=flagged, meta={"source": str(path)}, **arrays)


__all__ = [
    "PREFERENCES", "QualityScores", "SCORE_FIELDS", "combine", "make_batches", "read_scores",
    "robust_z", "score_pool", "selection_score", "score_pool_from_config", "scored_modules", "sequence_classification_loss",
    "warmup", "write_scores",
]
