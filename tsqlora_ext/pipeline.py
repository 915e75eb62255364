"""The whole TsqLoRA pipeline, as ``tsqlora train`` and ``tsqlora demo`` run it.

    gate (C++)  ->  warm-up (score_warmup steps on a random sample; the adapter carries on)
      ->  quality score Q of every gated example  ->  wrong-label guard + Gumbel-top-k selection
      ->  layer-sensitivity calibration (initial ranks)  ->  training with reallocation
      ->  evaluation  ->  adapter + report folder

and, for the demo, a plain-LoRA baseline at the same budget: the same number of training
examples drawn uniformly at random, the same epochs, batch and learning rate, and a fixed rank
equal to TsqLoRA's final average rank (``target_r``) in every layer.

Every phase is timed; the selection (indices) and the scores are written to the output folder
before training starts, so ``resume`` continues the training phase of an interrupted run without
repeating the warm-up and scoring (their effect on the adapter is in the checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointManager
from .config import TsqLoRAConfig
from .files import check_output
from .mislabel import guard_outcome
from .report import fmt_seconds, format_ranks, write_json, write_report
from .train import (TokenizedData, TrainArgs, dist_info, init_distributed_from_env, make_loader,
                    pad_id_of, scheduled, train)


@dataclass
class TextTask:
    """A text-classification task: train and held-out texts with integer labels."""

    name: str
    label_names: list[str]
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]


def _where(model_dir) -> dict[str, Any]:
    """from_pretrained arguments for a transformers folder or a single ``.gguf`` file (a llama.cpp
    checkpoint, which transformers dequantises)."""
    path = Path(model_dir)
    if path.suffix != ".gguf":
        return {"pretrained_model_name_or_path": model_dir}
    if not path.is_file():
        raise FileNotFoundError(f"model: no such GGUF file {path}")
    return {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}


def load_tokenizer(model_dir):
    """The model's tokenizer; one without a padding token pads with end-of-sequence (decoders
    often ship without one, and a padded batch needs it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(**_where(model_dir))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(model_dir, label_names: Sequence[str], seed: int):
    """A sequence-classification model and its tokenizer from a transformers folder or a .gguf
    file, with one output per label, named in its config (id2label, which the saved adapter
    records) so that a prediction can be read back as the file's label."""
    from transformers import AutoModelForSequenceClassification

    from .wrap import HEAD_MODULES

    tokenizer = load_tokenizer(model_dir)
    # The head is newly initialised from the torch RNG: seed it so runs repeat.
    torch.manual_seed(seed)
    # float32 master weights whatever the checkpoint's dtype (transformers' default "auto" would
    # train a half-precision checkpoint in half precision); bf16 is applied by autocast instead.
    # ignore_mismatched_sizes: a folder holding a classifier for another number of classes gets a
    # new head for these (its saved one cannot be loaded); any other weight that does not fit is
    # refused below rather than silently re-initialised.
    model, info = AutoModelForSequenceClassification.from_pretrained(
        **_where(model_dir), num_labels=len(label_names), dtype=torch.float32,
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        ignore_mismatched_sizes=True, output_loading_info=True)
    other = [key for key, *_ in info.get("mismatched_keys", [])
             if key.split(".")[0] not in HEAD_MODULES]
    if other:
        raise ValueError(f"{model_dir}: weights whose shapes do not fit the model's config: "
                         f"{', '.join(other[:5])}")
    # A decoder classifies from the last token that is not padding: it must know the padding id.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def data_fingerprint(task: TextTask) -> dict[str, Any]:
    """Row counts, label names and a sha256 of every text and label id (training, then
    evaluation rows): what a resumed run checks its data against."""
    h = hashlib.sha256()
    for texts, labels in ((task.train_texts, task.train_labels), (task.eval_texts, task.eval_labels)):
        for text in texts:
            raw = text.encode("utf-8", "surrogatepass")
            h.update(len(raw).to_bytes(8, "little") + raw)
        h.update(np.asarray(labels, dtype="<i8").tobytes())
    return {"train_rows": len(task.train_texts), "eval_rows": len(task.eval_texts),
            "labels": list(task.label_names), "sha256": h.hexdigest()}


def _gate(task: TextTask, seed: int):
    """Heuristic gate over the training texts: (pool mask, drop counts per reason)."""
    import pandas as pd

    from .selector import select

    df = pd.DataFrame({"text": task.train_texts, "label": task.train_labels})
    sel = select(df, text_field="text", label_field="label", fraction=1.0, seed=seed, stratify=False)
    pool = np.asarray(sel.reasons == "kept")
    drops = {r: c for r, c in sel.reason_counts.items() if c and r not in ("kept", "not_selected")}
    return pool, drops


