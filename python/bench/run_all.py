"""Run every CPU benchmark of the package and write one dated markdown report.

    python python/bench/run_all.py [--quick]

Each benchmark (python/bench/bench_*.py) times our code beside its peer (PEFT, HF datasets, plain
PyTorch) in the same process and writes python/bench/results/<bench>-cpu.json; this script runs
them one after another (they must not compete for the cores) and renders
python/bench/results/cpu-<date>.md with every goal and ratio. ``--quick`` (a smoke run) writes both
under python/bench/results/quick/ instead, and every JSON records ``"quick": true``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from summarize import render  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--out", type=Path, default=None,
                   help="default results/, or results/quick/ with --quick (a smoke run must not "
                        "overwrite the published <bench>-cpu.json and cpu-<date>.md)")
    args = p.parse_args()
    args.out = args.out or (HERE / "results" / ("quick" if args.quick else ""))
    failed = []
    for bench in sorted(HERE.glob("bench_*.py")):
        cmd = [sys.executable, str(bench), "--device", "cpu", "--out", str(args.out)]
        if args.quick:
            cmd.append("--quick")
        print(f"==== {bench.name}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(bench.name)
    report = args.out / f"cpu-{dt.date.today().isoformat()}.md"
    text = f"# CPU benchmarks, {dt.date.today().isoformat()}" + \
           (" — smoke run (--quick), NOT a result" if args.quick else "") + "\n\nCommand: `python python/bench/run_all.py" \
           f"{' --quick' if args.quick else ''}`\n\n" + render(args.out, "*-cpu.json")
    report.write_text(text)
    print(text)
    print(f"wrote {report}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
