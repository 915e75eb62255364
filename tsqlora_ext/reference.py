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


# =================================================================================================
# Text heuristics: the pure-Python specification of the heuristic gate (csrc/data/heuristics.h).
# Written for clarity; the C++ gate must give identical reasons and features.
# =================================================================================================

import functools as _functools
import itertools as _itertools
import re as _re
from collections import Counter as _Counter

import numpy as _np

GATE_REASONS = ("kept", "empty", "too_short", "too_long", "symbol_ratio", "non_alpha_ratio",
                "repeated_lines", "repeated_ngrams", "exact_duplicate", "near_duplicate")

# CJK ideographs and kana (csrc/data/text_util.h, is_own_word): each a word of its own.
_OWN_WORD = ("\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
             "\U00020000-\U0003ffff")
# words: runs of what is neither (ASCII) whitespace nor _OWN_WORD, and each _OWN_WORD code point
_WORD = _re.compile(rf"[{_OWN_WORD}]|[^ \t\n\r\x0b\x0c{_OWN_WORD}]+")
_ASCII_WS = " \t\n\r\x0b\x0c"
_M64 = (1 << 64) - 1
_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def is_letter(ch: str) -> bool:
    """The gate's "letter": ASCII letters, U+00C0-U+024F except × ÷, and U+0370 on outside the
    punctuation/symbol blocks U+2000-U+2BFF, U+3000-U+303F, U+FE00-U+FFFF, U+1F000-U+1FAFF."""
    cp = ord(ch)
    if cp < 0x80:
        return ch.isascii() and ch.isalpha()
    if 0xC0 <= cp <= 0x24F:
        return cp not in (0xD7, 0xF7)
    if cp < 0x370:
        return False
    return not (0x2000 <= cp <= 0x2BFF or 0x3000 <= cp <= 0x303F or 0xFE00 <= cp <= 0xFFFF
                or 0x1F000 <= cp <= 0x1FAFF)


def splitmix64(x):
    """splitmix64 on Python ints or numpy uint64 arrays (wrapping arithmetic)."""
    if isinstance(x, _np.ndarray):
        x = x + _np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _np.uint64(30))) * _np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _np.uint64(27))) * _np.uint64(0x94D049BB133111EB)
        return x ^ (x >> _np.uint64(31))
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@_functools.lru_cache(maxsize=1 << 20)
def word_hash(word: str) -> int:
    """FNV-1a 64 of the word's ASCII-lowercased UTF-8 bytes."""
    h = _FNV_OFFSET
    for b in word.encode().lower():
        h = ((h ^ b) * _FNV_PRIME) & _M64
    return h


def _ngram_fracs(words: list[str], lower: list[bytes], n: int) -> tuple[float, float]:
    """(top, dup) for word n-grams of ASCII-lowercased words: top = max over repeated n-grams of
    count·chars / chars; dup = chars of words covered by a repeated n-gram / chars."""
    prefix = [0, *_itertools.accumulate(len(w) for w in words)]
    total = prefix[-1]
    grams = list(zip(*(lower[k:] for k in range(n))))
    if len(grams) < 2 or total == 0:
        return 0.0, 0.0
    counts = _Counter(grams)
    top, covered = 0, bytearray(len(words))
    for i, g in enumerate(grams):
        c = counts[g]
        if c >= 2:
            top = max(top, c * (prefix[i + n] - prefix[i]))
            covered[i:i + n] = b"\x01" * n
    return top / total, sum(len(w) for w, c in zip(words, covered) if c) / total


