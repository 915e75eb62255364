"""Which examples should quality selection prefer? One warm-up and scoring pass, several rules.

For each (task, share of flipped labels, seed): the TsqLoRA model of ``tsqlora demo`` warms up for
``score_warmup`` steps on the noisy pool and scores it once ('head' mode, Q = (z(G) + z(D)) / 2);
then, from copies of that same warmed-up model, each rule selects ``--fraction`` of the pool
(tsqlora_ext.select, stratified, temperature 1, the wrong-label guard as configured) and trains
with the demo's settings, and the test accuracy is recorded. Sharing the warm-up and the scores
isolates the rule: the runs differ only in which examples they train on.

Rules: ``random`` (uniform), ``guarded`` (uniform among the examples the wrong-label guard keeps:
what the guard alone is worth), ``high`` (p ∝ exp(Q), the paper's preference), ``moderate``
(p ∝ exp(−|Q − median Q|), typical Q first), ``low`` (p ∝ exp(−Q), the easiest first),
``small_loss`` (p ∝ exp(−z(loss) / 0.25): the examples the warmed-up model already fits, the
small-loss trick of Co-teaching, Han et al. 2018, against wrong labels); all but ``random`` after the
wrong-label guard.

    python python/experiments/selection_rules.py --datasets rotten_tomatoes --pool 4000 \\
        --eval 1000 --flips 0 0.2 --seeds 0 1 --jobs 2

writes results/selection_rules.json and .md (each finished (task, flip, seed) appended at once;
a rerun adds the (task, flip, seed, rule) runs the file does not hold yet).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_labels import (DATASETS, fit_schedule, flip_labels, load_task, watch_parent,  # noqa: E402
                          write_atomic)

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("random", "guarded", "high", "moderate", "low", "small_loss")
# From one look at the post-warm-up losses of the full Rotten Tomatoes pool with 20% flipped (seed
# 0): Gumbel-top-30% of -z(loss)/tau kept 5.2-5.5% flipped at tau 0.1-0.25, 7.0% at 0.5, 10.5% at
# 1. Every run records its own share.
SMALL_LOSS_TAU = 0.25


def run_group(job: dict) -> list[dict]:
    import pandas as pd
    import torch
    import transformers

    from tsqlora_ext import bundled
    from tsqlora_ext.pipeline import _load_model, _score, demo_settings
    from tsqlora_ext.quality import robust_z, selection_score
    from tsqlora_ext.selector import select
    from tsqlora_ext.train import TokenizedData, train
    from tsqlora_ext.wrap import wrap

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(job["threads"])
    config, targs, _ = demo_settings()
    config = config.replace(seed=job["seed"], data_fraction=job["fraction"])
    targs = targs.from_dict({**targs.to_dict(), "progress": False, "num_workers": 1})
    task = load_task(job["dataset"], job["pool"], job["eval"])
    labels, flipped = flip_labels(task.train_labels, len(task.label_names), job["flip"], job["seed"])
    model, tok = _load_model(bundled.minilm_dir(), task.label_names, config.seed)
    model = wrap(model, config, verbose=False)
    train_all = TokenizedData.from_texts(tok, task.train_texts, labels, targs.max_length)
    eval_tok = TokenizedData.from_texts(tok, task.eval_texts, task.eval_labels, targs.max_length)
    _, scores = _score(model, tok, train_all, config, targs)
    order = np.argsort(scores.index)
    q, flagged, loss = scores.Q[order], scores.likely_mislabeled[order], scores.loss[order]
    df = pd.DataFrame({"text": task.train_texts, "label": labels})
    out = []
    for rule in job["rules"]:
        kw = {}
        if rule != "random":
            s = {"guarded": np.zeros_like(q), "high": q, "moderate": selection_score(q, "moderate"),
                 "low": -q, "small_loss": -robust_z(loss) / SMALL_LOSS_TAU}[rule]
            kw = {"scores": s, "drop": {"likely_mislabeled": flagged}}
        # Every rule trains on the same number of examples: the fraction of the whole pool.
        k = min(round(config.data_fraction * len(labels)), int((~flagged).sum()) if kw else len(labels))
        sel = select(df, text_field="text", label_field="label", count=k, seed=config.seed,
                     gate=False, **kw)
        rows = np.sort(np.asarray(sel.indices))
        t = time.perf_counter()
        result = train(copy.deepcopy(model), train_all.subset(rows), eval_tok,
                       fit_schedule(config, rows.size, targs), targs, tokenizer=tok)
        out.append({"dataset": job["dataset"], "flip": job["flip"], "seed": job["seed"], "rule": rule,
                    "kept": int(rows.size), "kept_flip_share": float(flipped[rows].mean()),
                    "pool_flip_share": float(flipped.mean()), "guard_flagged": int(flagged.sum()),
                    "accuracy": float(result.metrics["accuracy"]),
                    "train_s": time.perf_counter() - t})
    return out


def markdown(payload: dict) -> str:
    groups: dict[tuple, list] = {}
    for r in payload["runs"]:
        groups.setdefault((r["dataset"], r["flip"], r["rule"]), []).append(r)
    a = payload["args"]
    lines = ["### Which examples quality selection should prefer (wrong labels flipped on purpose; "
             f"pool {a['pool'] or 'full'})", "",
             "| data | flipped | rule | test accuracy (mean ± std) | flipped among kept | seeds |",
             "|---|---|---|---|---|---|"]
    for (ds, flip, rule), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                       RULES.index(kv[0][2]))):
        acc = np.array([r["accuracy"] for r in rs])
        sd = acc.std(ddof=1) if acc.size > 1 else 0.0
        lines.append(f"| {ds} | {flip:.0%} | {rule} | {acc.mean():.4f} ± {sd:.4f} | "
                     f"{np.mean([r['kept_flip_share'] for r in rs]):.3f} (pool "
                     f"{rs[0]['pool_flip_share']:.3f}) | {len(rs)} |")
    lines += ["", f"One warm-up ({payload['score_warmup']} steps) and scoring pass per row group, "
              f"rules trained from copies of the same warmed-up model; pool {a['pool'] or 'full'}, "
              f"test {a['eval'] or 'full'}, fraction {a['fraction']}; settings of `tsqlora demo`.",
              "", "Command: `python python/experiments/selection_rules.py --datasets {} --pool {} --eval {} "
              "--flips {} --seeds {} --rules {}{}` (a call adds its runs to the same file, so seeds may "
              "also be run one call each)."
              .format(" ".join(a["datasets"]), a["pool"], a["eval"], " ".join(f"{f:g}" for f in a["flips"]),
                      " ".join(str(x) for x in sorted({r["seed"] for r in payload["runs"]})),
                      " ".join(a["rules"]), "" if Path(a["out"]).name == "selection_rules.json"
                      else f" --out python/experiments/results/{Path(a['out']).name}")]
    return "\n".join(lines) + "\n"


def pending(runs: list[dict], args, threads: int) -> list[dict]:
    """One job per (dataset, flip, seed) with the requested rules that ``runs`` lacks there (a
    rerun with more rules runs just those, on the same seeded warm-up)."""
    done = {(r["dataset"], r["flip"], r["seed"], r["rule"]) for r in runs}
    jobs = []
    for d in args.datasets:
        for f in args.flips:
            for s in args.seeds:
                rules = [r for r in args.rules if (d, f, s, r) not in done]
                if rules:
                    jobs.append({"dataset": d, "flip": f, "seed": s, "pool": args.pool,
                                 "eval": args.eval, "fraction": args.fraction, "threads": threads,
                                 "rules": rules})
    return jobs


def recorded_args(runs: list[dict], args: dict) -> dict:
    """``args`` with datasets, flips, seeds and rules those of ``runs`` (every call's, not only the
    latest), so the table's command names what the file holds."""
    return {**args, "datasets": [d for d in DATASETS if any(r["dataset"] == d for r in runs)],
            "flips": sorted({r["flip"] for r in runs}), "seeds": sorted({r["seed"] for r in runs}),
            "rules": [x for x in RULES if any(r["rule"] == x for r in runs)]}


