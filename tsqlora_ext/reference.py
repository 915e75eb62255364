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


# ---- sensitivity and rank reallocation -----------------------------------------------------------


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
    """The fused importance update, in place, over all layers.

    For every element p of A [r, in], E [r], B [out, r] of an ACTIVE component (row k of A, entry k
    of E, column k of B): I = |p ∇p|, Ī ← β1 Ī + (1−β1) I, Ū ← β2 Ū + (1−β2) |I − Ī| (with the new
    Ī), s = Ī Ū; and S_k = s(E_k) + mean_j s(A_kj) + mean_j s(B_jk) is written to scores.
    ipt_avg[l] / unc_avg[l] hold layer l's A, E, B elements flat in that order (float32);
    active_mask and scores are flat over all layers' components. Inactive components keep their
    EMAs and score. If any gradient of an active component is NaN/inf, nothing changes except
    counters[1] += 1; otherwise counters[0] += 1.
    """
    grads_ok = True
    offset = 0
    for ga, ge, gb in zip(grad_A, grad_E, grad_B):
        act = active_mask[offset:offset + ga.shape[0]]
        offset += ga.shape[0]
        for g in (ga[act], ge[act], gb[:, act]):
            grads_ok = grads_ok and bool(torch.isfinite(g).all())
    if not grads_ok:
        counters[1] += 1
        return
    offset = 0
    for a, e, b, ga, ge, gb, ipt, unc in zip(lora_A, lora_E, lora_B, grad_A, grad_E, grad_B,
                                             ipt_avg, unc_avg):
        r, n_in = a.shape
        n_out = b.shape[0]
        act = active_mask[offset:offset + r]
        p = torch.cat([a.flatten(), e.flatten(), b.flatten()]).float()
        g = torch.cat([ga.flatten(), ge.flatten(), gb.flatten()]).float()
        # Which component each flat element belongs to, to update active components only.
        comp = torch.cat([
            torch.arange(r, device=a.device).repeat_interleave(n_in),
            torch.arange(r, device=a.device),
            torch.arange(r, device=a.device).repeat(n_out),
        ])
        upd = act[comp]
        imp = (p * g).abs()
        new_ipt = beta1 * ipt + (1 - beta1) * imp
        new_unc = beta2 * unc + (1 - beta2) * (imp - new_ipt).abs()
        ipt.copy_(torch.where(upd, new_ipt, ipt))
        unc.copy_(torch.where(upd, new_unc, unc))
        s = ipt * unc
        s_a = s[: r * n_in].view(r, n_in).mean(dim=1)
        s_e = s[r * n_in: r * n_in + r]
        s_b = s[r * n_in + r:].view(n_out, r).mean(dim=0)
        seg = scores[offset:offset + r]
        seg.copy_(torch.where(act, s_e + s_a + s_b, seg))
        offset += r
    counters[0] += 1


def layer_sensitivity(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Σ |W ⊙ (δᵀX)| with W [out, in], X [..., in], δ [..., out] (leading dims flattened).

    δᵀX is the gradient of the loss w.r.t. W, so this is the first-order estimate of the loss
    change from removing W. Computed in float64 when any input is float64, else float32.
    """
    dtype = torch.float64 if torch.float64 in (weight.dtype, x.dtype, grad_out.dtype) else torch.float32
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    d2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
    return (weight.to(dtype) * (d2.t() @ x2)).abs().sum()


def topk_realloc(
    scores: torch.Tensor, sizes: list[int], r_min: list[int], r_max: list[int], budget: int
) -> torch.Tensor:
    """Keep-mask [n] of the best components under per-layer bounds.

    Layer l owns sizes[l] consecutive entries of scores. Order each layer by (score desc, flat
    index asc; NaN counts as -inf); its first r_min[l] are kept, its next min(r_max[l], size) −
    r_min[l] are candidates; of all candidates the best min(budget, Σ min(r_max, size)) − Σ r_min
    by the same key are kept. budget < Σ r_min raises ValueError.
    """
    if budget < sum(r_min):
        raise ValueError(f"topk_realloc: budget {budget} is below the sum of r_min ({sum(r_min)})")
    vals = torch.nan_to_num(scores.double(), nan=float("-inf")).tolist()

    def key(i):
        return (-vals[i], i)

    keep = [False] * len(vals)
    candidates = []
    start = 0
    for size, lo, hi in zip(sizes, r_min, r_max):
        order = sorted(range(start, start + size), key=key)
        for i in order[:lo]:
            keep[i] = True
        candidates += order[lo:min(hi, size)]
        start += size
    extra = min(budget, sum(min(h, s) for h, s in zip(r_max, sizes))) - sum(r_min)
    for i in sorted(candidates, key=key)[:extra]:
        keep[i] = True
    return torch.tensor(keep, dtype=torch.bool, device=scores.device)
