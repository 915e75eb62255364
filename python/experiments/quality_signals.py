"""Which quality signals see wrong labels? AUC of loss, G, D, C and P(wrong) for flipped labels.

MiniLM with every encoder linear adapted (r_init 12, r_max 24), a pool of the bundled Rotten
Tomatoes train split with a share of its labels flipped on purpose (seeded), a short warm-up on the
noisy pool, then one scoring pass per mode. C is measured in two definitions: aligned with the
pool's own mean gradient (the paper's C) and with the mean gradient of a held-out set with clean
labels (disjoint from the pool). An AUC above 0.5 means the signal is larger on flipped examples;
C is expected to be *lower* on them, so its AUC is reported for -C.

    python python/experiments/quality_signals.py --pool 1000 --warmup 50 --seeds 0 1
writes python/experiments/results/quality_signals.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tsqlora_ext import bundled  # noqa: E402
from tsqlora_ext.layers import VarRankLoRALinear  # noqa: E402
from tsqlora_ext.quality import make_batches, score_pool, warmup  # noqa: E402
from tsqlora_ext.files import atomic_write  # noqa: E402

TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def adapt(model: nn.Module, r_max: int = 24, r_init: int = 12, alpha: float = 16.0) -> nn.Module:
    """Adapt every encoder linear (what tsqlora_ext.wrap does for BERT), train the head."""
    for name, module in list(model.named_modules()):
        for cname, child in list(module.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in TARGETS):
                setattr(module, cname, VarRankLoRALinear(child, r_max, r_init, alpha))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, VarRankLoRALinear):
            for p in (m.lora_A, m.lora_E, m.lora_B):
                p.requires_grad_(True)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model


def auc(score, positive) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def noisy_pool(task, n_pool: int, n_ref: int, flip: float, seed: int):
    """A seeded pool of n_pool train rows with a share `flip` of labels flipped, and n_ref other
    train rows with their labels kept (the held-out clean reference)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(task.train_texts))
    pool, ref = order[:n_pool], order[n_pool:n_pool + n_ref]
    labels = np.asarray(task.train_labels)[pool].copy()
    flipped = np.zeros(n_pool, bool)
    flipped[rng.choice(n_pool, int(round(flip * n_pool)), replace=False)] = True
    k = task.num_labels
    labels[flipped] = (labels[flipped] + rng.integers(1, k, flipped.sum())) % k
    texts = [task.train_texts[i] for i in pool]
    ref_texts = [task.train_texts[i] for i in ref]
    ref_labels = np.asarray(task.train_labels)[ref]
    return texts, labels, flipped, ref_texts, ref_labels


def tokenize(tok, texts, max_length):
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def run(args, seed: int) -> dict:
    from transformers import AutoTokenizer, BertForSequenceClassification

    task = bundled.rotten_tomatoes()
    texts, labels, flipped, ref_texts, ref_labels = noisy_pool(task, args.pool, args.ref, args.flip, seed)
    tok = AutoTokenizer.from_pretrained(bundled.minilm_dir())
    ids, mask = tokenize(tok, texts, args.max_length)
    rids, rmask = tokenize(tok, ref_texts, args.max_length)
    torch.manual_seed(seed)
    model = adapt(BertForSequenceClassification.from_pretrained(bundled.minilm_dir(), num_labels=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    labels_t = torch.as_tensor(labels)
    rec = warmup(model, opt, {"input_ids": ids, "attention_mask": mask, "labels": labels_t},
                 steps=args.warmup, batch_size=32, seed=seed, progress=False)
    batches = make_batches(ids, mask, labels_t, batch_size=32)
    ref_batches = make_batches(rids, rmask, torch.as_tensor(ref_labels), batch_size=32)
    out = {"seed": seed, "warmup": rec, "modes": {}}
    for mode in args.modes:
        t0 = time.perf_counter()
        pool_c = score_pool(model, batches, mode=mode, lookahead="exact", eta=args.eta,
                            compute_alignment=True, progress=False)
        t_pool = time.perf_counter() - t0
        t0 = time.perf_counter()
        held = score_pool(model, batches, mode=mode, lookahead="first_order", eta=args.eta,
                          alignment_reference=ref_batches, progress=False)
        t_held = time.perf_counter() - t0
        flagged = pool_c.likely_mislabeled
        row = {
            "auc": {
                "loss": auc(pool_c.loss, flipped),
                "G": auc(pool_c.G, flipped),
                "D_exact": auc(pool_c.D, flipped),
                "D_first_order": auc(held.D, flipped),
                "-C_pool_mean": auc(-pool_c.C, flipped),
                "-C_held_out_clean": auc(-held.C, flipped),
                "p_mislabeled": auc(pool_c.p_mislabeled, flipped),
                "Q_default_pool_C": auc(pool_c.Q, flipped),
            },
            "guard": {
                "flagged": int(flagged.sum()),
                "flipped": int(flipped.sum()),
                "precision": float(flipped[flagged].mean()) if flagged.any() else None,
                "recall": float(flagged[flipped].mean()),
                "pool_flip_share": float(flipped.mean()),
                "kept_flip_share": float(flipped[~flagged].mean()),
                "mixture": pool_c.meta["mixture"],
            },
            "seconds": {"exact_D_plus_pool_C": round(t_pool, 2), "first_order_plus_held_out_C": round(t_held, 2)},
        }
        out["modes"][mode] = row
        print(f"seed {seed} {mode}: " + json.dumps(row["auc"], default=lambda v: round(v, 3)))
        print(f"   guard: {row['guard']['flagged']} flagged, precision {row['guard']['precision']}, "
              f"recall {row['guard']['recall']:.3f}; seconds {row['seconds']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--ref", type=int, default=256, help="held-out clean examples for C's reference")
    p.add_argument("--flip", type=float, default=0.2)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eta", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["head", "full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "quality_signals.json")
    args = p.parse_args()
    runs = [run(args, s) for s in args.seeds]
    summary = {}
    for mode in args.modes:
        keys = runs[0]["modes"][mode]["auc"].keys()
        summary[mode] = {k: {"mean": float(np.mean([r["modes"][mode]["auc"][k] for r in runs])),
                             "std": float(np.std([r["modes"][mode]["auc"][k] for r in runs]))}
                         for k in keys}
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__, "summary_auc": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
