"""Quality selection on data with wrong labels: does it keep them out, and does it beat random?

For each bundled task (Rotten Tomatoes, BBC News), each share of training labels flipped on purpose
(seeded; the test split stays clean) and each seed, every *arm* runs the TsqLoRA recipe of
``tsqlora demo`` (tsqlora_ext.pipeline.demo_settings: MiniLM, r_init 12 -> target_r 8, lr 1e-3,
2 epochs, batch 32, max_length 64) and differs only in which examples it trains on afterwards:

- ``quality``: warm-up (``score_warmup`` steps on random minibatches of the noisy pool, carried into
  training), the scoring pass, the wrong-label guard, Gumbel-top-k of the selection score
  (tsqlora_ext.selector.select, stratified) — the library defaults, as tsqlora_ext.pipeline runs
  them;
- ``quality_noguard``: the same with ``mislabel_guard=False``;
- ``random``: the same warm-up, then a uniform stratified sample of the same size (no scoring);
- ``all``: the same warm-up, then every example;
- ablations (not run unless named in ``--arms``): ``quality_high`` / ``quality_high_noguard``
  (the paper's preference for high Q), ``quality_uniform`` (the guard alone: a uniform sample of
  what it keeps) and ``quality_moderate`` (typical Q first), each beside whatever the default
  preference is, and ``random_nowarm`` (random without the warm-up: plain training on a random
  sample). Tables name the default preference their results file was made with.

Every selecting arm trains on ``--fraction`` of the pool (the guard's drops are replaced by other
examples, as in the pipeline), so the arms differ in which examples they train on, not how many.

Every run records the test accuracy, the share of flipped labels among the examples it trained on,
the guard's flags (precision and recall on the flipped ones, or why it abstained) and its wall time
from loading the model to the end of evaluation, the warm-up and scoring pass included.

    python python/experiments/noisy_labels.py --device cuda --jobs 8     # the full run
    python python/experiments/noisy_labels.py --quick                    # a CPU smoke run

Each finished run is appended to the JSON file (``--out``, default results/noisy_labels.json)
at once, atomically; a rerun with the same settings skips the runs already there, so an
interrupted run loses only what was in flight. The markdown table beside it (``.md``) is rewritten
from the JSON after every run. ``--quick`` (a few hundred examples, one seed, short warm-up and one
epoch) writes under results/quick/ so it never mixes with the full results.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {
    "quality": ("quality", {}),
    "quality_noguard": ("quality", {"mislabel_guard": False}),
    "quality_high": ("quality", {"quality_preference": "high"}),
    "quality_high_noguard": ("quality", {"quality_preference": "high", "mislabel_guard": False}),
    "quality_uniform": ("quality", {"quality_preference": "uniform"}),
    "quality_moderate": ("quality", {"quality_preference": "moderate"}),
    "random": ("random", {}),
    "random_nowarm": ("random", {"score_warmup": 0}),
    "all": ("all", {}),
}
DEFAULT_ARMS = ("quality", "quality_noguard", "random", "all")
DATASETS = ("rotten_tomatoes", "bbc_news")


# ---- data ----------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def load_task(name: str, pool: int, n_eval: int):
    """The bundled task; ``pool`` / ``n_eval`` > 0 keep a fixed (seed-independent) random subset of
    the train / test split."""
    from tsqlora_ext.pipeline import TextTask, bundled_task

    t = bundled_task(name)
    rng = np.random.default_rng(20261130)
    tr = rng.permutation(len(t.train_texts))[:pool] if pool else np.arange(len(t.train_texts))
    ev = rng.permutation(len(t.eval_texts))[:n_eval] if n_eval else np.arange(len(t.eval_texts))
    return TextTask(t.name, t.label_names, [t.train_texts[i] for i in tr],
                    [t.train_labels[i] for i in tr], [t.eval_texts[i] for i in ev],
                    [t.eval_labels[i] for i in ev])


def flip_labels(labels, n_classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): a seeded ``share`` of the rows get another label, drawn
    uniformly among the other classes. The flipped rows at a smaller share are a subset of those at
    a larger one (same seed), so the noise levels differ only by the added wrong labels."""
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(y.size)
    shift = rng.integers(1, n_classes, y.size)
    flipped = np.zeros(y.size, bool)
    flipped[order[:int(round(share * y.size))]] = True
    return np.where(flipped, (y + shift) % n_classes, y), flipped


