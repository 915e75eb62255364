"""The `tsqlora` command line.

Each subcommand is one function decorated with @subcommand: the decorator registers its name,
help and an `arguments(parser)` hook, so adding a subcommand is one function plus its arguments:

    @subcommand("train", help="...", arguments=_train_arguments)
    def _train(args) -> int: ...
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_SUBCOMMANDS: dict[str, "_Subcommand"] = {}


@dataclass
class _Subcommand:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def subcommand(name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Registers `fn(args) -> exit code` as `tsqlora <name>`."""
    def register(fn: Callable[[argparse.Namespace], int]):
        if name in _SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is registered twice")
        _SUBCOMMANDS[name] = _Subcommand(name, help, arguments, fn)
        return fn
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsqlora", description="TsqLoRA: quality-aware data selection and "
                                     "sensitivity-aware variable-rank LoRA.")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in _SUBCOMMANDS.values():
        p = subs.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    # OSError: a path that is a folder, unwritable, ...; ArithmeticError: training or a warm-up
    # that diverged (FloatingPointError), whose message says what to change.
    except (ValueError, OSError, TypeError, ArithmeticError) as e:
        print(f"tsqlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tsqlora {args.command}: interrupted" + (
            f" (continue with --resume {args.resume or args.out})" if args.command == "train" else ""),
            file=sys.stderr)
        return 130


# ---- tsqlora select ----------------------------------------------------------------------------

def _select_arguments(p: argparse.ArgumentParser) -> None:
    from .selector import GateConfig

    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="jsonl, csv, tsv or parquet file")
    io.add_argument("--text-field", default="text", help="the text column (default: text)")
    io.add_argument("--label-field", default=None, help="the label column (stratifies the selection)")
    io.add_argument("--scores", default=None, help="per-row scores: jsonl with 'score' (and optional 'index', "
                    "'p_mislabeled') or .npy; without it the selection is uniform over the filtered pool")
    io.add_argument("--out", required=True, help="the kept rows, in the input's format")
    io.add_argument("--indices", default=None, help="kept row ids, one a line: 0-based positions among "
                    "the rows read, not counting the lines --skip-bad skips (default: <out>.indices.txt)")
    io.add_argument("--report", default=None, help="report JSON (default: <out>.report.json)")
    io.add_argument("--skip-bad", action="store_true", help="count and report malformed lines instead of failing")
    io.add_argument("--max-line-bytes", type=int, default=16 << 20, help="longer records are malformed")
    io.add_argument("--threads", type=int, default=None, help="C++ threads (default: all cores)")

    sel = p.add_argument_group("selection")
    size = sel.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", type=float, help="keep this share of the filtered pool, in (0, 1]")
    size.add_argument("--count", type=int, help="keep this many rows")
    sel.add_argument("--temperature", type=float, default=1.0, help="τ of Gumbel-top-k of score/τ "
                     "(0: top-k, inf: uniform)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--no-stratify", action="store_true", help="do not keep each label's share")
    sel.add_argument("--mislabel-threshold", type=float, default=0.5,
                     help="the wrong-label guard drops rows whose P(wrong label) exceeds this "
                     "(likely_mislabeled); refitted from the scores file's 'loss' column as "
                     "tsqlora train does, else read from its 'p_mislabeled' column")
    sel.add_argument("--mislabel-max-spread", type=float, default=0.55,
                     help="the guard drops nothing when the high-loss component's std/mean exceeds "
                     "this (a tail of model errors, not a cluster of wrong labels)")
    sel.add_argument("--no-mislabel-guard", dest="mislabel_guard", action="store_false",
                     help="keep the rows the wrong-label guard would drop")

    gate = p.add_argument_group("heuristic gate")
    gate.add_argument("--no-gate", action="store_true", help="skip every gate rule")
    defaults = GateConfig()
    for name in ("length", "symbol_ratio", "non_alpha_ratio", "repeated_lines", "repeated_ngrams",
                 "exact_dup", "near_dup"):
        gate.add_argument(f"--no-{name.replace('_', '-')}", dest=f"gate_{name}", action="store_false",
                          help=f"switch off the {name} rule")
    for name, typ in (("min_words", int), ("max_words", int), ("max_symbol_ratio", float),
                      ("max_non_alpha_ratio", float), ("max_dup_line_frac", float), ("ngram_min_words", int),
                      ("shingle_size", int), ("bands", int), ("rows", int), ("near_dup_threshold", float)):
        gate.add_argument(f"--{name.replace('_', '-')}", dest=f"gate_{name}", type=typ,
                          default=getattr(defaults, name), help=f"default {getattr(defaults, name)}")