def _select(task: TextTask, q: np.ndarray, mislabeled: np.ndarray, pool: np.ndarray,
            config: TsqLoRAConfig):
    import pandas as pd

    from .selector import select, selection_budget

    df = pd.DataFrame({"text": task.train_texts, "label": task.train_labels})
    drop = mislabeled & pool if config.mislabel_guard else np.zeros(len(pool), dtype=bool)
    return select(df, text_field="text", label_field="label", scores=np.where(pool, q, 0.0),
                  count=selection_budget(int(pool.sum()), int((pool & ~drop).sum()),
                                         config.data_fraction),
                  temperature=config.temperature, seed=config.seed,
                  stratify=config.stratify, drop={"likely_mislabeled": drop})


def row_scores(scores, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each training row's selection score (``quality_preference`` applied, what selection samples
    by) and wrong-label flag, from scores whose ``index`` holds training rows; rows that were not
    scored (the gate dropped them) get 0 and False."""
    score = np.zeros(n_rows)
    flagged = np.zeros(n_rows, dtype=bool)
    score[scores.index] = scores.score
    flagged[scores.index] = scores.likely_mislabeled
    return score, flagged


def _warmup(model, tokenizer, pool_tok: TokenizedData, config: TsqLoRAConfig,
            args: TrainArgs) -> dict | None:
    """``config.score_warmup`` AdamW steps on random minibatches of the pool (None when 0)."""
    from . import quality

    if config.score_warmup == 0:
        return None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    return quality.warmup(model, opt, pool_tok.padded(args.max_length, pad_id_of(tokenizer)),
                          config.score_warmup, batch_size=args.batch_size, seed=config.seed,
                          max_grad_norm=args.max_grad_norm, bf16=args.bf16, progress=args.progress)


def _score(model, tokenizer, pool_tok: TokenizedData, config: TsqLoRAConfig, args: TrainArgs):
    from . import quality

    warm = _warmup(model, tokenizer, pool_tok, config, args)
    batches = make_loader(pool_tok, batch_size=args.eval_batch_size, max_length=args.max_length,
                          pad_id=pad_id_of(tokenizer), shuffle=False, seed=0,
                          num_workers=args.num_workers)
    try:
        scores = quality.score_pool_from_config(model, list(batches), config, eta=args.lr,
                                                progress=args.progress)
    except FloatingPointError as e:
        if not warm:
            raise
        raise FloatingPointError(f"{e}; it ran {warm['steps']} warm-up steps at lr {args.lr:g}: "
                                 "lower the learning rate") from None
    return warm, scores


def run_pipeline(model_dir, task: TextTask, out, config: TsqLoRAConfig, args: TrainArgs, *,
                 baseline: bool = False, resume: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Run TsqLoRA end to end on ``task`` and write the report folder ``out``; returns the metrics
    (also in ``out/metrics.json``). ``baseline``: also train the plain-LoRA baseline. ``resume``:
    continue the interrupted run whose folder is ``out``."""
    from . import quality
    from .wrap import wrap

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    t_all = time.perf_counter()
    phases: dict[str, float] = {}
    ckpt_dir = out / "checkpoints"
    if args.checkpoint_every and args.checkpoint_dir is None:
        args = TrainArgs.from_dict({**args.to_dict(), "checkpoint_dir": str(ckpt_dir)})
    selection_file, scores_file = out / "selection.json", out / "scores.jsonl"
    ckpt = CheckpointManager(args.checkpoint_dir) if args.checkpoint_dir else None
    resuming = resume and ckpt is not None and bool(ckpt.checkpoints())
    # Checked before the gate and the scoring pass, which would overwrite selection.json and
    # scores.jsonl of the run those checkpoints belong to (train() refuses them only later).
    if resuming and not selection_file.is_file():
        raise ValueError(f"run_pipeline: {selection_file} is missing, so the run whose checkpoints "
                         f"{ckpt.directory} holds cannot be resumed")
    if args.max_steps:
        scheduled(config, args, 1)  # an impossible schedule fails now, not after the scoring pass
    data = data_fingerprint(task)
    saved = json.loads(selection_file.read_text()) if resuming else None
    # selection.json names training rows by position: other data would train on other rows.
    if saved is not None and "data" not in saved and list(task.label_names) != sorted(task.label_names):
        # Written before the data were recorded, by a version that numbered classes in text
        # order ("10" before "2"): its checkpoints' head would go on training on other class ids.
        raise ValueError(f"run_pipeline: the run in {out} was started by an earlier version, which "
                         f"numbered its classes in text order ({', '.join(sorted(task.label_names)[:12])}); "
                         f"this one numbers them by value ({', '.join(task.label_names[:12])}), so it "
                         "cannot be resumed: start a new run in another folder")
    if saved is not None and "data" in saved and saved["data"] != data:
        changed = [k for k in data if saved["data"].get(k) != data[k]]
        raise ValueError(f"run_pipeline: the data differ from those the run in {out} started on "
                         f"({', '.join(changed)} changed; {selection_file.name} records "
                         f"{saved['data']['train_rows']} training and {saved['data']['eval_rows']} "
                         "evaluation rows), so it cannot be resumed: restore the data, or start a "
                         "new run in another folder")
    if ckpt is not None and not resume:
        ckpt.refuse_earlier_run(f"continue it with resume=True (tsqlora train --resume {out}) or "
                                "write this run to another folder", label="run_pipeline: ")

    t = time.perf_counter()
    model, tokenizer = _load_model(model_dir, task.label_names, config.seed)
    model = wrap(model, config, verbose=False)
    train_all = TokenizedData.from_texts(tokenizer, task.train_texts, task.train_labels, args.max_length)
    eval_tok = TokenizedData.from_texts(tokenizer, task.eval_texts, task.eval_labels, args.max_length)
    phases["load_and_tokenize_s"] = time.perf_counter() - t

    if saved is not None:
        say(f"resuming {out}: selection of {len(saved['indices'])} examples from {selection_file.name}")
        indices = np.asarray(saved["indices"], dtype=np.int64)
        selection_info, warm, score_meta = saved["selection"], saved["warmup"], saved["scoring"]
        pool = np.asarray(saved["pool"], dtype=bool)
        scores = quality.read_scores(scores_file)
    else:
        t = time.perf_counter()
        pool, gate_drops = _gate(task, config.seed)
        phases["gate_s"] = time.perf_counter() - t
        pool_rows = np.flatnonzero(pool)
        say(f"gate: {len(pool_rows):,} of {len(pool):,} training examples pass "
            f"({', '.join(f'{k} {v}' for k, v in gate_drops.items()) or 'none dropped'})")
        t = time.perf_counter()
        warm, scores = _score(model, tokenizer, train_all.subset(pool_rows), config, args)
        scores.index = pool_rows[scores.index]  # pool position -> training row
        phases["warmup_and_scoring_s"] = time.perf_counter() - t
        q, mislabeled = row_scores(scores, len(pool))
        t = time.perf_counter()
        sel = _select(task, q, mislabeled, pool, config)
        phases["select_s"] = time.perf_counter() - t
        indices = np.sort(np.asarray(sel.indices, dtype=np.int64))
        # Before selection.json and scores.jsonl are written: a run whose schedule cannot fit the
        # selected set must leave nothing that makes its folder look like a run to resume.
        init_distributed_from_env()  # (train() joins the process group anyway; the count needs it)
        rank, world = dist_info()
        scheduled(config, args, len(make_loader(
            train_all.subset(indices), batch_size=args.batch_size, max_length=args.max_length,
            pad_id=pad_id_of(tokenizer, model), shuffle=True, seed=config.seed, rank=rank,
            world_size=world, num_workers=0)))
        score_meta = scores.meta
        selection_info = {"rows": len(pool), "pool": int(pool.sum()), "kept": int(len(indices)),
                          "fraction_of_rows": len(indices) / len(pool),
                          "data_fraction": config.data_fraction, "reasons": sel.reason_counts,
                          "temperature": config.temperature, "stratify": config.stratify}
        quality.write_scores(scores_file, scores)
        write_json({"indices": indices.tolist(), "pool": pool.tolist(), "selection": selection_info,
                    "warmup": warm, "scoring": score_meta, "data": data}, selection_file)
    say(f"selected {len(indices):,} of {len(pool):,} training examples "
        f"({100 * len(indices) / len(pool):.1f}%); wrong-label guard: {_guard_words(score_meta)}")

    t = time.perf_counter()
    result = train(model, train_all.subset(indices), eval_tok, config, args, tokenizer=tokenizer,
                   resume=args.checkpoint_dir if resuming else None)
    phases["train_s"] = time.perf_counter() - t
    tsq_wall = time.perf_counter() - t_all

    runs = {"TsqLoRA": result.to_dict()}
    base = None
    if baseline:
        t = time.perf_counter()
        base = run_baseline(model_dir, train_all, eval_tok, len(indices), task.label_names, config, args,
                            tokenizer, np.flatnonzero(pool))
        phases["baseline_s"] = time.perf_counter() - t
        runs["LoRA baseline"] = base

    kept_in_pool = np.zeros(len(pool), dtype=bool)
    kept_in_pool[indices] = True
    metrics = {
        "task": task.name, "model": str(model_dir), "labels": list(task.label_names),
        "config": config.to_dict(), "train_args": args.to_dict(),
        "selection": selection_info, "warmup": warm, "scoring": score_meta,
        "tsqlora": {**result.to_dict(), "wall_time_s": tsq_wall},
        "baseline": base,
        "phases_s": phases,
        "wall_time_s": time.perf_counter() - t_all,
        "torch_threads": torch.get_num_threads(),
    }
    write_report(out, metrics=metrics, rank_history=result.rank_history,
                 layer_names=list(result.final_ranks), runs=runs,
                 scores=scores.Q, kept=kept_in_pool[scores.index],
                 dropped_reasons={k: v for k, v in selection_info["reasons"].items()
                                  if v and k not in ("kept", "not_selected")},
                 model=model)
    if verbose:
        print(summary(metrics, out))
    return metrics


