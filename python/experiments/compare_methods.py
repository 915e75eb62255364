"""TsqLoRA against PEFT LoRA and PEFT AdaLoRA at one final budget, quality selection against
random selection, and two ablations, on the bundled MiniLM with two bundled tasks (and the bundled
SmolLM2-135M decoder on Rotten Tomatoes, with --model smollm2).

    python python/experiments/compare_methods.py --device cuda --jobs 8        # the full grid
    python python/experiments/compare_methods.py --model smollm2 --methods lora adalora tsqlora \
        --lrs 1e-3                                                             # the decoder case
    python python/experiments/compare_methods.py --quick --device cpu --jobs 2 # smoke run, minutes
    python python/experiments/compare_methods.py --summarize                   # tables from runs
    python python/experiments/compare_methods.py --plan                        # count runs, run none

Full grid: 2 tasks x 11 methods, 3 learning rates on seed 0 then seeds 1 and 2 at each method's
best = 110 runs (~18.6k optimizer steps, warm-ups included). Workers are spawned processes, each
with its own model copy and ``--threads`` torch threads; on one GPU they share the device.

Methods (every one ends at the same budget: an average rank of 8 over the same linears, those
``tsqlora_ext.wrap`` adapts by default -- MiniLM's 36 encoder linears, SmolLM2's 210 attention and
MLP projections -- plus the task head; tsqlora_params counts that budget in parameters):
    lora          PEFT LoRA, r = 8 everywhere
    adalora       PEFT AdaLoRA, init_r 12 -> target_r 8, its own schedule (tinit/tfinal/deltaT
                  equal to ours); update_and_allocate after every optimizer step, as PEFT asks
    tsqlora       TsqLoRA on all the training data: r_init 12 -> target 8 (pipeline.demo_settings)
    tsqlora_params  the same with budget_unit='params': the budget counts parameters, ending at
                  those of rank 8 in every layer (PEFT LoRA r=8's plus one E entry per component),
                  where 'tsqlora' ends at total rank 288 with more parameters (rank moves to the
                  wider feed-forward layers)
    quality@f     the TsqLoRA pipeline: gate -> warm-up -> quality score -> wrong-label guard ->
                  Gumbel-top-k selection of f x the training rows -> calibration -> training
    random@f      the same pipeline (gate, the same warm-up and scoring), but the f x rows are
                  drawn uniformly at random from the gated pool and the guard drops nothing
    no_sens_init  TsqLoRA with every layer starting at r_init (no sensitivity calibration)
    no_realloc    TsqLoRA with ranks fixed after the sensitivity-based initial allocation of
                  a budget of 8 per layer (r_init 8, no reallocation)

Protocol. A validation split (10%, seeded) is carved from each task's TRAIN split; the test split
is only ever evaluated, never used for a choice. Every method runs the same learning-rate grid on
the first seed; its learning rate is the one with the best validation accuracy there, and the
remaining seeds run at that rate only (the full grid x all seeds does not fit a short GPU lease).
Every run is written to ``<out>/<name>-runs.jsonl`` as soon as it finishes (the whole file
re-written atomically), and a rerun skips the runs already there, so an interrupted run keeps
what it finished. ``--summarize`` (also run at the end) writes ``<name>.json`` and ``<name>.md``.
The quality and random arms of one (task, learning rate, seed) run in one worker call: the gate,
warm-up and scoring pass, which none of them changes, run once, and each arm trains its own copy
of the warmed-up model (the same run as alone; each arm's wall time counts the shared part).

The decoder case (--model smollm2) runs on a CPU-sized subset of Rotten Tomatoes on the CPU
(DECODER below; results compare_methods-smollm2.*): the 135M-parameter model takes seconds per
step on two cores. With --device cuda it runs on the full split (DECODER_GPU; results
compare_methods-smollm2-cuda.*). A lent GPU machine has no network and takes at most 64 MiB per
transfer, so the 94 MiB model travels in two halves: see gpu_bundle.py --smollm2 and
gpu_experiments.sh smollm2.

Trainable parameters are counted the same way for every method: the parameters in use at the
end, i.e. for each adapted layer rank x (in + out) for LoRA and rank x (in + out + 1) for the
SVD-form adapters (AdaLoRA, TsqLoRA: A rows, B columns and E entries of active components;
AdaLoRA's active components are those its mask left non-zero), plus the classifier head.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from noisy_labels import watch_parent  # noqa: E402

FRACTIONS = (0.1, 0.3, 0.5)
METHODS = ("lora", "adalora", "tsqlora", "tsqlora_params", *(f"quality@{f}" for f in FRACTIONS),
           *(f"random@{f}" for f in FRACTIONS), "no_sens_init", "no_realloc")
LABELS = {"lora": "PEFT LoRA r=8", "adalora": "PEFT AdaLoRA 12→8", "tsqlora": "TsqLoRA, all data",
          "tsqlora_params": "TsqLoRA, parameter budget",
          "no_sens_init": "TsqLoRA, uniform initial ranks", "no_realloc": "TsqLoRA, no reallocation",
          **{f"quality@{f}": f"TsqLoRA, quality-selected {int(f * 100)}%" for f in FRACTIONS},
          **{f"random@{f}": f"TsqLoRA, random {int(f * 100)}%" for f in FRACTIONS}}
TASKS = ("rotten_tomatoes", "bbc_news")
LR_GRID = (1e-3, 3e-3, 1e-2)
SEEDS = (0, 1, 2)
VAL_FRACTION, VAL_SEED = 0.1, 4321
TARGET_R, R_INIT = 8, 12


@dataclass(frozen=True)
class TaskSettings:
    """How one task is trained; identical for every method."""

    max_length: int
    epochs: float
    batch_size: int = 32
    eval_batch_size: int = 64
    limit_train: int = 0  # quick mode: rows of train (after the validation carve), 0 = all
    limit_val: int = 0
    limit_test: int = 0
    warmup_cap: int = 0  # cap on the pipeline's score_warmup (0: half an epoch of the pool)
    calibration_batches: int = 4
    model: str = "minilm"  # a key of MODELS


FULL = {"rotten_tomatoes": TaskSettings(max_length=64, epochs=1),
        # BBC articles run to hundreds of words: 128 tokens; 1,800 training rows make 57 steps an
        # epoch, so 3 epochs give reallocation room to act.
        "bbc_news": TaskSettings(max_length=128, epochs=3)}
QUICK = {"rotten_tomatoes": TaskSettings(max_length=32, epochs=1, batch_size=16, limit_train=192,
                                         limit_val=64, limit_test=128, warmup_cap=3,
                                         calibration_batches=1),
         "bbc_news": TaskSettings(max_length=64, epochs=1, batch_size=16, limit_train=128,
                                  limit_val=48, limit_test=64, warmup_cap=3,
                                  calibration_batches=1)}
# SmolLM2 on two CPU cores: ~3 s per step of 16 reviews at 48 tokens (nearly all of Rotten
# Tomatoes' sentences fit), so 640 training reviews (40 steps), 160 for validation, 400 for test:
# the learning-rate grid and three seeds of three methods then take about 40 minutes.
DECODER = {"rotten_tomatoes": TaskSettings(max_length=48, epochs=1, batch_size=16, limit_train=640,
                                           limit_val=160, limit_test=400, calibration_batches=2)}
# On a GPU: the whole split (about 480 steps of 16 reviews), the same length and batch.
DECODER_GPU = {"rotten_tomatoes": TaskSettings(max_length=48, epochs=1, batch_size=16)}
# model -> (bundled path, wrap family whose default targets PEFT gets too, name in titles)
MODELS = {"minilm": ("minilm_dir", "bert", "bundled MiniLM"),
          "smollm2": ("smollm2_gguf", "llama", "bundled SmolLM2-135M, decoder")}


def model_path(model: str):
    from tsqlora_ext import bundled
    return getattr(bundled, MODELS[model][0])()


def task_settings(model: str, quick: bool, device: str = "cpu") -> dict[str, TaskSettings]:
    if quick or model == "minilm":
        table = QUICK if quick else FULL
    else:
        table = DECODER_GPU if device == "cuda" else DECODER
    return {t: dataclasses.replace(s, model=model) for t, s in table.items()}


def results_name(opts) -> str:
    """The stem of a grid's files: compare_methods[-model[-cuda]][-quick-device][-tag]. The
    decoder's GPU grid (full split) is kept apart from its CPU subset."""
    decoder = "" if opts.model == "minilm" else f"-{opts.model}"
    if decoder and opts.device == "cuda" and not opts.quick:
        decoder += "-cuda"
    return ("compare_methods" + decoder + (f"-quick-{opts.device}" if opts.quick else "")
            + (f"-{opts.tag}" if opts.tag else ""))