def main(argv=None) -> int:
    from tsqlora_ext.pipeline import demo_settings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["rotten_tomatoes"], choices=DATASETS)
    p.add_argument("--flips", type=float, nargs="+", default=[0.0, 0.2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--eval", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "selection_rules.json")
    args = p.parse_args(argv)
    payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "score_warmup": demo_settings()[0].score_warmup, "runs": []}
    if args.out.is_file():  # add to earlier groups of the same pool, test set and fraction
        old = json.loads(args.out.read_text())
        same = all(old["args"][k] == payload["args"][k] for k in ("pool", "eval", "fraction"))
        if not same:
            raise SystemExit(f"{args.out} holds runs with another pool/eval/fraction; pass --out")
        payload["runs"] = old["runs"]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = pending(payload["runs"], args, threads)
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"),
                                initializer=watch_parent) as ex:
        for fut in cf.as_completed([ex.submit(run_group, j) for j in jobs]):
            rows = fut.result()
            payload["runs"] += rows
            payload["args"] = recorded_args(payload["runs"], payload["args"])
            write_atomic(args.out, json.dumps(payload, indent=1) + "\n")
            write_atomic(args.out.with_suffix(".md"), markdown(payload))
            for r in rows:
                print(f"[{time.perf_counter() - t0:5.0f}s] {r['dataset']} flip {r['flip']} seed "
                      f"{r['seed']} {r['rule']:8s}: acc {r['accuracy']:.4f}, flipped kept "
                      f"{r['kept_flip_share']:.3f}", flush=True)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