# ---- one run -------------------------------------------------------------------------------------
def settings(args) -> dict:
    """Everything that determines a run's outcome (a rerun skips runs only when these match)."""
    from tsqlora_ext.pipeline import demo_settings

    config, targs, _ = demo_settings()
    config = config.replace(data_fraction=args.fraction)
    tdict = {**targs.to_dict(), "progress": False, "num_workers": 1}
    if args.quick:
        config = config.replace(score_warmup=20, calibration_batches=2, t_init=2, t_final=2,
                                delta_t=2)
        tdict["epochs"] = 1
    for name in ("score_warmup", "quality_preference"):  # --score-warmup, --quality-preference
        if getattr(args, name, None) is not None:
            config = config.replace(**{name: getattr(args, name)})
    return {"config": config.to_dict(), "train": tdict, "pool": args.pool, "eval": args.eval,
            "fraction": args.fraction}


# TrainArgs that do not change a run's outcome (where checkpoints go, loader threads, the progress
# bar, the stop rule for non-finite steps), as tsqlora_ext.train's resume check has them; and
# TsqLoRAConfig fields since retired, with the value that meant "off".
_NOT_OUTCOME = frozenset({"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "num_workers",
                          "progress", "max_nonfinite_steps"})
_RETIRED = {"rescore_every": 0}


def settings_diff(saved: dict, now: dict) -> list[str]:
    """'key <saved> then, <now> now' for each outcome-relevant setting that differs between a
    results file's settings and this call's. A key only one side has is compared against the current
    default (a field added to TsqLoRAConfig / TrainArgs since the file was written, one retired
    since); TrainArgs that do not change the outcome and retired fields at their "off" value are
    ignored."""
    from tsqlora_ext.config import TsqLoRAConfig
    from tsqlora_ext.train import TrainArgs

    defaults = {"config": TsqLoRAConfig().to_dict(), "train": TrainArgs().to_dict()}
    changed = []
    for key in sorted(saved.keys() | now.keys()):
        a, b = saved.get(key), now.get(key)
        if key in defaults and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(a.keys() | b.keys()):
                if key == "train" and name in _NOT_OUTCOME:
                    continue
                if key == "config" and name in _RETIRED and name not in defaults[key]:
                    va, vb = a.get(name, _RETIRED[name]), b.get(name, _RETIRED[name])
                else:
                    va = a.get(name, defaults[key].get(name))
                    vb = b.get(name, defaults[key].get(name))
                if _norm(va) != _norm(vb):
                    changed.append(f"{key}.{name} {va!r} then, {vb!r} now")
        elif _norm(a) != _norm(b):
            changed.append(f"{key} {a!r} then, {b!r} now")
    return changed


def _norm(v):
    """JSON's view of a value (tuples and lists alike), so a file read back compares equal."""
    return json.loads(json.dumps(v))


def run_key(dataset: str, flip: float, seed: int, arm: str) -> str:
    return f"{dataset}/flip{flip:g}/seed{seed}/{arm}"