def model_title(opts) -> str:
    title = MODELS[opts.model][2]
    if opts.model != "minilm":
        title += ", full Rotten Tomatoes" if opts.device == "cuda" else ", CPU-sized subset"
    return title


def schedule(total_steps: int) -> dict[str, int]:
    """The budget schedule shared by TsqLoRA and AdaLoRA, scaled to the run's length (the demo's
    30/30/10 on ~215 steps): 15% of the steps at B_0, the last 15% frozen, reallocation every
    ~T/20 steps (at most 10)."""
    t = int(total_steps)
    return {"t_init": int(0.15 * t), "t_final": int(0.15 * t), "delta_t": max(1, min(10, t // 20))}


def settings_id(settings: TaskSettings, task: str) -> str:
    """A short hash of what a run's result depends on beyond (method, lr, seed)."""
    d = dataclasses.asdict(settings)
    if d["model"] == "minilm":
        del d["model"]  # the runs made before there was a choice of model keep their ids
    blob = json.dumps({"task": task, **d, "val": [VAL_FRACTION, VAL_SEED],
                       "target_r": TARGET_R, "r_init": R_INIT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def method_family(method: str) -> tuple[str, float]:
    if "@" in method:
        kind, f = method.split("@")
        return kind, float(f)
    return method, 1.0


# ---- data (cached per worker process) ------------------------------------------------------------
_TASK_CACHE: dict[tuple[str, TaskSettings], Any] = {}


@dataclass
class PreparedTask:
    task: Any  # pipeline.TextTask: train (after the carve) and the validation split as eval
    test_texts: list[str]
    test_labels: list[int]
    tokenizer: Any
    train_tok: Any
    val_tok: Any
    test_tok: Any


def prepare(task_name: str, settings: TaskSettings) -> PreparedTask:
    key = (task_name, settings)
    if key in _TASK_CACHE:
        return _TASK_CACHE[key]
    import numpy as np
    from tsqlora_ext import pipeline
    from tsqlora_ext.train import TokenizedData

    full = pipeline.bundled_task(task_name)
    order = np.random.default_rng(VAL_SEED).permutation(len(full.train_texts))
    n_val = round(VAL_FRACTION * len(order))
    val, train = order[:n_val], order[n_val:]
    if settings.limit_train:
        train, val = train[:settings.limit_train], val[:settings.limit_val]
    test_n = settings.limit_test or len(full.eval_texts)
    task = pipeline.TextTask(full.name, full.label_names,
                             [full.train_texts[i] for i in train], [full.train_labels[i] for i in train],
                             [full.train_texts[i] for i in val], [full.train_labels[i] for i in val])
    tok = pipeline.load_tokenizer(model_path(settings.model))
    ml = settings.max_length
    prep = PreparedTask(task, full.eval_texts[:test_n], full.eval_labels[:test_n], tok,
                        TokenizedData.from_texts(tok, task.train_texts, task.train_labels, ml),
                        TokenizedData.from_texts(tok, task.eval_texts, task.eval_labels, ml),
                        TokenizedData.from_texts(tok, full.eval_texts[:test_n], full.eval_labels[:test_n], ml))
    _TASK_CACHE[key] = prep
    return prep


# ---- counting parameters the same way for every method --------------------------------------------
def head_params(model) -> int:
    """Trainable parameters of the classifier head (PEFT's modules_to_save copy, or ours)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and ("classifier" in n or ".score." in f".{n}"))


def ours_ranks(model) -> dict[str, tuple[int, int, int]]:
    from tsqlora_ext.train import lora_layers
    return {n: (m.rank, m.in_features, m.out_features) for n, m in lora_layers(model)}


def peft_ranks(model) -> dict[str, tuple[int, int, int]]:
    """{layer: (active rank, in, out)}; AdaLoRA's active components are its non-zero E entries."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and "default" in getattr(m, "lora_A", {}):
            base = m.get_base_layer()
            if hasattr(m, "lora_E"):
                r = int((m.lora_E["default"].detach() != 0).sum())
            else:
                r = int(m.r["default"])
            out[name] = (r, base.in_features, base.out_features)
    return out


def active_params(ranks: dict[str, tuple[int, int, int]], svd_form: bool, head: int) -> int:
    return head + sum(r * (i + o + (1 if svd_form else 0)) for r, i, o in ranks.values())


def _short_layer(name: str) -> str:
    """'base_model.model.bert.encoder.layer.3.attention.self.query' -> 'bert.encoder.layer.3...'
    so PEFT's and our layer names line up."""
    return name.split("base_model.model.", 1)[-1]


# ---- one run ---------------------------------------------------------------------------------------
def _train_args(settings: TaskSettings, lr: float):
    from tsqlora_ext.train import TrainArgs
    return TrainArgs(lr=lr, epochs=settings.epochs, batch_size=settings.batch_size,
                     max_length=settings.max_length, eval_batch_size=settings.eval_batch_size,
                     num_workers=1, progress=False)


def _base_config(seed: int, settings: TaskSettings):
    from tsqlora_ext import pipeline
    config, _, _ = pipeline.demo_settings()
    return config.replace(r_init=R_INIT, target_r=TARGET_R, seed=seed,
                          calibration_batches=settings.calibration_batches)


def _steps(n_examples: int, settings: TaskSettings) -> int:
    """Optimizer steps tsqlora_ext.train makes on n examples (one micro-batch per step)."""
    from tsqlora_ext.train import optimizer_steps

    return optimizer_steps(settings.epochs, math.ceil(n_examples / settings.batch_size), 1)


class StepClock:
    """Wall time of every optimizer step (called after each; the first interval starts at start())."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def start(self) -> None:
        self.times = [time.perf_counter()]

    def __call__(self, *_args) -> None:
        self.times.append(time.perf_counter())

    def summary(self) -> dict[str, float]:
        # The first step is left out: it carries one-off costs (TsqLoRA's calibration, lazy
        # CUDA/cuBLAS set-up) for every method alike.
        d = [b - a for a, b in zip(self.times[1:], self.times[2:])]
        if not d:
            return {"step_ms_median": float("nan"), "step_ms_mean": float("nan")}
        return {"step_ms_median": 1e3 * statistics.median(d), "step_ms_mean": 1e3 * statistics.fmean(d)}


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_peft(method: str, prep: PreparedTask, settings: TaskSettings, lr: float, seed: int,
             device) -> dict[str, Any]:
    """PEFT LoRA / AdaLoRA with the loop of tsqlora_ext.train: the same loader, AdamW, linear
    schedule with warm-up, clipping, bf16 policy and per-epoch validation."""
    import torch
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from tsqlora_ext import pipeline
    from tsqlora_ext.train import _autocast, evaluate, linear_schedule, make_loader, optimizer_steps, pad_id_of
    from tsqlora_ext.wrap import DEFAULT_TARGET_MODULES

    args = _train_args(settings, lr)
    model, _ = pipeline._load_model(model_path(settings.model), prep.task.label_names, seed)
    targets = list(DEFAULT_TARGET_MODULES[MODELS[settings.model][1]])
    pad = pad_id_of(prep.tokenizer)
    loader = make_loader(prep.train_tok, batch_size=args.batch_size, max_length=args.max_length,
                         pad_id=pad, shuffle=True, seed=seed, num_workers=args.num_workers)
    per_epoch = len(loader)
    total = optimizer_steps(args.epochs, per_epoch, 1)
    sched_cfg = schedule(total)
    if method == "lora":
        cfg = LoraConfig(r=TARGET_R, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                         task_type="SEQ_CLS")
    else:
        cfg = AdaLoraConfig(init_r=R_INIT, target_r=TARGET_R, lora_alpha=16, lora_dropout=0.0,
                            target_modules=targets, task_type="SEQ_CLS", total_step=total,
                            tinit=sched_cfg["t_init"], tfinal=sched_cfg["t_final"],
                            deltaT=sched_cfg["delta_t"], beta1=0.85, beta2=0.85)
    model = get_peft_model(model, cfg).to(device)
    n_adapted = len(peft_ranks(model))
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    sched = linear_schedule(opt, int(args.warmup_ratio * total), total)
    clock = StepClock()
    _sync(device)
    t0 = time.perf_counter()
    clock.start()
    step, epoch, val_history = 0, 0, []
    while step < total:
        loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "position": 0})
        for batch in loader:
            if step >= total:
                break
            batch = {k: v.to(device) for k, v in batch.items() if k != "index"}
            with _autocast(device, args.bf16):
                loss = model(**batch).loss.float()  # AdaLoRA adds its orthogonality term here
            loss.backward()
            float(loss.detach())  # the same host sync per step as tsqlora_ext.train
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            sched.step()
            if method == "adalora":
                model.base_model.update_and_allocate(step)
            opt.zero_grad(set_to_none=True)
            step += 1
            clock()
        epoch += 1
        val_history.append(evaluate(model, prep.val_tok, batch_size=args.eval_batch_size,
                                    max_length=args.max_length, pad_id=pad, bf16=args.bf16,
                                    num_workers=args.num_workers))
        model.train()
    _sync(device)
    wall = time.perf_counter() - t0
    test = evaluate(model, prep.test_tok, batch_size=args.eval_batch_size, max_length=args.max_length,
                    pad_id=pad, bf16=args.bf16, num_workers=args.num_workers)
    ranks = {_short_layer(n): v for n, v in peft_ranks(model).items()}
    return {"val": val_history[-1], "test": test, "wall_s": wall, **clock.summary(),
            "optimizer_steps": step, "train_examples": len(prep.train_tok), "warmup_examples": 0,
            "adapted_layers": n_adapted, "schedule": sched_cfg if method == "adalora" else None,
            "final_ranks": {n: r for n, (r, _, _) in ranks.items()},
            "params_active": active_params(ranks, method == "adalora", head_params(model))}


def run_tsqlora(methods: list[str], prep: PreparedTask, settings: TaskSettings, lr: float, seed: int,
                device, preference: str) -> list[dict[str, Any]]:
    """TsqLoRA runs of one (task, lr, seed): one method, or several quality / random arms. The arms
    share one gate, warm-up and scoring pass, which depend on none of them, and each trains its
    own copy of the warmed-up model: the run it would make alone (``train`` reseeds torch and the
    selection draws from its own generator), and each arm's wall time counts the shared part."""
    import copy

    import numpy as np

    from tsqlora_ext import pipeline
    from tsqlora_ext.train import evaluate, pad_id_of, train
    from tsqlora_ext.wrap import wrap

    selecting = {method_family(m)[0] for m in methods} <= {"quality", "random"}
    if len(methods) > 1 and not selecting:
        raise ValueError(f"only quality / random arms share a run, got {methods}")
    args = _train_args(settings, lr)
    config = _base_config(seed, settings).replace(quality_preference=preference)
    if methods[0] == "tsqlora_params":
        # The budget counts parameters: at the end those of rank 8 in every layer, i.e. PEFT
        # LoRA r=8's plus one E entry per component, wherever the rank went.
        config = config.replace(budget_unit="params")
    elif methods[0] == "no_sens_init":
        config = config.replace(sensitivity_init=False)
    elif methods[0] == "no_realloc":
        # The initial allocation shares the FINAL budget (8 per layer on average) by sensitivity.
        config = config.replace(r_init=TARGET_R, dynamic=False)
    model, _ = pipeline._load_model(model_path(settings.model), prep.task.label_names, seed)
    model = wrap(model, config, verbose=False).to(device)
    pad = pad_id_of(prep.tokenizer)
    t0 = time.perf_counter()
    if selecting:
        pool, gate_drops = pipeline._gate(prep.task, seed)
        pool_rows = np.flatnonzero(pool)
        half_epoch = math.ceil(0.5 * len(pool_rows) / args.batch_size)
        warm_steps = min(config.score_warmup, settings.warmup_cap or half_epoch)
        config = config.replace(score_warmup=warm_steps)
        warm, scores = pipeline._score(model, prep.tokenizer, prep.train_tok.subset(pool_rows), config, args)
        scores.index = pool_rows[scores.index]
        # What the pipeline samples by: the selection score (quality_preference applied), not Q.
        q_scores, q_flagged = pipeline.row_scores(scores, len(pool))
    shared_s = time.perf_counter() - t0
    # The scoring pass serves the quality arms only (a random arm needs the gate and the warm-up,
    # not the scores), so a random arm's wall time leaves it out.
    scoring_s = scores.meta["seconds"] if selecting else 0.0
    out = []
    for method in methods:
        t1 = time.perf_counter()
        kind, fraction = method_family(method)
        rows = np.arange(len(prep.train_tok))
        info: dict[str, Any] = {"warmup_examples": 0}
        if selecting:
            want = max(1, round(fraction * len(pool)))  # the same count for quality and random
            # Random: Gumbel-top-k of equal scores, i.e. uniform among the gated pool.
            q = q_scores.copy() if kind == "quality" else np.zeros_like(q_scores)
            flagged = q_flagged.copy() if kind == "quality" else np.zeros_like(q_flagged)
            # _select keeps data_fraction x the gated pool, replacing what the guard drops.
            sel = pipeline._select(prep.task, q, flagged, pool,
                                   config.replace(data_fraction=min(1.0, want / int(pool.sum()))))
            rows = np.sort(np.asarray(sel.indices, dtype=np.int64))
            info = {"warmup_examples": int(warm["examples"]) if warm else 0, "warmup_steps": warm_steps,
                    "pool": int(pool.sum()), "gate_drops": gate_drops,
                    "flagged_mislabeled": int(flagged.sum()),
                    "guard": (scores.meta or {}).get("mixture"),
                    "quality_preference": preference if kind == "quality" else None,
                    "selected": int(len(rows)), "requested": int(want),
                    "warmup_score_s": shared_s, "scoring_s": scoring_s,
                    "shared_with": [m for m in methods if m != method]}
        arm_model = copy.deepcopy(model) if len(methods) > 1 else model
        total = _steps(len(rows), settings)
        run_config = config.replace(**schedule(total)) if config.dynamic else config
        clock = StepClock()
        clock.start()
        result = train(arm_model, prep.train_tok.subset(rows), prep.val_tok, run_config, args,
                       tokenizer=prep.tokenizer, on_step=clock)
        _sync(device)
        wall = shared_s - (scoring_s if kind == "random" else 0.0) + time.perf_counter() - t1
        test = evaluate(arm_model, prep.test_tok, batch_size=args.eval_batch_size,
                        max_length=args.max_length, pad_id=pad, bf16=args.bf16,
                        num_workers=args.num_workers)
        ranks = ours_ranks(arm_model)
        out.append({"method": method, "val": result.metrics, "test": test, "wall_s": wall,
                    **clock.summary(), "optimizer_steps": result.optimizer_steps,
                    "reallocations": result.reallocations, "train_examples": int(len(rows)), **info,
                    "adapted_layers": len(ranks),
                    "schedule": schedule(total) if config.dynamic else None,
                    "final_ranks": {n: r for n, (r, _, _) in ranks.items()},
                    "rank_history": result.rank_history if method in ("tsqlora", "tsqlora_params") else None,
                    "params_active": active_params(ranks, True, head_params(arm_model))})
        del arm_model
    return out


def run_one(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worker entry point: the runs of one (task, lr, seed), one method or several quality /
    random arms sharing their warm-up (see run_tsqlora); errors come back as records."""
    import torch
    t0 = time.perf_counter()
    first = specs[0]
    try:
        settings = TaskSettings(**first["settings"])
        device = torch.device(first["device"])
        prep = prepare(first["task"], settings)
        load_s = time.perf_counter() - t0
        methods = [s["method"] for s in specs]
        if methods[0] in ("lora", "adalora"):
            outs = [run_peft(methods[0], prep, settings, first["lr"], first["seed"], device)]
        else:
            outs = run_tsqlora(methods, prep, settings, first["lr"], first["seed"], device,
                               first["quality_preference"])
        done = {"prepare_s": load_s, "run_s": time.perf_counter() - t0, "runs_in_worker_call": len(specs),
                "threads": torch.get_num_threads(), "pid": os.getpid(), "versions": _versions(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return [{**{k: spec[k] for k in ("key", "task", "method", "lr", "seed", "device", "jobs",
                                         "settings_id")}, **out, **done}
                for spec, out in zip(specs, outs)]
    except Exception:  # the runs are reported and retried on the next invocation, never recorded
        return [{"key": spec["key"], "error": traceback.format_exc()} for spec in specs]


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    v = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


def _init_worker(threads: int) -> None:
    watch_parent()  # a killed driver must not leave workers training on for nobody
    import torch
    from transformers.utils import logging as hf_logging
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()  # the per-run "classifier newly initialised" load report
    hf_logging.disable_progress_bar()


# ---- the results file ----------------------------------------------------------------------------
class RunStore:
    """Finished runs, one JSON object per line; every add re-writes the file atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: list[dict[str, Any]] = []
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        self.runs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"line {n} of {path}: not JSON ({e}); move the file aside "
                                         "to start over") from None

    def done(self, key: str, sid: str) -> dict[str, Any] | None:
        return next((r for r in self.runs if r["key"] == key and r["settings_id"] == sid), None)

    def add(self, run: dict[str, Any]) -> None:
        from tsqlora_ext.files import atomic_write

        self.runs.append(run)
        atomic_write(self.path, lambda tmp: tmp.write_text(
            "".join(json.dumps(r, allow_nan=True) + "\n" for r in self.runs)))


def run_key(task: str, method: str, lr: float, seed: int, preference: str | None = None) -> str:
    key = f"{task}|{method}|lr={lr:g}|seed={seed}"
    preference = preference or default_preference()
    # A quality run made with another quality_preference is another run: neither skipped as done
    # nor summarised with this one. 'moderate', the default when the first grids ran, keeps the
    # bare keys those runs were stored under.
    if method_family(method)[0] == "quality" and preference != "moderate":
        key += f"|preference={preference}"
    return key


@functools.lru_cache(maxsize=None)
def default_preference() -> str:
    from tsqlora_ext import pipeline
    return pipeline.demo_settings()[0].quality_preference


def pick_lr(runs: list[dict[str, Any]], lrs, seed: int) -> float | None:
    """The learning rate with the best validation accuracy on ``seed`` (ties: the smaller rate);
    None until every rate of the grid has finished on that seed."""
    got = {r["lr"]: r["val"]["accuracy"] for r in runs if r["seed"] == seed}
    if any(lr not in got for lr in lrs):
        return None
    return max(sorted(lrs), key=lambda lr: (got[lr], -lr))


# ---- planning and running ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _n_train(task: str) -> int:
    from tsqlora_ext import pipeline
    n = len(pipeline.bundled_task(task).train_texts)
    return n - round(VAL_FRACTION * n)


def estimate_steps(task: str, method: str, settings: TaskSettings) -> int:
    """Optimizer steps of one run (warm-up included), from the split sizes."""
    from tsqlora_ext import pipeline
    n_train = _n_train(task)
    if settings.limit_train:
        n_train = min(n_train, settings.limit_train)
    kind, f = method_family(method)
    steps = _steps(max(1, round(f * n_train)), settings)
    if kind in ("quality", "random"):
        config, _, _ = pipeline.demo_settings()
        steps += min(config.score_warmup,
                     settings.warmup_cap or math.ceil(0.5 * n_train / settings.batch_size))
    return steps


def run_grid(opts, store: RunStore, name: str) -> int:
    settings = task_settings(opts.model, opts.quick, opts.device)
    lrs = opts.lrs
    specs_by_group: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def spec(task, method, lr, seed):
        s = settings[task]
        return {"key": run_key(task, method, lr, seed, opts.quality_preference), "task": task,
                "method": method, "lr": lr, "seed": seed, "device": opts.device, "jobs": opts.jobs,
                "settings": dataclasses.asdict(s), "settings_id": settings_id(s, task),
                "quality_preference": opts.quality_preference}

    stage1, n_total, steps_total = [], 0, 0
    for task in opts.tasks:
        for method in opts.methods:
            group = [spec(task, method, lr, opts.seeds[0]) for lr in lrs]
            specs_by_group[(task, method)] = group
            stage1 += group
            per_run = estimate_steps(task, method, settings[task])
            n_total += len(lrs) + len(opts.seeds) - 1
            steps_total += per_run * (len(lrs) + len(opts.seeds) - 1)
    todo1 = [s for s in stage1 if not store.done(s["key"], s["settings_id"])]
    print(f"{name}: {len(opts.tasks)} task(s) x {len(opts.methods)} method(s); learning rates "
          f"{list(lrs)} on seed {opts.seeds[0]}, then seeds {list(opts.seeds[1:])} at each method's "
          f"best: {n_total} runs, ~{steps_total:,} optimizer steps in all; "
          f"{n_total - (len(stage1) - len(todo1)) - _stage2_done(store, opts, specs_by_group)} "
          f"still to run "
          f"(finished ones are skipped); {opts.jobs} worker(s) x {opts.threads} thread(s) on "
          f"{opts.device}", flush=True)
    if opts.plan:
        return 0
    expanded: set[tuple[str, str]] = set()
    t0 = time.perf_counter()
    failed = 0
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=opts.jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(opts.threads,)) as ex:
        pending: dict[Any, list[dict[str, Any]]] = {}

        def submit(specs):
            for job in worker_calls(specs, settings):
                pending[ex.submit(run_one, job)] = job

        def expand_ready():
            ready = []
            for group_key, group in specs_by_group.items():
                if group_key in expanded:
                    continue
                finished = [store.done(s["key"], s["settings_id"]) for s in group]
                if any(r is None for r in finished):
                    continue
                expanded.add(group_key)
                best = pick_lr(finished, lrs, opts.seeds[0])
                for seed in opts.seeds[1:]:
                    s = spec(*group_key, best, seed)
                    if not store.done(s["key"], s["settings_id"]):
                        ready.append(s)
            submit(ready)

        submit(todo1)
        expand_ready()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                pending.pop(fut)
                for rec in fut.result():
                    if "error" in rec:
                        failed += 1
                        print(f"FAILED {rec['key']}:\n{rec['error']}", file=sys.stderr, flush=True)
                        continue
                    store.add(rec)
                    print(f"[{time.perf_counter() - t0:7.1f}s] {rec['key']}: val acc "
                          f"{rec['val']['accuracy']:.4f}, test acc {rec['test']['accuracy']:.4f}, "
                          f"{rec['optimizer_steps']} steps, {rec['step_ms_median']:.1f} ms/step, "
                          f"worker call {rec['run_s']:.1f}s ({rec['runs_in_worker_call']} run(s))",
                          flush=True)
            expand_ready()
    took = [r["run_s"] for r in store.runs if r["settings_id"] in {s["settings_id"] for s in stage1}]
    print(f"{name}: grid finished in {time.perf_counter() - t0:.1f}s ({failed} failed); per worker "
          f"call (model load to the last test evaluation): mean {statistics.fmean(took):.1f}s, "
          f"max {max(took):.1f}s over {len(took)} runs" if took else f"{name}: nothing ran")
    return failed


def worker_calls(specs: list[dict[str, Any]], settings: dict[str, TaskSettings]) -> list[list[dict[str, Any]]]:
    """The specs grouped into worker calls: the quality / random arms of one (task, lr, seed) share
    a call (and their warm-up and scoring pass), every other run has its own; longest calls first
    (all-data methods, bundles), so the pool drains evenly."""
    calls: dict[Any, list[dict[str, Any]]] = {}
    for s in specs:
        shared = method_family(s["method"])[0] in ("quality", "random")
        key = (s["task"], s["lr"], s["seed"], s["settings_id"]) if shared else s["key"]
        calls.setdefault(key, []).append(s)

    def steps(call):
        return sum(estimate_steps(s["task"], s["method"], settings[s["task"]]) for s in call)
    return sorted(calls.values(), key=steps, reverse=True)


def _stage2_done(store, opts, specs_by_group) -> int:
    n = 0
    for (task, method), group in specs_by_group.items():
        for seed in opts.seeds[1:]:
            n += sum(1 for r in store.runs if r["task"] == task and r["method"] == method
                     and r["seed"] == seed and r["settings_id"] == group[0]["settings_id"]
                     and r["key"] == run_key(task, method, r["lr"], seed, opts.quality_preference))
    return n


# ---- summary -------------------------------------------------------------------------------------
def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _among(x: float, xs) -> bool:
    return any(math.isclose(x, y, rel_tol=1e-9) for y in xs)


def summarize(runs: list[dict[str, Any]], lrs, seeds, command: str) -> dict[str, Any]:
    """Per task and method: the picked learning rate, mean ± std of the test metrics over seeds at
    it, parameters, times, and the per-seed difference against PEFT AdaLoRA; plus the goals.
    Only runs at the requested ``lrs`` and ``seeds`` count; a row whose rate was picked from fewer
    rates than requested, or that has fewer seeds at it, is marked ``complete: False`` (with what
    it lacks) and left out of the goals."""
    out: dict[str, Any] = {"command": command, "lr_grid": list(lrs), "seeds": list(seeds),
                           "lr_choice": f"best validation accuracy on seed {seeds[0]} (validation "
                                        f"= {VAL_FRACTION:.0%} of train, seed {VAL_SEED})",
                           "tasks": {}}
    # Only the requested grid and seeds: a runs file may hold others (an earlier call's), and a
    # row must not mix them in or pass a partial grid off as the requested one.
    lrs, seeds = tuple(lrs), list(seeds)
    runs = [r for r in runs if _among(r["lr"], lrs) and r["seed"] in seeds]
    for task in dict.fromkeys(r["task"] for r in runs):
        rows, picked = {}, {}
        task_runs = [r for r in runs if r["task"] == task]
        for method in METHODS:
            mr = [r for r in task_runs if r["method"] == method]
            if not mr:
                continue
            grid = sorted({r["lr"] for r in mr if r["seed"] == seeds[0]})
            best = pick_lr(mr, grid, seeds[0]) if grid else None
            if best is None:
                continue
            at = sorted((r for r in mr if r["lr"] == best), key=lambda r: r["seed"])
            picked[method] = {r["seed"]: r for r in at}
            acc = [r["test"]["accuracy"] for r in at]
            # Partial: the lr was picked from fewer rates than requested, or has fewer seeds.
            missing_lrs = [x for x in lrs if not _among(x, grid)]
            missing_seeds = [x for x in seeds if x not in picked[method]]
            row = {"label": LABELS[method], "lr": best, "seeds": [r["seed"] for r in at],
                   "complete": not missing_lrs and not missing_seeds,
                   "missing_lrs": missing_lrs, "missing_seeds": missing_seeds,
                   "test_accuracy": _mean_std(acc), "test_accuracy_per_seed": acc,
                   "val_accuracy_by_lr": {f"{r['lr']:g}": r["val"]["accuracy"]
                                          for r in mr if r["seed"] == seeds[0]},
                   "params_active": statistics.fmean(r["params_active"] for r in at),
                   "total_rank": statistics.fmean(sum(r["final_ranks"].values()) for r in at),
                   "train_examples": statistics.fmean(r["train_examples"] for r in at),
                   "warmup_examples": statistics.fmean(r.get("warmup_examples", 0) for r in at),
                   "optimizer_steps": statistics.fmean(r["optimizer_steps"] for r in at),
                   "wall_s": _mean_std([r["wall_s"] for r in at]),
                   # Runs recorded before a random arm's wall time left out the scoring pass
                   # (they hold no scoring_s) still count it.
                   "wall_counts_scoring": method.startswith("quality@") or (
                       method.startswith("random@") and any("scoring_s" not in r for r in at)),
                   "step_ms": _mean_std([r["step_ms_median"] for r in at])}
            if "macro_f1" in at[0]["test"]:
                row["test_macro_f1"] = _mean_std([r["test"]["macro_f1"] for r in at])
            rows[method] = row
        ref = picked.get("adalora", {})
        for method, row in rows.items():
            common = sorted(set(picked[method]) & set(ref))
            diffs = [picked[method][s]["test"]["accuracy"] - ref[s]["test"]["accuracy"] for s in common]
            row["vs_adalora"] = {"mean": _mean_std(diffs)[0], "std": _mean_std(diffs)[1],
                                 "n": len(diffs)} if diffs else None
        rank_run = picked.get("tsqlora", {}).get(seeds[0])
        # Goals only from complete rows: a partial one would be judged on fewer rates or seeds.
        out["tasks"][task] = {
            "methods": rows, "goals": goals({m: r for m, r in rows.items() if r["complete"]}, picked),
            "rank_history": rank_run["rank_history"] if rank_run else None,
            "rank_history_run": rank_run["key"] if rank_run else None,
            "device": runs[0]["device"], "versions": runs[0].get("versions"),
        }
    return out


def goals(rows: dict[str, Any], picked: dict[str, dict[int, Any]]) -> list[dict[str, Any]]:
    """The issue's four goals, measured (None when a needed method is missing), each with what
    qualifies the figure: the budget is equal total rank, not equal parameters; a quality arm
    that trained on the random arm's rows measures the random sample; a warm-up shows the model
    rows beyond the selected fraction; step times of runs that shared the machine compare no
    methods. ``met`` is None where the runs cannot decide the goal."""
    acc = {m: r["test_accuracy"][0] for m, r in rows.items()}
    res = []
    # The ordering at equal total rank (AdaLoRA's budget), and with TsqLoRA's budget counted in
    # parameters. AdaLoRA's counts rank (PEFT has no other), so its parameters follow where the
    # rank went: each row says how far the three are apart.
    for ours, goal in (("tsqlora", "TsqLoRA ≥ PEFT AdaLoRA ≥ PEFT LoRA (mean test accuracy), at equal "
                                   "total rank (the issue asks equal parameters)"),
                       ("tsqlora_params", "TsqLoRA with a parameter budget ≥ PEFT AdaLoRA ≥ PEFT LoRA "
                                          "(mean test accuracy; TsqLoRA ends at LoRA r=8's parameters "
                                          "+ 1 per component)")):
        trio = (ours, "adalora", "lora")
        if set(trio) <= acc.keys():
            res.append({"goal": goal,
                        "measured": " / ".join(f"{acc[m]:.4f}" for m in trio) + "; parameters at the "
                                    "end " + " / ".join(f"{rows[m]['params_active']:,.0f}" for m in trio),
                        "met": acc[ours] >= acc["adalora"] >= acc["lora"]})
    same_rows = False
    if {"quality@0.3", "random@0.3"} <= acc.keys():
        q, r = picked["quality@0.3"], picked["random@0.3"]
        common = sorted(set(q) & set(r))
        d = [q[s]["test"]["accuracy"] - r[s]["test"]["accuracy"] for s in common]
        # Identical results at every seed: the guard abstained and 'uniform' selection drew the
        # random arm's rows (the two arms share the seed's warm-up and scoring pass).
        same_rows = bool(d) and all(q[s]["test"] == r[s]["test"] and q[s]["final_ranks"] == r[s]["final_ranks"]
                                    for s in common)
        spread = max(rows["quality@0.3"]["test_accuracy"][1], rows["random@0.3"]["test_accuracy"][1])
        dm = _mean_std(d)[0]
        res.append({"goal": "quality 30% beats random 30% by more than the seed spread",
                    "measured": f"paired difference {100 * dm:+.2f} points over {len(d)} seed(s); "
                                f"larger seed std {100 * spread:.2f} points"
                                + ("; the two arms trained on the same rows at every seed (the "
                                   "wrong-label guard abstained)" if same_rows else ""),
                    "met": bool(d) and len(d) > 1 and dm > spread})
    if {"quality@0.3", "tsqlora"} <= acc.keys():
        gap = acc["quality@0.3"] - acc["tsqlora"]
        row, pool = rows["quality@0.3"], rows["tsqlora"]["train_examples"]
        # Rows the 30% arm saw: its selection, and the warm-up's draws (with replacement) from the
        # whole pool, in expectation.
        seen = 1 - (1 - row["train_examples"] / pool) * (1 - 1 / pool) ** row["warmup_examples"]
        res.append({"goal": "quality 30% within 0.5 points of TsqLoRA on all data",
                    "measured": f"{100 * gap:+.2f} points"
                                + (f"; with its {row['warmup_examples']:,.0f} warm-up draws from the "
                                   f"whole pool the arm saw about {100 * seen:.0f}% of the pool's rows"
                                   if row["warmup_examples"] else "")
                                + ("; its rows were the random arm's (above)" if same_rows else ""),
                    "met": gap >= -0.005})
    if {"tsqlora", "lora"} <= acc.keys():
        a, b = rows["tsqlora"]["step_ms"][0], rows["lora"]["step_ms"][0]
        shared = max(run.get("jobs", 1) for m in ("tsqlora", "lora") for run in picked[m].values())
        res.append({"goal": "TsqLoRA step time ≤ PEFT LoRA's (ours at r_init 12, LoRA at r 8)",
                    "measured": f"{a:.1f} vs {b:.1f} ms per step ({a / b:.2f}×)"
                                + (f"; not comparable: {shared} runs shared the machine (bench_step "
                                   "times them apart)" if shared > 1 else ""),
                    "met": a <= b if shared == 1 else None})
    return res


def _pm(ms: tuple[float, float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = ms
    if math.isnan(m):
        return "–"
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def _num(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.1f}"


def render_markdown(summary: dict[str, Any], title: str) -> str:
    params_note = (f"; 'TsqLoRA, parameter budget' counts its budget in parameters instead and ends "
                   f"at those of rank {TARGET_R} in every layer"
                   if any("tsqlora_params" in t["methods"] for t in summary["tasks"].values()) else "")
    randoms = [r for t in summary["tasks"].values() for m, r in t["methods"].items() if m.startswith("random@")]
    random_note = ("" if not randoms else
                   ", a random arm's too: it shares the quality arms' scoring pass, which it does not "
                   "need" if any(r.get("wall_counts_scoring", True) for r in randoms) else
                   ", a random arm's without the scoring pass it does not need")
    lines = [f"### {title}", "",
             f"Command: `{summary['command']}`. Learning rate per method: "
             f"{summary['lr_choice']}, from the grid {', '.join(f'{x:g}' for x in summary['lr_grid'])}; "
             f"test metrics are mean ± std over seeds {', '.join(map(str, summary['seeds']))} at that "
             "rate (the seeds column: those a row has), in points. A row marked *partial* had fewer "
             "rates or seeds finished (listed under its table) and is left out of the goals. Parameters: adapter components in use at the end "
             "(rank·(in+out) for LoRA, rank·(in+out+1) for the SVD-form adapters) plus the classifier "
             "head. Budget: every method ends at the same total rank, an average of "
             f"{TARGET_R} per adapted layer (AdaLoRA's definition of the budget); the parameter "
             "counts then differ with the layers the rank went to (a feed-forward component is "
             f"wider than an attention one){params_note}. Time per step: median wall time of one "
             "optimizer step (the first left out). Wall: the method's own time (gate, warm-up, "
             f"scoring and selection included{random_note}; model loading and the test evaluation "
             "excluded). Δ vs AdaLoRA: "
             "mean ± std of the per-seed difference in test accuracy.", ""]
    for task, t in summary["tasks"].items():
        multi = any("test_macro_f1" in r for r in t["methods"].values())
        v = t.get("versions") or {}
        lines += [f"**{task}** ({t['device']}{', ' + v['gpu'] if v.get('gpu') else ''}; torch "
                  f"{v.get('torch', '?')}, peft {v.get('peft', '?')})", ""]
        head = ["method", "lr", "test accuracy"] + (["macro-F1"] if multi else []) + \
            ["Δ vs AdaLoRA", "total rank", "params", "train ex. (+warm-up)", "steps", "wall s", "ms/step",
             "seeds"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, r in t["methods"].items():
            d = r["vs_adalora"]
            partial = r.get("complete") is False
            cells = [r["label"] + (" *partial*" if partial else ""), f"{r['lr']:g}",
                     _pm(r["test_accuracy"])]
            if multi:
                cells.append(_pm(r.get("test_macro_f1", (float("nan"), float("nan")))))
            warm = f" (+{int(r['warmup_examples']):,})" if r["warmup_examples"] else ""
            cells += ["–" if method == "adalora" or d is None else _pm((d["mean"], d["std"]))
                      + (f" ({d['n']} seed{'s' * (d['n'] > 1)})" if d["n"] < len(r["seeds"]) else ""),
                      f"{r['total_rank']:.0f}", f"{int(round(r['params_active'])):,}", f"{int(round(r['train_examples'])):,}{warm}",
                      f"{r['optimizer_steps']:.0f}", f"{r['wall_s'][0]:.1f}", _num(r["step_ms"][0]),
                      ", ".join(map(str, r["seeds"]))]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {r['label']}: " + "; ".join(
                     ([f"rate picked without {', '.join(f'{x:g}' for x in r['missing_lrs'])} (not "
                       f"finished on seed {summary['seeds'][0]})"] if r["missing_lrs"] else []) +
                     ([f"seed(s) {', '.join(map(str, r['missing_seeds']))} not finished at "
                       f"{r['lr']:g}"] if r["missing_seeds"] else []))
                 for r in t["methods"].values() if r.get("complete") is False]
        if notes:
            lines += ["", "Partial rows (not in the goals):"] + notes
        if t["goals"]:
            lines += ["", "| goal | measured | met |", "|---|---|---|"]
            verdict = {True: "yes", False: "NO", None: "n/a"}
            lines += [f"| {g['goal']} | {g['measured']} | {verdict[g['met']]} |" for g in t["goals"]]
        lines.append("")
    return "\n".join(lines)


def write_summary(store: RunStore, out: Path, name: str, opts, title: str) -> None:
    """Summarise the finished runs made with the current settings of the selected tasks/methods."""
    from tsqlora_ext.files import atomic_write
    from tsqlora_ext.report import write_json
    settings = task_settings(opts.model, opts.quick, opts.device)
    sids = {settings_id(settings[t], t) for t in opts.tasks}
    runs = [r for r in store.runs if r["settings_id"] in sids and r["method"] in opts.methods
            and r["key"] == run_key(r["task"], r["method"], r["lr"], r["seed"], opts.quality_preference)]
    if not runs:
        raise SystemExit(f"no finished runs with the current settings in {store.path}: run the grid first")
    # The command that made the runs (also when summarising elsewhere, e.g. after a GPU lease).
    command = "python python/experiments/compare_methods.py" + (" --quick" if opts.quick else "") + \
        (f" --model {opts.model}" if opts.model != "minilm" else "") + \
        f" --device {runs[0]['device']} --jobs {max(r.get('jobs', 1) for r in runs)}" + \
        (f" --tasks {' '.join(opts.tasks)}" if opts.tasks != list(task_settings(opts.model, opts.quick, opts.device))
         else "") + \
        (f" --methods {' '.join(opts.methods)}" if tuple(opts.methods) != METHODS else "") + \
        (f" --seeds {' '.join(map(str, opts.seeds))}" if not opts.quick and tuple(opts.seeds) != SEEDS
         else "") + \
        (f" --lrs {' '.join(f'{x:g}' for x in opts.lrs)}" if not opts.quick and opts.lrs != LR_GRID else "") + \
        (f" --tag {opts.tag}" if opts.tag else "") + \
        (f" --quality-preference {opts.quality_preference}"
         if opts.quality_preference != default_preference() and
         any(method_family(m)[0] == "quality" for m in opts.methods) else "")
    summary = summarize(runs, opts.lrs, opts.seeds, command)
    # A method of the command without a finished run has no row: say so, or the table of a grid
    # run with fewer methods would pass for the command's whole grid.
    absent = [m for m in opts.methods if not any(r["method"] == m for r in runs)]
    if absent:
        summary["methods_without_runs"] = absent
        title += f" — *no finished runs yet of {', '.join(LABELS[m] for m in absent)}*"
    write_json(summary, out / f"{name}.json")
    md = atomic_write(out / f"{name}.md", lambda tmp: tmp.write_text(render_markdown(summary, title)))
    print(md.read_text())
    print(f"wrote {out / (name + '.json')} and {md}")


def main(argv=None) -> int:
    from tsqlora_ext.config import PREFERENCES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: cores / jobs on cpu, 2 on cuda)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny subsets, 1 seed, 1 learning rate (not a result)")
    p.add_argument("--model", choices=tuple(MODELS), default="minilm")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                   help="default: every task the model's settings hold")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help=f"default {list(SEEDS)}")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help=f"default {list(LR_GRID)}")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="",
                   help="suffix of the results files' name, to keep a partial grid on another device "
                        "(e.g. --tag cpu-rt) apart from the main one")
    p.add_argument("--quality-preference", choices=PREFERENCES, default=None,
                   help="what the quality arms sample by (default: the pipeline's, "
                        "pipeline.demo_settings); another preference's runs and tables are kept apart")
    p.add_argument("--summarize", action="store_true", help="only turn finished runs into tables")
    p.add_argument("--plan", action="store_true", help="print the number of runs and steps, run nothing")
    opts = p.parse_args(argv)
    if opts.jobs < 1:
        p.error("--jobs must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", opts.tag):
        p.error(f"--tag {opts.tag!r}: use letters, digits, '.', '_' and '-' only (it names files)")
    opts.tasks = opts.tasks or list(task_settings(opts.model, opts.quick, opts.device))
    missing = set(opts.tasks) - set(task_settings(opts.model, opts.quick, opts.device))
    if missing:
        p.error(f"--model {opts.model} has no settings for {sorted(missing)}")
    opts.seeds = opts.seeds or ([0] if opts.quick else list(SEEDS))
    opts.lrs = tuple(opts.lrs or ([3e-3] if opts.quick else LR_GRID))
    if not opts.threads:
        opts.threads = 2 if opts.device == "cuda" else max(1, (os.cpu_count() or 1) // opts.jobs)
    if opts.device == "cuda" and not (opts.summarize or opts.plan):
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
    name = results_name(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    store = RunStore(opts.out / f"{name}-runs.jsonl")
    opts.quality_preference = opts.quality_preference or default_preference()
    quality = any(method_family(m)[0] == "quality" for m in opts.methods)
    if quality and opts.quality_preference != default_preference():
        name += f"-{opts.quality_preference}"  # the runs file is shared; the tables are not
    title = ("Smoke run (--quick: tiny subsets, one seed, one learning rate; NOT a result)"
             if opts.quick else f"TsqLoRA against PEFT LoRA and AdaLoRA ({model_title(opts)})")
    if opts.tag:
        title += f" — partial grid '{opts.tag}' ({opts.device}): {', '.join(LABELS[m] for m in opts.methods)}"
    if quality:
        title += f"; quality arms select with quality_preference '{opts.quality_preference}'"
    failed = 0 if opts.summarize else run_grid(opts, store, name)
    if opts.plan:
        return 0
    write_summary(store, opts.out, name, opts, title)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