def run_baseline(model_dir, train_all: TokenizedData, eval_tok: TokenizedData, count: int,
                 label_names: Sequence[str], config: TsqLoRAConfig, args: TrainArgs,
                 tokenizer, pool_rows: np.ndarray) -> dict[str, Any]:
    """Plain LoRA at TsqLoRA's budget: the same ``score_warmup`` steps on the same random draws
    from the gated pool ``pool_rows`` as TsqLoRA's warm-up (so both see as many examples and
    steps), then ``count`` examples drawn uniformly at random (seeded), a fixed rank of
    ``target_r`` in every layer, no scoring or reallocation."""
    from .wrap import wrap

    t = time.perf_counter()
    r = max(1, int(round(config.target_r)))
    base_cfg = config.replace(r_init=r, r_min=0, r_max=r, target_r=r, dynamic=False,
                              sensitivity_init=False, total_steps=None)
    model, _ = _load_model(model_dir, label_names, config.seed)
    model = wrap(model, base_cfg, verbose=False)
    warm = _warmup(model, tokenizer, train_all.subset(pool_rows), base_cfg, args)
    rows = np.sort(np.random.default_rng(config.seed).choice(len(train_all), count, replace=False))
    base_args = TrainArgs.from_dict({**args.to_dict(), "checkpoint_dir": None, "checkpoint_every": 0})
    res = train(model, train_all.subset(rows), eval_tok, base_cfg, base_args, tokenizer=tokenizer)
    out = res.to_dict()
    out["rank"] = r
    out["examples"] = int(count)
    out["warmup"] = warm
    out["wall_time_s"] = time.perf_counter() - t
    return out