@subcommand("select", help="Gate, score-filter and sample a subset of a dataset.", arguments=_select_arguments)
def _select(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .mislabel import guard_outcome
    from .selector import GateConfig, select

    gate = False
    if not args.no_gate:
        gate = GateConfig(**{k[len("gate_"):]: v for k, v in vars(args).items() if k.startswith("gate_")})
    out = Path(args.out)
    result = select(args.input, text_field=args.text_field, label_field=args.label_field, scores=args.scores,
                    fraction=args.fraction, count=args.count, temperature=args.temperature, seed=args.seed,
                    stratify=False if args.no_stratify else None, gate=gate,
                    mislabel_guard=args.mislabel_guard, mislabel_threshold=args.mislabel_threshold,
                    mislabel_max_spread=args.mislabel_max_spread, num_threads=args.threads,
                    skip_bad=args.skip_bad, max_line_bytes=args.max_line_bytes, out=out,
                    indices_out=args.indices or out.with_name(out.name + ".indices.txt"),
                    report_out=args.report or out.with_name(out.name + ".report.json"))
    counts = ", ".join(f"{r} {c}" for r, c in result.reason_counts.items() if c)
    guard = result.report.get("mislabel_guard")  # None: no scores file or no loss to fit
    if guard:
        guard = guard_outcome(guard["flagged"], guard.get("threshold"), guard.get("abstains"))
    print(f"kept {len(result.indices)} of {result.report['rows']} rows ({counts})"
          + (f"; skipped {len(result.bad_lines)} bad lines" if result.bad_lines else "")
          + (f"; wrong-label guard: {guard}" if guard else ""))
    return 0




# ---- tsqlora train / tsqlora demo (issue 7) -------------------------------------------------------

def _dataclass_flags(p: argparse.ArgumentParser, cls, title: str, only=None) -> None:
    """One --flag per field of a config dataclass (per field in ``only`` when given), with the
    field's help. Flags default to 'not given' so that --config values are only overridden by what
    the user typed."""
    import dataclasses

    group = p.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help texts; the fields' texts quote percentages.
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if f.name in REGEX_OR_NAMES:
            help_text += " On the command line one value holding a regex character is the regex."
        kw: dict = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # The declared type, not the default's: target_r is a float whose default is the int 8.
        # Annotations are strings here ("int | None", "list[str] | str | None"): the first
        # alternative is the flag's type.
        ann = str(f.type).split("|")[0].strip()
        if ann == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif ann.startswith("tuple["):
            kw.update(nargs=len(default), type=float)
        elif ann.startswith("list["):
            kw.update(nargs="+")
        else:
            kw["type"] = {"int": int, "float": float}.get(ann, str)
        group.add_argument(flag, **kw)


def _settings(args: argparse.Namespace, other_flags: tuple[str, ...]) -> tuple[dict, dict]:
    """(TsqLoRAConfig fields, TrainArgs fields): the --config file's, overridden by the flags typed
    (every flag but ``other_flags``, --config and the subcommand)."""
    import json

    from .config import TsqLoRAConfig, check_fields, read_text
    from .train import TrainArgs

    method, training = {}, {}
    if args.config:
        try:
            values = json.loads(read_text(args.config))
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.config}: not valid JSON ({e})") from None
        method, training = _split_settings(values, args.config)
        # Checked here, while the file can still be named (flags override its values below).
        check_fields(TsqLoRAConfig, method, args.config)
        check_fields(TrainArgs, training, args.config)
    flags = {k: v for k, v in vars(args).items()
             if not k.startswith("_") and k not in ("command", "config", *other_flags)}
    for name in REGEX_OR_NAMES & flags.keys():
        # nargs="+" always gives a list, which wrap reads as name suffixes: one value that can
        # only be a regex (module names hold no such characters) is the regex the field allows.
        if len(flags[name]) == 1 and REGEX_CHARS & set(flags[name][0]):
            flags[name] = flags[name][0]
    m_flags, t_flags = _split_settings(flags, "flags")
    method.update(m_flags)
    training.update(t_flags)
    return method, training


# The config fields that take module-name suffixes or one regex, and the characters that mark a
# --flag's single value as the regex.
REGEX_OR_NAMES = frozenset({"target_modules", "exclude_modules"})
REGEX_CHARS = frozenset("*+?()[]{}|^$\\")


def _model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a transformers model folder or a .gguf file (default: the "
                   "bundled MiniLM)")