def run_one(job: dict) -> dict:
    """One (dataset, flip, seed, arm) run in this process; returns its record."""
    import pandas as pd
    import torch

    from tsqlora_ext import bundled
    from tsqlora_ext.config import TsqLoRAConfig
    from tsqlora_ext.pipeline import _load_model, _score, _warmup, row_scores
    from tsqlora_ext.selector import select, selection_budget
    from tsqlora_ext.train import TokenizedData, TrainArgs, train
    from tsqlora_ext.wrap import wrap

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(job["threads"])
    s = job["settings"]
    kind, overrides = ARMS[job["arm"]]
    config = TsqLoRAConfig.from_dict({**s["config"], "seed": job["seed"], **overrides})
    targs = TrainArgs.from_dict(s["train"])
    task = load_task(job["dataset"], s["pool"], s["eval"])
    labels, flipped = flip_labels(task.train_labels, len(task.label_names), job["flip"],
                                  job["seed"])
    t_start = time.perf_counter()
    model, tok = _load_model(bundled.minilm_dir(), task.label_names, config.seed)
    model = wrap(model, config, verbose=False).to(job["device"])
    train_all = TokenizedData.from_texts(tok, task.train_texts, labels, targs.max_length)
    eval_tok = TokenizedData.from_texts(tok, task.eval_texts, task.eval_labels, targs.max_length)
    df = pd.DataFrame({"text": task.train_texts, "label": labels})
    rec: dict = {"key": run_key(job["dataset"], job["flip"], job["seed"], job["arm"]),
                 "dataset": job["dataset"], "flip": job["flip"], "seed": job["seed"],
                 "arm": job["arm"], "device": job["device"], "pool": len(labels),
                 "pool_flip_share": float(flipped.mean())}
    t = time.perf_counter()
    if kind == "quality":
        warm, scores = _score(model, tok, train_all, config, targs)
        score, flagged = row_scores(scores, len(labels))
        drop = flagged if config.mislabel_guard else np.zeros(len(labels), dtype=bool)
        sel = select(df, text_field="text", label_field="label", scores=score,
                     count=selection_budget(len(labels), int((~drop).sum()), config.data_fraction),
                     temperature=config.temperature, seed=config.seed, stratify=config.stratify,
                     gate=False, drop={"likely_mislabeled": drop})
        rows = np.sort(np.asarray(sel.indices, dtype=np.int64))
        mix = scores.meta["mixture"] or {}
        n_flag = int(flagged.sum())
        rec["guard"] = {
            "on": config.mislabel_guard, "flagged": n_flag, "abstains": mix.get("guard_abstains"),
            "spread": mix.get("high_loss_spread"),
            "precision": float(flipped[flagged].mean()) if n_flag else None,
            "recall": float(flagged[flipped].mean()) if flipped.any() else None,
        }
        rec["scoring_s"] = scores.meta["seconds"]
    else:
        warm = _warmup(model, tok, train_all, config, targs)
        if kind == "random":
            sel = select(df, text_field="text", label_field="label",
                         count=selection_budget(len(labels), len(labels), config.data_fraction),
                         seed=config.seed, stratify=config.stratify, gate=False)
            rows = np.sort(np.asarray(sel.indices, dtype=np.int64))
        else:
            rows = np.arange(len(labels))
    rec["warmup_and_selection_s"] = time.perf_counter() - t
    rec["warmup_steps"] = warm["steps"] if warm else 0
    t = time.perf_counter()
    config = fit_schedule(config, rows.size, targs)
    result = train(model, train_all.subset(rows), eval_tok, config, targs, tokenizer=tok)
    rec["train_s"] = time.perf_counter() - t
    rec["wall_s"] = time.perf_counter() - t_start
    rec["kept"] = int(rows.size)
    rec["kept_flip_share"] = float(flipped[rows].mean())
    rec["accuracy"] = float(result.metrics["accuracy"])
    rec["macro_f1"] = float(result.metrics.get("macro_f1", float("nan")))
    return rec