def _guard_words(score_meta: dict[str, Any]) -> str:
    """What the wrong-label guard did in a scoring pass, from the pass's meta."""
    if not score_meta.get("mislabel_guard"):
        return "off"
    return guard_outcome(score_meta["n_likely_mislabeled"], score_meta["mislabel_threshold"],
                         (score_meta.get("mixture") or {}).get("guard_abstains"))


def summary(metrics: dict[str, Any], out) -> str:
    tsq, base, sel = metrics["tsqlora"], metrics["baseline"], metrics["selection"]
    acc = tsq["metrics"].get("accuracy", float("nan"))
    lines = [
        "",
        f"== TsqLoRA on {metrics['task']} ==",
        f"selected fraction    {sel['fraction_of_rows']:.3f}  ({sel['kept']:,} of {sel['rows']:,} "
        f"training examples; {sel['pool']:,} passed the gate)",
        f"wrong-label guard    {_guard_words(metrics['scoring'])}",
        f"held-out accuracy    TsqLoRA {acc:.4f}"
        + (f"   |   plain LoRA r={base['rank']} on a random {base['examples']:,}"
           + (f" after the same {base['warmup']['steps']} warm-up steps" if base.get("warmup") else "")
           + f": {base['metrics']['accuracy']:.4f}" if base else ""),
    ]
    if "macro_f1" in tsq["metrics"]:
        lines.append(f"macro-F1             TsqLoRA {tsq['metrics']['macro_f1']:.4f}"
                     + (f"   |   baseline {base['metrics']['macro_f1']:.4f}" if base else ""))
    lines += [
        f"wall time            TsqLoRA {fmt_seconds(tsq['wall_time_s'])} (gate, warm-up, scoring, "
        f"calibration, training, evaluation)"
        + (f"   |   baseline {fmt_seconds(base['wall_time_s'])}" if base else "")
        + f"   |   total {fmt_seconds(metrics['wall_time_s'])}",
        f"trainable params     {tsq['params']['trainable']:,} allocated, "
        f"{tsq['params']['active']:,} in use at the end"
        + (f"   |   baseline {base['params']['trainable']:,}" if base else ""),
        f"optimizer steps      {tsq['optimizer_steps']} ({tsq['reallocations']} reallocations)"
        + (f"   |   baseline {base['optimizer_steps']}" if base else ""),
        f"final rank per layer (total {sum(tsq['final_ranks'].values())}):",
        format_ranks(tsq["final_ranks"]),
        f"report               {out}",
    ]
    return "\n".join(lines)


