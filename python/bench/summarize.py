"""Render every benchmark results JSON in a folder as one markdown report (goals first).

    python python/bench/summarize.py python/bench/results [--out report.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "not measured"
    return (f"{v:.4g}" if isinstance(v, float) else str(v)) + unit


def render(folder: Path, pattern: str = "*.json") -> str:
    results = [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]
    if not results:
        raise SystemExit(f"no benchmark results ({pattern}) in {folder}")
    lines = ["| benchmark | device | goal | measured | target | met |", "|---|---|---|---|---|---|"]
    for r in results:
        for g in r["goals"]:
            lines.append(f"| {r['bench']}{' (--quick)' if r.get('quick') else ''} | {r['machine']} | {g['goal']} | {_fmt(g['measured'], g['unit'])} "
                         f"| {g['direction']} {_fmt(g['target'], g['unit'])} | {'yes' if g['met'] else 'NO'} |")
    for r in results:
        lines += ["", f"### {r['bench']} on {r['machine']} ({r['date']}, torch {r['torch']})"
                  + (" — smoke run (--quick), NOT a result" if r.get("quick") else ""), ""]
        if r.get("notes"):
            lines += [r["notes"], ""]
        # One table per run of rows with the same columns: a benchmark may add rows of another
        # kind (e.g. GPU bandwidth figures), whose fields the first row's header would drop.
        cols = None
        for row in r["rows"]:
            if list(row) != cols:
                cols = list(row)
                lines += [""] if lines[-1] else []
                lines.append("| " + " | ".join(cols) + " |")
                lines.append("|" + "---|" * len(cols))
            lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    text = render(args.folder)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