def text_features(text: str, cfg) -> list[float]:
    """The per-document features (columns as in _C.GateConfig feature names)."""
    words = _WORD.findall(text)
    nw = len(words)
    chars = sum(len(w) for w in words)
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    lines = [ln.strip(_ASCII_WS) for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    feats = [float(nw), float(chars), symbols / max(nw, 1),
             sum(not any(is_letter(c) for c in w) for w in words) / nw if nw else 0.0,
             (len(lines) - len(set(lines))) / len(lines) if lines else 0.0]
    use_ngrams = cfg.repeated_ngrams and nw >= cfg.ngram_min_words
    lower = [w.encode().lower() for w in words] if use_ngrams else []
    feats += [_ngram_fracs(words, lower, n)[0] if use_ngrams else 0.0 for n, _ in cfg.top_ngram]
    feats += [_ngram_fracs(words, lower, n)[1] if use_ngrams else 0.0 for n, _ in cfg.dup_ngram]
    return feats


def _doc_reason(f: list[float], cfg) -> str:
    nt = len(cfg.top_ngram)
    if cfg.length and f[0] == 0:
        return "empty"
    if cfg.length and f[0] < cfg.min_words:
        return "too_short"
    if cfg.length and f[0] > cfg.max_words:
        return "too_long"
    if cfg.symbol_ratio and f[2] > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if cfg.non_alpha_ratio and f[3] > cfg.max_non_alpha_ratio:
        return "non_alpha_ratio"
    if cfg.repeated_lines and f[4] > cfg.max_dup_line_frac:
        return "repeated_lines"
    if cfg.repeated_ngrams and (any(f[5 + k] > t for k, (_, t) in enumerate(cfg.top_ngram)) or
                                any(f[5 + nt + k] > t for k, (_, t) in enumerate(cfg.dup_ngram))):
        return "repeated_ngrams"
    return "kept"


def minhash_signature(words: list[str], cfg) -> _np.ndarray | None:
    """bands·rows 32-bit min-hashes over shingles of shingle_size words (all words when fewer):
    shingle hash = splitmix64(FNV-style fold of the word hashes); value j = high 32 bits of
    min_s splitmix64(hash(s) ^ splitmix64(seed + j))."""
    if not words:
        return None
    P = cfg.bands * cfg.rows
    width = min(len(words), cfg.shingle_size)
    wh = _np.array([word_hash(w) for w in words], dtype=_np.uint64)
    m = len(words) - width + 1
    h = _np.full(m, _FNV_OFFSET, dtype=_np.uint64)
    for k in range(width):
        h = (h ^ wh[k:k + m]) * _np.uint64(_FNV_PRIME)
    shingles = splitmix64(h)
    perm = splitmix64((_np.uint64(cfg.minhash_seed) + _np.arange(P, dtype=_np.uint64)))
    mins = splitmix64(shingles[:, None] ^ perm[None, :]).min(axis=0)
    return (mins >> _np.uint64(32)).astype(_np.uint32)


def _band_hash(sig: _np.ndarray, band: int, rows: int) -> int:
    h = band
    for v in sig[band * rows:(band + 1) * rows]:
        h = splitmix64(h ^ int(v))
    return h


def heuristic_gate(texts: list[str], cfg) -> tuple[list[str], list[list[float]]]:
    """Reasons ("kept" or the first failing rule) and features for every text; cfg is a
    tsqlora_ext._C.GateConfig (or anything with its attributes)."""
    feats = [text_features(t, cfg) for t in texts]
    reasons = [_doc_reason(f, cfg) for f in feats]
    if cfg.exact_dup:
        seen: set[tuple[bytes, ...]] = set()
        for i, t in enumerate(texts):
            if reasons[i] != "kept":
                continue
            key = tuple(w.encode().lower() for w in _WORD.findall(t))
            if key in seen:
                reasons[i] = "exact_duplicate"
            seen.add(key)
    if cfg.near_dup:
        eligible = [i for i, r in enumerate(reasons) if r == "kept"]
        sigs = {i: minhash_signature(_WORD.findall(texts[i]), cfg) for i in eligible}
        P = cfg.bands * cfg.rows
        buckets: list[dict[int, list[int]]] = [{} for _ in range(cfg.bands)]
        near = []
        for i in eligible:  # index order: i is compared with the earlier eligible documents only
            sig = sigs[i]
            if sig is None:
                continue
            found = False
            for b in range(cfg.bands):
                members = buckets[b].setdefault(_band_hash(sig, b, cfg.rows), [])
                if not found:
                    found = any(float((sigs[j] == sig).sum()) >= cfg.near_dup_threshold * P for j in members)
                members.append(i)
            if found:
                near.append(i)
        for i in near:
            reasons[i] = "near_duplicate"
    return reasons, feats

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
    check_finite: bool = True,
) -> None:
    """The fused importance update, in place, over all layers.

    For every element p of A [r, in], E [r], B [out, r] of an ACTIVE component (row k of A, entry k
    of E, column k of B): I = |p ∇p|, Ī ← β1 Ī + (1−β1) I, Ū ← β2 Ū + (1−β2) |I − Ī| (with the new
    Ī), s = Ī Ū; and S_k = s(E_k) + mean_j s(A_kj) + mean_j s(B_jk) is written to scores.
    ipt_avg[l] / unc_avg[l] hold layer l's A, E, B elements flat in that order (float32);
    active_mask and scores are flat over all layers' components. Inactive components keep their
    EMAs and score. If any gradient of an active component is NaN/inf as float32 (the update's
    arithmetic: a float64 gradient beyond float32's range counts as inf), nothing changes except
    counters[1] += 1; otherwise counters[0] += 1. ``check_finite=False``: the caller vouches that
    the gradients are finite, and the update is applied without looking.
    """
    grads_ok = True
    offset = 0
    for ga, ge, gb in zip(grad_A, grad_E, grad_B) if check_finite else ():
        act = active_mask[offset:offset + ga.shape[0]]
        offset += ga.shape[0]
        for g in (ga[act], ge[act], gb[:, act]):
            grads_ok = grads_ok and bool(torch.isfinite(g.float()).all())
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


def topk_realloc(scores: torch.Tensor, bounds: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep-mask [n] of the best components under per-layer bounds.

    bounds is the [3, L] table of rows sizes, r_min, r_max (ops.realloc_bounds). Layer l owns
    sizes[l] consecutive entries of scores. Order each layer by (score desc, flat
    index asc; NaN counts as -inf); its first r_min[l] are kept, its next min(r_max[l], size) −
    r_min[l] are candidates; of all candidates the best min(budget, Σ min(r_max, size)) − Σ r_min
    by the same key are kept. budget < Σ r_min, or no layer at all, raises ValueError (the ops
    refuse both too).
    """
    sizes, r_min, r_max = bounds.tolist()
    if not sizes:
        raise ValueError("topk_realloc: bounds must name at least one layer")
    if budget < sum(r_min):
        raise ValueError(f"topk_realloc: budget {budget} is below the sum of r_min ({sum(r_min)})")
    # Only NaN is remapped: nan_to_num's default would also clamp ±inf to finite values, ranking
    # a NaN below a real -inf (the ops tie them).
    vals = torch.nan_to_num(scores.double(), nan=float("-inf"), posinf=float("inf"),
                            neginf=float("-inf")).tolist()

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
