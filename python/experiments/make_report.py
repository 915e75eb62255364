"""Regenerate the README's results section from the result files; no number is typed in here.

    python python/experiments/make_report.py [--readme README.md]
        [--results python/experiments/results] [--bench python/bench/results]

Replaces what lies between the lines ``<!-- results:begin -->`` and ``<!-- results:end -->`` in
the README with:
- every experiment table ``<results>/*.md`` (compare_methods.md first; a ``*-quick-*`` smoke
  table only when its full counterpart is absent), and the quality-signal AUCs of
  ``quality_signals.json`` when present;
- the plots, drawn from ``compare_methods.json`` (or its smoke counterpart) into ``<results>``:
  ``accuracy_vs_fraction.png`` (quality-selected against random fractions, mean ± std over seeds,
  TsqLoRA on all data for reference; from a ``--tag``ged partial grid when the main summary has no
  fraction arms) and ``rank_heatmap_<task>.png`` (per-layer rank over
  optimizer steps of TsqLoRA's first-seed run), each captioned with the command reproducing it;
- the benchmark goals and ratios of ``<bench>/*.json``, rendered by python/bench/summarize.py.

The README is written atomically (temporary file + rename); a README without exactly one pair of
markers, in order, is left untouched and the error says what is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tsqlora_ext.files import atomic_write

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
GENERATOR = "python python/experiments/make_report.py"


def replace_section(text: str, body: str, source: str = "README") -> str:
    """``text`` with the lines between the markers replaced by ``body``."""
    nb, ne = text.count(BEGIN), text.count(END)
    if nb != 1 or ne != 1:
        raise ValueError(f"{source}: needs exactly one {BEGIN!r} and one {END!r} line "
                         f"(found {nb} and {ne}); add them where the results section goes")
    i, j = text.index(BEGIN), text.index(END)
    if j < i:
        raise ValueError(f"{source}: {END!r} comes before {BEGIN!r}")
    return text[:i + len(BEGIN)] + "\n" + body.strip("\n") + "\n" + text[j:]


def _rel(path: Path, readme: Path) -> str:
    return os.path.relpath(path, readme.parent).replace(os.sep, "/")


# ---- experiment tables ---------------------------------------------------------------------------
def experiment_tables(results: Path) -> list[str]:
    """The markdown tables in ``results``; a ``-quick-`` smoke table only without its full one."""
    # The main comparison first, then its other models, then the rest by name.
    files = sorted(results.glob("*.md"), key=lambda p: (not p.name.startswith("compare_methods"),
                                                        p.name != "compare_methods.md", p.name))
    names = {p.name for p in files}
    out = []
    for p in files:
        if "-quick-" in p.name and p.name.split("-quick-")[0] + ".md" in names:
            continue
        out.append(p.read_text().strip())
    return out


def quality_signals_table(path: Path) -> str | None:
    """AUC of each quality signal for spotting flipped labels (python/experiments/quality_signals.py)."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    a = d["args"]
    cmd = ("python python/experiments/quality_signals.py "
           f"--pool {a['pool']} --ref {a['ref']} --flip {a['flip']} --warmup {a['warmup']} "
           f"--lr {a['lr']} --eta {a['eta']} --max-length {a['max_length']} "
           f"--modes {' '.join(a['modes'])} --seeds {' '.join(map(str, a['seeds']))}")
    lines = ["### Which quality signals see wrong labels", "",
             f"AUC for telling the {a['flip']:.0%} deliberately flipped labels from the rest "
             f"(pool {a['pool']}, warm-up {a['warmup']} steps, seeds {a['seeds']}; 0.5 = chance). "
             f"Command: `{cmd}`.", ""]
    modes = list(d["summary_auc"])
    lines += ["| signal | " + " | ".join(f"AUC ({m} scoring)" for m in modes) + " |",
              "|---|" + "---|" * len(modes)]
    for signal in d["summary_auc"][modes[0]]:
        cells = [f"{d['summary_auc'][m][signal]['mean']:.3f} ± {d['summary_auc'][m][signal]['std']:.3f}"
                 for m in modes]
        lines.append(f"| {signal} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def plot_fractions(summary: dict[str, Any], path: Path, title: str) -> None:
    """Test accuracy against data fraction: quality-selected and random, mean ± std over seeds."""
    tasks = {t: v["methods"] for t, v in summary["tasks"].items()
             if any(m.startswith(("quality@", "random@")) for m in v["methods"])}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (task, methods) in zip(axes[0], tasks.items()):
        for kind, marker in (("quality", "o-"), ("random", "s--")):
            pts = sorted((float(m.split("@")[1]), r) for m, r in methods.items() if m.startswith(kind + "@"))
            if pts:
                ax.errorbar([100 * f for f, _ in pts], [100 * r["test_accuracy"][0] for _, r in pts],
                            yerr=[100 * r["test_accuracy"][1] for _, r in pts], fmt=marker, capsize=4,
                            label=f"{kind}-selected" if kind == "quality" else "random")
        if "tsqlora" in methods:
            m, s = methods["tsqlora"]["test_accuracy"]
            ax.errorbar([100], [100 * m], yerr=[100 * s], fmt="D", color="black", capsize=4,
                        label="all data")
            ax.axhline(100 * m, color="black", lw=0.8, ls=":")
        ax.set_xlabel("training data selected (% of the training split; the warm-up draws from all of it)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_rank_heatmaps(summary: dict[str, Any], results: Path) -> list[tuple[str, Path, str]]:
    """One heatmap per task with a TsqLoRA rank history: (task, file, run key)."""
    out = []
    for task, v in summary["tasks"].items():
        hist = v.get("rank_history")
        if not hist:
            continue
        from tsqlora_ext.report import plot_rank_heatmap
        path = results / f"rank_heatmap_{task}.png"
        # plot_rank_heatmap writes atomically itself.
        steps = v["methods"].get("tsqlora", {}).get("optimizer_steps")
        plot_rank_heatmap(hist, list(hist[-1]["ranks"]), path, title=f"TsqLoRA rank per layer, {task}",
                          end_step=int(steps) if steps else None)
        out.append((task, path, v["rank_history_run"]))
    return out


def _fraction_arms(summary: dict[str, Any]) -> int:
    return sum(m.startswith(("quality@", "random@")) for v in summary["tasks"].values() for m in v["methods"])


def figures(results: Path, readme: Path) -> list[str]:
    """Draw the plots of compare_methods.json (or its smoke counterpart); markdown for each. The
    fraction plot comes from the summary holding the most fraction arms, the main one on a tie
    (partial grids are kept apart with --tag, e.g. CPU runs)."""
    full = results / "compare_methods.json"
    smoke_files = sorted(results.glob("compare_methods-quick-*.json"))
    tagged = sorted(p for p in results.glob("compare_methods-*.json") if p not in smoke_files)
    # A smoke run only stands in while there is no full summary (as for the tables).
    candidates = [full, *tagged] if full.is_file() else [*tagged, *smoke_files]
    if not candidates:
        return []
    summaries = {p: json.loads(p.read_text()) for p in candidates}

    def caption(path: Path) -> tuple[str, str]:
        tag = " — smoke run (--quick), NOT a result" if path in smoke_files else ""
        return tag, f"`{summaries[path]['command']} && {GENERATOR}`"

    blocks = []
    # The summary with the most fraction arms (the first of those, in the order above).
    source = max(candidates, key=lambda p: _fraction_arms(summaries[p]))
    source = source if _fraction_arms(summaries[source]) else None
    png = results / "accuracy_vs_fraction.png"
    if source is not None:
        tag, cmd = caption(source)
        summary = summaries[source]
        plot_fractions(summary, png, "quality-selected vs random data fractions" + tag)
        # The arms train on their selection after a warm-up on random draws from the whole pool.
        warm = {task: max(r.get("warmup_examples", 0) for m, r in v["methods"].items() if "@" in m)
                for task, v in summary["tasks"].items() if any("@" in m for m in v["methods"])}
        seen = (f" Every arm also trained on the warm-up's random draws from the whole training "
                f"split before its selection ({', '.join(f'{t} {w:,.0f}' for t, w in warm.items())} "
                f"draws), so it saw more rows than its share." if any(warm.values()) else "")
        blocks.append(f"![accuracy against data fraction]({_rel(png, readme)})\n\n"
                      f"*Test accuracy against the share of training data selected, quality-selected "
                      f"against random (mean ± std over seeds {', '.join(map(str, summary['seeds']))}; "
                      f"the dotted line is TsqLoRA on all data).{seen}{tag} Reproduce: {cmd}.*")
    elif png.is_file():
        png.unlink()  # drawn from runs no longer present: it would show numbers nothing backs
    heat = full if full.is_file() else next(iter(smoke_files), None)
    if heat is None:
        return blocks
    tag, cmd = caption(heat)
    for task, path, key in plot_rank_heatmaps(summaries[heat], results):
        blocks.append(f"![rank heatmap {task}]({_rel(path, readme)})\n\n"
                      f"*Rank of every adapted layer over the optimizer steps, TsqLoRA on all of "
                      f"{task} (run `{key}`){tag}. Reproduce: {cmd}.*")
    return blocks


# ---- benchmarks ----------------------------------------------------------------------------------
def bench_section(bench: Path) -> str | None:
    if not bench.is_dir() or not any(bench.glob("*.json")):
        return None
    sys.path.insert(0, str(REPO / "python" / "bench"))
    try:
        from summarize import render
    finally:
        sys.path.pop(0)
    return render(bench, "*.json")


def build_body(results: Path, bench: Path, readme: Path) -> str:
    parts = [f"*Generated by `{GENERATOR}` from the files in `{_rel(results, readme)}/` and "
             f"`{_rel(bench, readme)}/`; edit those, not this section.*"]
    tables = experiment_tables(results) if results.is_dir() else []
    signals = quality_signals_table(results / "quality_signals.json")
    figs = figures(results, readme) if results.is_dir() else []
    if tables or signals or figs:
        parts += ["### Experiments", *tables]
        if signals:
            parts.append(signals)
        parts += figs
    b = bench_section(bench)
    if b:
        # summarize.render gives the goals table first, then one detailed table per benchmark:
        # the goals stay in view, the details fold away.
        goals, _, details = b.strip().partition("\n\n")
        parts += ["### Benchmarks", f"Goals and ratios against the peers, from `{_rel(bench, readme)}/*.json` "
                  "(`python python/bench/run_all.py` on CPU, `bash python/bench/gpu_check.sh` on a GPU).",
                  goals]
        if details.strip():
            parts.append(f"<details><summary>every benchmark's rows</summary>\n\n{details.strip()}\n\n</details>")
    if len(parts) == 1:
        parts.append("No result files yet.")
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--results", type=Path, default=REPO / "python" / "experiments" / "results")
    p.add_argument("--bench", type=Path, default=REPO / "python" / "bench" / "results")
    a = p.parse_args(argv)
    readme = a.readme.resolve()
    text = readme.read_text()
    body = build_body(a.results.resolve(), a.bench.resolve(), readme)
    new = replace_section(text, body, str(readme))
    if new != text:
        atomic_write(readme, lambda tmp: tmp.write_text(new))
    print(f"{readme}: results section {'updated' if new != text else 'unchanged'} "
          f"({len(body.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
