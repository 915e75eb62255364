"""Does the wrong-label guard keep flipped labels out of the selected subset?

A pool of the bundled Rotten Tomatoes train split with a seeded share of its labels flipped on
purpose; MiniLM wrapped as ``tsqlora demo`` wraps it (r_init 12, r_max 16); the warm-up of
``score_warmup`` optimizer steps (batch 32, AdamW) on the noisy pool, then the 'head' scoring pass
after each warm-up length in ``--steps`` (the same run continues, so 40 -> 100 -> 200 steps costs
200 steps in all). For every warm-up length and guard rule it reports:

- the AUC of the per-example loss for flipped labels (0.5: no signal);
- how many examples the guard flags, and its precision and recall on the flipped ones;
- the share of flipped labels among the examples kept after guard + Gumbel-top-k selection of
  Q = (z(G) + z(D)) / 2 at ``--fraction`` (tsqlora_ext.select, stratified, temperature 1), against
  the pool's share and against a random selection of the same size.

    python python/experiments/noisy_labels.py --pool 3000 --flips 0 0.2 --steps 40 100 200 \
        --lrs 1e-3 2e-3 --seeds 0

writes python/experiments/results/noisy_labels.json (atomically). ``--dump DIR`` also saves each
run's losses, labels, flip mask and Q as .npz; ``--from-dumps DIR`` re-evaluates the guard rules on
such saved runs without re-running the model (the guard and the selection only read the losses, Q
and labels). The committed results come from

    python python/experiments/noisy_labels.py --pool 2000 --flips 0 0.2 --steps 40 120 \
        --dump python/experiments/results/noisy_labels_runs
    python python/experiments/noisy_labels.py --from-dumps python/experiments/results/noisy_labels_runs

Guard rules compared: 'default' (tsqlora_ext.mislabel.flag_mislabeled with its defaults: mixture
posterior > threshold, abstaining when the high-loss component is a majority or a tail),
'mixture_only' (the same without the tail rule: the guard before the spread rule) and 'none'.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tsqlora_ext import bundled  # noqa: E402
from tsqlora_ext.config import TsqLoRAConfig  # noqa: E402
from tsqlora_ext.mislabel import flag_mislabeled  # noqa: E402
from tsqlora_ext.quality import combine, make_batches, score_pool, warmup  # noqa: E402
from tsqlora_ext.selector import select  # noqa: E402


def auc(score, positive) -> float | None:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def noisy_pool(task, n_pool: int, flip: float, seed: int):
    """n_pool seeded train rows; a share ``flip`` of them get another label (seeded)."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(task.train_texts))[:n_pool]
    labels = np.asarray(task.train_labels)[pick].copy()
    flipped = np.zeros(n_pool, bool)
    flipped[rng.choice(n_pool, int(round(flip * n_pool)), replace=False)] = True
    k = task.num_labels
    labels[flipped] = (labels[flipped] + rng.integers(1, k, int(flipped.sum()))) % k
    return [task.train_texts[i] for i in pick], labels, flipped


def guard_rules(threshold: float) -> dict:
    """name -> losses, labels -> flagged mask. 'default' is the library's rule as configured."""
    return {
        "default": lambda loss, y: flag_mislabeled(loss, threshold)[1],
        "mixture_only": lambda loss, y: flag_mislabeled(loss, threshold, max_spread=np.inf)[1],
        "none": lambda loss, y: np.zeros(len(loss), bool),
    }


def evaluate(loss, labels, flipped, q, texts, rules: dict, fraction: float, seed: int) -> dict:
    import pandas as pd

    df = pd.DataFrame({"text": texts, "label": labels})
    pool_share = float(flipped.mean())
    rnd = select(df, text_field="text", label_field="label", fraction=fraction, seed=seed, gate=False)
    random_share = float(flipped[rnd.indices].mean())
    out = {"loss_auc": auc(loss, flipped), "pool_flip_share": pool_share,
           "random_kept_flip_share": random_share, "rules": {}}
    for name, rule in rules.items():
        flagged = np.asarray(rule(loss, labels), bool)
        sel = select(df, text_field="text", label_field="label", scores=q, fraction=fraction,
                     seed=seed, gate=False, drop={"likely_mislabeled": flagged})
        kept = np.asarray(sel.indices)
        n_flag = int(flagged.sum())
        out["rules"][name] = {
            "flagged": n_flag,
            "flagged_share": n_flag / len(loss),
            "precision": float(flipped[flagged].mean()) if n_flag else None,
            "recall": float(flagged[flipped].mean()) if flipped.any() else None,
            "survivor_flip_share": float(flipped[~flagged].mean()),
            "kept": int(kept.size),
            "kept_flip_share": float(flipped[kept].mean()),
        }
    return out