def _checkpoint_dir_of(run_file: Path) -> str | None:
    """The checkpoint folder an earlier run's run.json names (None without a readable one)."""
    import json

    try:
        folder = json.loads(run_file.read_text())["train"]["checkpoint_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if isinstance(folder, str) else None


def _checkpoint_dir(folder: str) -> str:
    """--checkpoint-dir as an absolute path, refused before anything runs when it cannot be one."""
    import os

    if not folder:
        raise ValueError("--checkpoint-dir: empty (give a folder; --checkpoint-every 0 writes no "
                         "checkpoints)")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--checkpoint-dir {folder}: a file is there, not a folder")
    return os.path.abspath(folder)


def _check_model(model: str | None) -> None:
    """--model must be a folder with config.json or a .gguf file (None: the bundled model), said
    here rather than as from_pretrained's traceback."""
    import os

    if model is None:
        return
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"--model: no such GGUF file {model}")
    elif not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"--model {model}: not a transformers model folder (no "
                         f"{'config.json there' if os.path.isdir(model) else 'such folder'}) "
                         "nor a .gguf file")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from .config import TsqLoRAConfig
    from .train import TrainArgs

    _model_flag(p)
    p.add_argument("--data", help="training data: a jsonl/csv/tsv/parquet file or bundled:NAME "
                   "(bundled:rotten_tomatoes, bundled:bbc_news)")
    # None, not the default column, so that --resume can tell a typed flag from an absent one.
    p.add_argument("--text-field", help="the text column (default: text)")
    p.add_argument("--label-field", help="the label column (default: label)")
    p.add_argument("--eval-data", help="held-out data in the same format (default: a seeded 10%% "
                   "of --data is held out; bundled data uses its test split)")
    p.add_argument("--out", help="the report folder (metrics.json, plots, adapter/, checkpoints/)")
    p.add_argument("--config", help="a JSON file of TsqLoRAConfig and TrainArgs fields (flat, or "
                   "as {\"tsqlora\": {...}, \"train\": {...}}); flags override it")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run whose --out was DIR "
                   "(its settings are read from DIR/run.json)")
    p.add_argument("--baseline", action="store_true", help="also train plain LoRA at the same budget")
    _dataclass_flags(p, TsqLoRAConfig, "TsqLoRA method (TsqLoRAConfig)")
    _dataclass_flags(p, TrainArgs, "training (TrainArgs)")
    p.set_defaults(_parser=p)


def _split_settings(values: dict, source: str) -> tuple[dict, dict]:
    import dataclasses

    from .config import TsqLoRAConfig
    from .train import TrainArgs

    if not isinstance(values, dict):
        raise ValueError(f"{source}: settings must be a JSON object, got {type(values).__name__}")
    if set(values) <= {"tsqlora", "train"} and values:
        sections = {k: values.get(k, {}) for k in ("tsqlora", "train")}
        for k, v in sections.items():
            if not isinstance(v, dict):
                raise ValueError(f"{source}: \"{k}\" must be a JSON object of fields, got "
                                 f"{type(v).__name__}")
        return dict(sections["tsqlora"]), dict(sections["train"])
    method = {f.name for f in dataclasses.fields(TsqLoRAConfig)}
    training = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = sorted(set(values) - method - training)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}")
    return ({k: v for k, v in values.items() if k in method},
            {k: v for k, v in values.items() if k in training})


# The keys of a run.json (written by _train, read back by --resume).
_RUN_KEYS = ("model", "data", "text_field", "label_field", "eval_data", "out", "baseline", "tsqlora",
             "train")


@subcommand("train", help="Run the whole TsqLoRA pipeline (gate, score, select, calibrate, train "
            "with rank reallocation, evaluate) and write a report folder with the adapter.",
            arguments=_train_arguments)