# ---- the data sources of `tsqlora train` / `tsqlora demo` -----------------------------------------
def bundled_task(name: str) -> TextTask:
    from . import bundled

    if name not in bundled.TASKS:
        raise ValueError(f"unknown bundled data set {name!r}; bundled: {sorted(bundled.TASKS)}")
    t = bundled.TASKS[name]()
    return TextTask(t.name, t.label_names, t.train_texts, t.train_labels, t.test_texts, t.test_labels)


def _read_rows(path: Path, text_field: str, label_field: str) -> tuple[list[str], list, list[int] | None]:
    """(texts, labels, line number of each row in the file, or None for parquet)."""
    from .selector import load_rows

    rows = load_rows(path, text_field, label_field)
    if rows.table is None:
        raise ValueError(f"{path}: only jsonl / csv / tsv / parquet files are supported here")
    native = hasattr(rows.table, "texts")
    texts = list(rows.table.texts) if native else rows.table.column(text_field).to_pylist()
    labels = list(rows.labels) if rows.labels is not None else None
    if labels is None:
        raise ValueError(f"{path}: no label field {label_field!r}")
    return texts, labels, [int(n) for n in rows.table.line_numbers] if native else None


def _read_labelled(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str], list[int]]:
    """(texts, label names in class-id order, label ids) of a user's file; at least two labels.
    Labels are told apart by selector.label_key (numbers by value) and numbered by
    selector.label_names (numbers in order of value, then names)."""
    from .selector import label_ids

    texts, labels, _ = _read_rows(path, text_field, label_field)
    names, ids = label_ids(labels)
    if len(names) < 2:
        raise ValueError(f"{path}: field {label_field!r} holds {len(names)} distinct label(s); "
                         "classification needs at least 2")
    return texts, names, ids.tolist()


def file_task(path, text_field: str, label_field: str, eval_path=None, eval_fraction: float = 0.1,
              seed: int = 0) -> TextTask:
    """A task from a jsonl/csv/tsv/parquet file; without ``eval_path`` a seeded ``eval_fraction``
    of it is held out for evaluation. Labels may be strings or numbers (see _read_labelled). The
    training part must hold at least two labels."""
    from .selector import label_key

    path = Path(path)
    texts, names, ids = _read_labelled(path, text_field, label_field)
    if eval_path is not None:
        eval_path = Path(eval_path)
        e_texts, e_labels, e_lines = _read_rows(eval_path, text_field, label_field)
        index = {name: i for i, name in enumerate(names)}
        e_ids = []
        for row, x in enumerate(e_labels):
            if label_key(x) not in index:
                where = f"line {e_lines[row]} of {eval_path}" if e_lines else f"{eval_path} row {row}"
                raise ValueError(f"{where}: label {x!r} does not occur in the training data {path} "
                                 f"(its labels: {', '.join(names[:20])})")
            e_ids.append(index[label_key(x)])
        return TextTask(path.stem, names, texts, ids, e_texts, e_ids)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_eval = max(1, int(round(eval_fraction * len(texts))))
    ev, tr = order[:n_eval], order[n_eval:]
    kept = {ids[i] for i in tr}
    if len(kept) < 2:
        raise ValueError(f"{path}: {len(texts)} rows, of which {len(tr)} remain for training after "
                         f"holding out {n_eval} for evaluation (eval_fraction {eval_fraction}), "
                         f"holding {len(kept)} distinct label(s); training needs at least 2 (more "
                         "rows, or the evaluation rows in their own file: --eval-data)")
    return TextTask(path.stem, names, [texts[i] for i in tr], [ids[i] for i in tr],
                    [texts[i] for i in ev], [ids[i] for i in ev])