def fit_schedule(config, n_train: int, targs):
    """The demo's rank schedule (t_init = t_final = 30, delta_t = 10 of about 210 steps) scaled
    down for shorter runs (BBC News, --pool, --quick), so every run has a reallocation phase."""
    steps = int(np.ceil(np.ceil(n_train / targs.batch_size) * targs.epochs))
    edge = min(config.t_init, config.t_final, steps // 7)
    return config.replace(t_init=edge, t_final=edge, delta_t=max(1, min(config.delta_t, steps // 20)))


# ---- results file and table ----------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    from tsqlora_ext.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _ms(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    """(dataset, flip, arm) -> mean/std of accuracy, flipped share kept, wall time; and the goals."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["flip"], r["arm"]), []).append(r)
    cells = {}
    for (ds, flip, arm), rs in sorted(groups.items()):
        acc, acc_sd = _ms([r["accuracy"] for r in rs])
        cells[(ds, flip, arm)] = {
            "dataset": ds, "flip": flip, "arm": arm, "seeds": len(rs),
            "accuracy": acc, "accuracy_std": acc_sd,
            "kept_flip_share": _ms([r["kept_flip_share"] for r in rs])[0],
            "pool_flip_share": _ms([r["pool_flip_share"] for r in rs])[0],
            "kept": _ms([r["kept"] for r in rs])[0],
            "wall_s": _ms([r["wall_s"] for r in rs])[0],
            "flagged": (_ms([r["guard"]["flagged"] for r in rs])[0] if "guard" in rs[0] else None),
        }
    goals = []
    for ds, flip, arm in ((ds, flip, arm) for ds in sorted({k[0] for k in cells})
                          for flip in (0.2, 0.0) for arm in GOAL_ARMS):
        q, rnd = cells.get((ds, flip, arm)), cells.get((ds, flip, "random"))
        if q and rnd:
            diff = q["accuracy"] - rnd["accuracy"]
            spread = max(q["accuracy_std"], rnd["accuracy_std"])
            # The guard flagged nothing and the arm drew exactly the random arm's rows at every
            # seed ('uniform' selection): its figures are the random sample's.
            per_seed = {a: {r["seed"]: r["accuracy"] for r in groups[(ds, flip, a)]} for a in (arm, "random")}
            same = (q["flagged"] == 0 and per_seed[arm].keys() == per_seed["random"].keys()
                    and per_seed[arm] == per_seed["random"])
            g = {"dataset": ds, "flip": flip, "arm": arm, "accuracy_diff": diff,
                 "seed_spread": spread, "seeds": min(q["seeds"], rnd["seeds"]), "same_as_random": same}
            if flip > 0:
                g["kept_flip_share"] = q["kept_flip_share"]
                g["pool_flip_share"] = q["pool_flip_share"]
                g["flip_share_met"] = q["kept_flip_share"] < q["pool_flip_share"] / 3
                # With one seed there is no spread to beat: not judged.
                g["beats_random_met"] = diff > spread if g["seeds"] > 1 else None
            else:
                g["no_worse_met"] = diff >= 0
            goals.append(g)
    return {"cells": list(cells.values()), "goals": goals}


# The arms whose goals are judged: the default selection, and each preference measured beside it.
GOAL_ARMS = ("quality", "quality_uniform", "quality_moderate")
ARM_LABEL = {"quality": "quality, default '{}' (guard on)",
             "quality_noguard": "quality, default '{}', no guard",
             "quality_high": "quality 'high' (guard on)",
             "quality_high_noguard": "quality 'high', no guard",
             "quality_uniform": "quality 'uniform' (guard only)",
             "quality_moderate": "quality 'moderate' (guard on)",
             "random": "random", "random_nowarm": "random, no warm-up", "all": "all data"}


def arm_label(arm: str, settings: dict) -> str:
    """The arm's name in tables; the default arms name the preference their results file used."""
    return ARM_LABEL[arm].format(settings["config"]["quality_preference"])


def _verdict(met: bool | None) -> str:
    return "not judged, one seed" if met is None else "met" if met else "missed"


def markdown(payload: dict, out: Path) -> str:
    s = payload["settings"]
    summ = summarize(payload["runs"])
    cfg = s["config"]
    lines = [
        f"### Quality selection on data with wrong labels flipped on purpose ({out.name})",
        "",
        "| data | flipped | selection | test accuracy (mean ± std) | flipped among kept | kept | "
        "guard flags | wall time (s) | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {a: i for i, a in enumerate(ARMS)}
    for c in sorted(summ["cells"], key=lambda c: (c["dataset"], c["flip"], order[c["arm"]])):
        flags = "-" if c["flagged"] is None else f"{c['flagged']:.0f}"
        lines.append(
            f"| {c['dataset']} | {c['flip']:.0%} | {arm_label(c['arm'], s)} | "
            f"{c['accuracy']:.4f} ± {c['accuracy_std']:.4f} | {c['kept_flip_share']:.3f} "
            f"(pool {c['pool_flip_share']:.3f}) | {c['kept']:.0f} | "
            f"{flags} | {c['wall_s']:.0f} | "
            f"{c['seeds']} |")
    lines.append("")
    for g in summ["goals"]:
        if g["flip"] > 0:
            lines.append(
                f"- {g['dataset']}, 20% flipped, {arm_label(g['arm'], s)}: the selected "
                f"{s['fraction']:.0%} holds "
                f"{g['kept_flip_share']:.3f} flipped vs the pool's {g['pool_flip_share']:.3f} "
                f"(goal < {g['pool_flip_share'] / 3:.3f}: {'met' if g['flip_share_met'] else 'missed'}); "
                f"accuracy vs random {g['accuracy_diff']:+.4f}, seed spread {g['seed_spread']:.4f} "
                f"(goal: beat random by more than the spread: "
                f"{_verdict(g['beats_random_met'])}).")
        else:
            lines.append(
                f"- {g['dataset']}, clean, {arm_label(g['arm'], s)}: accuracy vs random "
                f"{g['accuracy_diff']:+.4f}, seed "
                f"spread {g['seed_spread']:.4f} (goal: no worse than random: "
                f"{'met' if g['no_worse_met'] else 'missed'})"
                + ("; the guard flagged nothing and the arm trained on the random arm's rows at "
                   "every seed, so this is the random sample's figure." if g.get("same_as_random") else "."))
    lines += ["", f"Settings: pool {s['pool'] or 'the full train split'}, test "
              f"{s['eval'] or 'the full test split'}, fraction {s['fraction']}, warm-up "
              f"{cfg['score_warmup']} steps, quality preference '{cfg['quality_preference']}', "
              f"weights {cfg['quality_weights']}, temperature {cfg['temperature']}, "
              f"{s['train']['epochs']} epoch(s), batch {s['train']['batch_size']}, lr "
              f"{s['train']['lr']}, max_length {s['train']['max_length']}; device(s) "
              f"{', '.join(sorted({r['device'] for r in payload['runs']}))}. Wall time: model load "
              "to the end of evaluation, warm-up and scoring pass included.", "",
              f"Command: `{command(payload, out)}` (a rerun adds only the runs the file lacks, so "
              "the grid may also be filled one call at a time)."]
    return "\n".join(lines) + "\n"


def command(payload: dict, out: Path) -> str:
    """The call that reproduces every run in ``payload`` into ``out``."""
    runs, s = payload["runs"], payload["settings"]
    arms = sorted({r["arm"] for r in runs}, key=list(ARMS).index)
    parts = ["python python/experiments/noisy_labels.py",
             "--datasets " + " ".join(sorted({r["dataset"] for r in runs})),
             "--flips " + " ".join(f"{f:g}" for f in sorted({r["flip"] for r in runs})),
             "--seeds " + " ".join(str(x) for x in sorted({r["seed"] for r in runs})),
             "--arms " + " ".join(arms)]
    cfg = s["config"]

    def args(quick: bool, **overrides):
        return type("Args", (), {"quick": quick, "pool": s["pool"], "eval": s["eval"],
                                 "fraction": s["fraction"], **overrides})

    # --quick when the file was made by a quick run (its settings match one, flags aside); then a
    # flag for each of --score-warmup / --quality-preference whose value is not today's default.
    quick = not settings_diff(s, settings(args(True, score_warmup=cfg["score_warmup"],
                                               quality_preference=cfg["quality_preference"])))
    plain = settings(args(quick))["config"]
    parts += ["--quick"] * quick + [f"--{k.replace('_', '-')} {cfg[k]}"
                                    for k in ("score_warmup", "quality_preference")
                                    if cfg[k] != plain[k]]
    parts += [f"--{k} {s[k]}" for k in ("pool", "eval") if s[k]]
    if s["fraction"] != 0.3:
        parts.append(f"--fraction {s['fraction']}")
    devices = {r["device"] for r in runs}
    if devices != {"cpu"}:
        parts.append("--device " + "/".join(sorted(devices)))
    if out.resolve() != (RESULTS / "noisy_labels.json").resolve():
        parts.append(f"--out {os.path.relpath(out.resolve(), RESULTS.parents[2])}")
    return " ".join(parts)


def save(payload: dict, out: Path) -> None:
    write_atomic(out, json.dumps(payload, indent=1) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(payload, out))


def watch_parent() -> None:
    """Worker initializer: exit when the driver is gone (killed or interrupted), so no orphaned
    worker keeps training and holding cores."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ---- driver --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    from tsqlora_ext.config import PREFERENCES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--flips", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--pool", type=int, default=0, help="train rows kept (0: the full split)")
    p.add_argument("--eval", type=int, default=0, help="test rows kept (0: the full split)")
    p.add_argument("--score-warmup", type=int, default=None,
                   help="warm-up steps before scoring (default: the demo's); runs with another "
                   "warm-up need their own --out")
    p.add_argument("--quality-preference", default=None, choices=PREFERENCES,
                   help="the quality arms' default preference (default: the library's); lets a "
                   "results file made under an older default be rerun and extended")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (0: the cores shared out among the jobs)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1000 train / 200 test rows, seed 0, flips 0 and 0.2, short "
                   "warm-up, 1 epoch; writes under results/quick/")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default results/noisy_labels.json; the .md beside it)")
    args = p.parse_args(argv)
    if args.quick:
        args.pool, args.eval = args.pool or 1000, args.eval or 200
        args.seeds, args.flips = args.seeds[:1], [f for f in args.flips if f in (0.0, 0.2)]
    out = args.out or (RESULTS / ("quick" if args.quick else "") / "noisy_labels.json")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
    sett = settings(args)
    payload = {"settings": sett, "runs": []}
    if out.is_file():
        old = json.loads(out.read_text())
        changed = settings_diff(old.get("settings") or {}, sett)
        if changed:
            raise SystemExit(f"{out} holds runs made with other settings ({'; '.join(changed)}); "
                             "pass another --out (or move it away) to start afresh")
        payload = old
    done = {r["key"] for r in payload["runs"]}
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [{"dataset": d, "flip": f, "seed": s, "arm": a, "device": args.device,
             "threads": threads, "settings": sett}
            for d in args.datasets for f in args.flips for s in args.seeds for a in args.arms
            if run_key(d, f, s, a) not in done]
    print(f"{len(jobs)} runs to do ({len(done)} already in {out}); {args.jobs} at a time, "
          f"{threads} thread(s) each, on {args.device}", flush=True)
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # CUDA cannot be forked into workers
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx,
                                initializer=watch_parent) as pool:
        futures = {pool.submit(run_one, j): j for j in jobs}
        for fut in cf.as_completed(futures):
            j = futures[fut]
            try:
                rec = fut.result()
            except Exception as e:  # keep the others going; the run is retried on the next call
                print(f"FAILED {run_key(j['dataset'], j['flip'], j['seed'], j['arm'])}: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
                continue
            payload["runs"].append(rec)
            save(payload, out)
            g = rec.get("guard")
            print(f"[{time.perf_counter() - t0:6.0f}s] {rec['key']}: acc {rec['accuracy']:.4f}, "
                  f"flipped kept {rec['kept_flip_share']:.3f} of {rec['kept']}"
                  + (f", guard {g['flagged']} flagged ({g['abstains'] or 'acting'})"
                     if g and g["on"] else ", guard off" if g else "")
                  + f", {rec['wall_s']:.0f}s", flush=True)
    if payload["runs"]:
        save(payload, out)
        print(markdown(payload, out))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if len(payload["runs"]) >= len(done) + len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