def _train(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from . import bundled
    from .checkpoint import CheckpointManager
    from .config import TsqLoRAConfig
    from .pipeline import bundled_task, file_task, run_pipeline
    from .report import REPORT_FILES, write_json
    from .train import RESUME_MAY_CHANGE, TrainArgs

    # What a run writes into --out besides run.json (pipeline.run_pipeline, report.py).
    results_written = ("selection.json", "scores.jsonl", "adapter", *REPORT_FILES)
    if args.resume:
        typed = {k: v for k, v in vars(args).items()
                 if not k.startswith("_") and k not in ("command", "resume")
                 and v != args._parser.get_default(k)}
        refused = sorted("--" + k.replace("_", "-") for k in typed.keys() - RESUME_MAY_CHANGE)
        if refused:
            allowed = ", ".join(sorted("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE))
            raise ValueError(f"--resume continues the run in {args.resume} with the settings of its "
                             f"run.json and takes no other flag than {allowed}, got "
                             f"{', '.join(refused)} (to train with other settings, start a new run "
                             "with another --out)")
        folder = Path(os.path.abspath(args.resume))
        run_file = folder / "run.json"
        if not run_file.is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no run.json there (not a tsqlora "
                                    "train output folder)")
        try:
            run = json.loads(run_file.read_text())
            missing = [k for k in _RUN_KEYS if k not in run]
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--resume {args.resume}: {run_file} is not a run's settings "
                             f"({type(e).__name__}: {e})") from e
        if missing:
            raise ValueError(f"--resume {args.resume}: {run_file} lacks {', '.join(missing)} (not "
                             "written by tsqlora train)")
        # The run is the folder named here, wherever it now lies: its default checkpoint folder
        # moves with it (run.json of earlier versions also stored these relative to the cwd).
        if run["train"]["checkpoint_dir"] == str(Path(run["out"]) / "checkpoints"):
            run["train"]["checkpoint_dir"] = str(folder / "checkpoints")
        run["out"] = str(folder)
        if "checkpoint_dir" in typed:
            typed["checkpoint_dir"] = _checkpoint_dir(typed["checkpoint_dir"])
        # Settings that change nothing the remaining steps compute (a diverged run's error
        # suggests raising max_nonfinite_steps); run.json keeps them for the next --resume.
        run["train"].update(typed)
    else:
        if not args.data or not args.out:
            raise ValueError("--data and --out are required (or --resume DIR)")
        _check_model(args.model)
        if args.data.startswith("bundled:"):
            # A bundled task has its own columns and test split; these would be silently unused.
            for flag in ("eval_data", "text_field", "label_field"):
                if getattr(args, flag) is not None:
                    raise ValueError(f"--{flag.replace('_', '-')} applies to file data only: "
                                     f"--data {args.data} brings its own columns and test split")
        method, training = _settings(args, ("model", "data", "text_field", "label_field",
                                            "eval_data", "out", "resume", "baseline"))
        # run.json holds absolute paths: --resume may be run from another directory.
        out = os.path.abspath(args.out)
        training.setdefault("checkpoint_every", 50)
        training.setdefault("checkpoint_dir", str(Path(out) / "checkpoints"))
        if training["checkpoint_dir"] is not None:
            training["checkpoint_dir"] = _checkpoint_dir(training["checkpoint_dir"])
        train_args = TrainArgs.from_dict(training, "train args")
        # Refused here, before run.json of an earlier run is overwritten: its checkpoints (whatever
        # this run's --checkpoint-every), its results, and input files that outputs would replace.
        earlier = f"continue it with --resume {args.out}, or choose another --out"
        # The earlier run's checkpoints, wherever its run.json put them (--checkpoint-dir).
        earlier_dirs = {train_args.checkpoint_dir, _checkpoint_dir_of(Path(out) / "run.json")}
        for folder in sorted(d for d in earlier_dirs if d):
            CheckpointManager(folder).refuse_earlier_run(earlier, label=f"--out {args.out}: ")
        # A run that wrote its selection but never got to train (stopped by an error) holds no
        # results: a corrected run may replace it, where --resume would repeat the error. Results
        # without a run.json (a tsqlora demo folder) are no less someone's.
        results = [name for name in ("adapter", *REPORT_FILES) if (Path(out) / name).exists()]
        if results:
            raise ValueError(f"--out {args.out} holds the results of an earlier run "
                             f"({', '.join(results)}): " + (
                                 earlier if (Path(out) / "run.json").is_file() else "choose another --out"))
        for flag in ("data", "eval_data"):
            given = getattr(args, flag)
            if not given or given.startswith("bundled:"):
                continue
            if not os.path.isfile(given):
                raise FileNotFoundError(f"--{flag.replace('_', '-')} {given}: no such file")
            if os.path.realpath(given) in {
                    os.path.realpath(os.path.join(out, name)) for name in ("run.json", *results_written)}:
                raise ValueError(f"--{flag.replace('_', '-')} {given} is a file this run writes "
                                 f"into --out {args.out}: choose another --out")
        model = args.model or str(bundled.minilm_dir())
        run = {"model": os.path.abspath(model) if os.path.exists(model) else model,
               "data": args.data if args.data.startswith("bundled:") else os.path.abspath(args.data),
               "text_field": args.text_field or "text", "label_field": args.label_field or "label",
               "eval_data": args.eval_data and os.path.abspath(args.eval_data), "out": out,
               "baseline": args.baseline,
               "tsqlora": TsqLoRAConfig.from_dict(method, "tsqlora config").to_dict(),
               "train": train_args.to_dict()}
    config = TsqLoRAConfig.from_dict(run["tsqlora"], "run.json")
    train_args = TrainArgs.from_dict(run["train"], "run.json")
    # The data is read before run.json is written: data it refuses leaves no run behind.
    if run["data"].startswith("bundled:"):
        task = bundled_task(run["data"].split(":", 1)[1])
    else:
        task = file_task(run["data"], run["text_field"], run["label_field"], run["eval_data"],
                         seed=config.seed)
    Path(run["out"]).mkdir(parents=True, exist_ok=True)
    write_json(run, Path(run["out"]) / "run.json")
    run_pipeline(run["model"], task, run["out"], config, train_args, baseline=run["baseline"],
                 resume=bool(args.resume))
    return 0


# The fields `tsqlora score` reads (pipeline.score_file: the model's adapters from wrap, the
# warm-up and the scoring pass); the others (rank schedule, selection, training length, checkpoints)
# only matter to train, so score has no flag for them (argparse refuses them) rather than ignore them.
SCORE_METHOD_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "r_init", "r_max",
                       "lora_alpha", "lora_dropout", "init", "quality_weights",
                       "quality_preference", "score_mode", "lookahead", "score_warmup",
                       "mislabel_guard", "mislabel_threshold", "mislabel_max_spread", "seed")
SCORE_TRAIN_FIELDS = ("lr", "batch_size", "weight_decay", "max_grad_norm", "max_length", "bf16",
                      "eval_batch_size", "num_workers", "progress")


def _score_arguments(p: argparse.ArgumentParser) -> None:
    from .config import TsqLoRAConfig
    from .train import TrainArgs

    _model_flag(p)
    p.add_argument("--input", required=True, help="a jsonl/csv/tsv/parquet file with texts and labels")
    p.add_argument("--text-field", default="text", help="the text column (default: text)")
    p.add_argument("--label-field", default="label", help="the label column (default: label)")
    p.add_argument("--out", required=True, help="the scores file (jsonl, one line per input row; "
                   "<out>.meta.json beside it records the warm-up, scoring settings and guard fit)")
    p.add_argument("--config", help="a JSON file of TsqLoRAConfig and TrainArgs fields; flags "
                   "override it")
    _dataclass_flags(p, TsqLoRAConfig, "TsqLoRA method (the TsqLoRAConfig fields scoring reads)",
                     only=SCORE_METHOD_FIELDS)
    _dataclass_flags(p, TrainArgs, "warm-up and scoring pass (the TrainArgs fields scoring reads)",
                     only=SCORE_TRAIN_FIELDS)


@subcommand("score", help="Warm up an adapted model on a labelled file and write every row's "
            "quality scores (loss, G, D, C, Q, selection score, P(wrong label)) for "
            "`tsqlora select --scores`.", arguments=_score_arguments)
def _score(args: argparse.Namespace) -> int:
    from . import bundled
    from .config import TsqLoRAConfig
    from .pipeline import score_file
    from .train import TrainArgs

    _check_model(args.model)
    method, training = _settings(args, ("model", "input", "text_field", "label_field", "out"))
    training.setdefault("progress", False)
    # Scoring does not read the rank budget, but the config checks r_min <= target_r <= r_max:
    # unless given, keep them inside the --r-init/--r-max given here.
    default = TsqLoRAConfig()
    r_max = method.get("r_max", default.r_max)
    method.setdefault("target_r", min(default.target_r, r_max))
    method.setdefault("r_min", min(default.r_min, method["target_r"],
                                   method.get("r_init", default.r_init)))
    score_file(args.model or bundled.minilm_dir(), args.input, args.text_field, args.label_field,
               args.out, TsqLoRAConfig.from_dict(method, "tsqlora config"),
               TrainArgs.from_dict(training, "train args"))
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="tsqlora-demo", help="the report folder (default: tsqlora-demo)")
    p.add_argument("--quick", action="store_true", help="a few steps on a tiny subset (a smoke test)")


@subcommand("demo", help="TsqLoRA vs plain LoRA on the bundled Rotten Tomatoes with the bundled "
            "MiniLM, on the CPU, with a report folder.", arguments=_demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    from .pipeline import run_demo

    run_demo(args.out, reduced=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