# ---- tsqlora score ----------------------------------------------------------------------------------
def score_file(model_dir, path, text_field: str, label_field: str, out, config: TsqLoRAConfig,
               args: TrainArgs, *, verbose: bool = True):
    """Warm up a freshly adapted model on every row of ``path`` and score them: write one line per
    row (``index`` = the row's position among the file's records) with loss, G, D, C, Q, the
    selection score and P(wrong label) to ``out``, atomically; ``tsqlora select --scores`` reads
    it. Returns the QualityScores."""
    from . import quality
    from .wrap import wrap

    path, out = Path(path), Path(out)
    if out.exists() and path.exists() and os.path.samefile(out, path):
        raise ValueError(f"--out {out}: refusing to overwrite the input")
    # Before the warm-up and the scoring pass, which the error would otherwise throw away.
    for target in (out, out.with_name(out.name + ".meta.json")):
        check_output("--out", target)
    texts, names, ids = _read_labelled(path, text_field, label_field)
    model, tokenizer = _load_model(model_dir, names, config.seed)
    model = wrap(model, config, verbose=False)
    data = TokenizedData.from_texts(tokenizer, texts, ids, args.max_length)
    warm, scores = _score(model, tokenizer, data, config, args)
    quality.write_scores(out, scores)
    meta = {**scores.meta, "warmup": warm, "input": str(path), "labels": names}
    write_json(meta, out.with_name(out.name + ".meta.json"))
    if verbose:
        guard = f"wrong-label guard: {_guard_words(meta)}"
        print(f"scored {len(scores):,} rows of {path} after {warm['steps'] if warm else 0} warm-up "
              f"steps in {fmt_seconds(meta['seconds'] + (warm['seconds'] if warm else 0))}; {guard}; "
              f"wrote {out}")
    return scores


# ---- the demo ---------------------------------------------------------------------------------------
def demo_settings(reduced: bool = False) -> tuple[TsqLoRAConfig, TrainArgs, dict[str, int]]:
    """The demo's embedded defaults (see README for how they were chosen) and, in ``reduced``
    mode (the test suite), a few-step version on a tiny subset of the same data and model."""
    config = TsqLoRAConfig(r_init=12, target_r=8, r_max=16, r_min=2, lora_alpha=16.0,
                           data_fraction=0.3, score_warmup=120, calibration_batches=4,
                           t_init=30, t_final=30, delta_t=10,
                           seed=0)
    args = TrainArgs(lr=1e-3, epochs=2, batch_size=32, max_length=64, eval_batch_size=64)
    limits = {"train": 0, "eval": 0}
    if reduced:
        config = config.replace(score_warmup=2, calibration_batches=1, t_init=1, t_final=1,
                                delta_t=1, data_fraction=0.5)
        args = TrainArgs.from_dict({**args.to_dict(), "epochs": 1, "batch_size": 8,
                                    "max_length": 32, "eval_batch_size": 32, "progress": False})
        limits = {"train": 64, "eval": 32}
    return config, args, limits


def run_demo(out="tsqlora-demo", reduced: bool = False, verbose: bool = True) -> dict[str, Any]:
    from . import bundled

    # The demo may overwrite an earlier demo's report, never a `tsqlora train` run (its results
    # and the checkpoints a --resume would continue).
    if (Path(out) / "run.json").is_file() or CheckpointManager(Path(out) / "checkpoints").checkpoints():
        raise ValueError(f"run_demo: {out} is the folder of a tsqlora train run; write the demo "
                         "to another folder")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    config, args, limits = demo_settings(reduced)
    task = bundled_task("rotten_tomatoes")
    if limits["train"]:
        task = TextTask(task.name, task.label_names, task.train_texts[:limits["train"]],
                        task.train_labels[:limits["train"]], task.eval_texts[:limits["eval"]],
                        task.eval_labels[:limits["eval"]])
    return run_pipeline(bundled.minilm_dir(), task, out, config, args, baseline=True, verbose=verbose)