def run(args, flip: float, lr: float, seed: int, task, tok) -> list[dict]:
    from transformers import AutoModelForSequenceClassification

    from tsqlora_ext.wrap import wrap

    texts, labels, flipped = noisy_pool(task, args.pool, flip, seed)
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.max_length,
              return_tensors="pt")
    labels_t = torch.as_tensor(labels)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(bundled.minilm_dir(),
                                                               num_labels=task.num_labels)
    config = TsqLoRAConfig(r_init=12, target_r=8, r_max=16, r_min=2, lora_alpha=16.0, seed=seed)
    model = wrap(model, config, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    pool = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels_t}
    batches = make_batches(enc["input_ids"], enc["attention_mask"], labels_t, batch_size=64)
    rows, done, warm_s = [], 0, 0.0
    name = f"flip{flip:g}_lr{lr:g}_seed{seed}"
    for k, steps in enumerate(sorted(args.steps)):
        rec = warmup(model, opt, pool, steps - done, batch_size=32, seed=seed * 1000 + k,
                     progress=False)
        done = steps
        warm_s += rec["seconds"]
        t0 = time.perf_counter()
        s = score_pool(model, batches, mode="head", weights=(0.5, 0.5, 0.0), mislabel_guard=False,
                       progress=False)
        score_s = time.perf_counter() - t0
        q = combine(s.G, s.D, s.C, (0.5, 0.5, 0.0))
        row = {"flip": flip, "lr": lr, "seed": seed, "warmup_steps": steps,
               "warmup_last_loss": rec["last_loss"], "warmup_s": round(warm_s, 1),
               "score_s": round(score_s, 1),
               **evaluate(s.loss, labels, flipped, q, texts, guard_rules(args.threshold),
                          args.fraction, seed)}
        rows.append(row)
        d = row["rules"]["default"]
        print(f"flip {flip:.2f} lr {lr:g} seed {seed} steps {steps:4d}: loss AUC "
              f"{row['loss_auc'] if row['loss_auc'] is None else round(row['loss_auc'], 3)}, "
              f"flagged {d['flagged']} (precision {d['precision']}, recall {d['recall']}); kept "
              f"flipped {d['kept_flip_share']:.3f} vs pool {row['pool_flip_share']:.3f}, random "
              f"{row['random_kept_flip_share']:.3f}; warm-up {warm_s:.0f}s, scoring {score_s:.0f}s",
              flush=True)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.dump / f"{name}_steps{steps}.npz",
                                loss=s.loss.astype(np.float32), labels=labels.astype(np.int8),
                                flipped=flipped, q=q.astype(np.float32),
                                meta=json.dumps({k: v for k, v in row.items() if k != "rules"}))
    return rows


def from_dumps(args) -> list[dict]:
    rows = []
    for f in sorted(args.from_dumps.glob("*.npz")):
        d = np.load(f)
        meta = json.loads(str(d["meta"]))
        loss, labels, flipped = d["loss"].astype(np.float64), d["labels"], d["flipped"]
        # The selection runs without the text gate, so the texts themselves are not needed.
        texts = ["-"] * len(loss)
        ev = evaluate(loss, labels, flipped, d["q"].astype(np.float64), texts,
                      guard_rules(args.threshold), args.fraction, meta["seed"])
        rows.append({**{k: meta[k] for k in ("flip", "lr", "seed", "warmup_steps",
                                              "warmup_last_loss", "warmup_s", "score_s")},
                     "source": f.name, **ev})
    if not rows:
        raise SystemExit(f"{args.from_dumps}: no .npz runs")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| flipped | warm-up steps | loss AUC | rule | flagged | precision | recall | "
             "flipped in kept 30% | pool | random 30% |", "|" + "---|" * 10]
    for r in rows:
        for name, g in r["rules"].items():
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"| {r['flip']:.0%} | {r['warmup_steps']} | {fmt(r['loss_auc'])} | {name} | "
                         f"{g['flagged']} | {fmt(g['precision'])} | {fmt(g['recall'])} | "
                         f"{g['kept_flip_share']:.3f} | {r['pool_flip_share']:.3f} | "
                         f"{r['random_kept_flip_share']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=3000)
    p.add_argument("--flips", type=float, nargs="+", default=[0.0, 0.2])
    p.add_argument("--steps", type=int, nargs="+", default=[40, 100, 200],
                   help="warm-up lengths scored (one continuing run)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--threshold", type=float, default=TsqLoRAConfig().mislabel_threshold)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dump", type=Path, default=None)
    p.add_argument("--from-dumps", type=Path, default=None)
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "noisy_labels.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_dumps:
        rows = from_dumps(args)
    else:
        from transformers import AutoTokenizer

        task = bundled.rotten_tomatoes()
        tok = AutoTokenizer.from_pretrained(bundled.minilm_dir())
        rows = [r for flip in args.flips for lr in args.lrs for seed in args.seeds
                for r in run(args, flip, lr, seed, task, tok)]
    print(table(rows))
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
