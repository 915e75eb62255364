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
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"tsqlora {args.command}: error: {e}", file=sys.stderr)
        return 2


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
    io.add_argument("--indices", default=None, help="kept row ids, one a line (default: <out>.indices.txt)")
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
                     help="drop rows whose p_mislabeled (scores file) exceeds this (likely_mislabeled)")

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

    from .selector import GateConfig, select

    gate = False
    if not args.no_gate:
        gate = GateConfig(**{k[len("gate_"):]: v for k, v in vars(args).items() if k.startswith("gate_")})
    out = Path(args.out)
    result = select(args.input, text_field=args.text_field, label_field=args.label_field, scores=args.scores,
                    fraction=args.fraction, count=args.count, temperature=args.temperature, seed=args.seed,
                    stratify=False if args.no_stratify else None, gate=gate,
                    mislabel_threshold=args.mislabel_threshold, num_threads=args.threads,
                    skip_bad=args.skip_bad, max_line_bytes=args.max_line_bytes, out=out,
                    indices_out=args.indices or out.with_name(out.stem + ".indices.txt"),
                    report_out=args.report or out.with_name(out.stem + ".report.json"))
    counts = ", ".join(f"{r} {c}" for r, c in result.reason_counts.items() if c)
    print(f"kept {len(result.indices)} of {result.report['rows']} rows ({counts})"
          + (f"; skipped {len(result.bad_lines)} bad lines" if result.bad_lines else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
