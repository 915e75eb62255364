"""The report folder of a training run.

    <out>/metrics.json          everything measured (JSON; written atomically)
    <out>/rank_heatmap.png      rank of every adapted layer (rows) over optimizer steps (columns)
    <out>/loss.png              training loss per step (smoothed) of each run, eval points marked
    <out>/quality_hist.png      quality score Q of the examples kept vs dropped by selection
    <out>/adapter/              the trained adapter (tsqlora_ext.save_adapter)

Plots use matplotlib's non-interactive Agg backend, so a report can be written on a headless
machine; matplotlib is needed only here (``pip install tsqlora_ext[report]``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .files import atomic_write

REPORT_FILES = ("metrics.json", "rank_heatmap.png", "loss.png", "quality_hist.png")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` atomically as strict JSON: NaN and ±inf (a skipped step's loss, say) become
    null, which every JSON reader accepts, where Python's default writes the non-standard NaN."""
    atomic_write(path, lambda tmp: tmp.write_text(strict_json(obj)))


def strict_json(obj: Any, indent: int | None = 2, ensure_ascii: bool = True) -> str:
    """``obj`` as JSON text with NaN and ±inf as null, and a newline; ``indent`` None: one line.
    What JSON has no type for (a date, bytes) is written as its text."""
    return json.dumps(_strict(obj), indent=indent, allow_nan=False, ensure_ascii=ensure_ascii,
                      default=str) + "\n"


def _strict(o):
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [_strict(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    return finite_or_none(o) if isinstance(o, float) else o


def rank_matrix(rank_history: Sequence[dict[str, Any]], layer_names: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """[layers, records] rank matrix and the step of each record. ``rank_history`` holds records
    ``{"step": int, "ranks": {layer: rank}}``."""
    steps = [int(r["step"]) for r in rank_history]
    m = np.zeros((len(layer_names), len(rank_history)), dtype=np.int64)
    for j, rec in enumerate(rank_history):
        for i, name in enumerate(layer_names):
            m[i, j] = rec["ranks"].get(name, 0)
    return m, steps


def plot_rank_heatmap(rank_history, layer_names, path: Path, title: str = "rank per layer",
                      end_step: int | None = None) -> None:
    """Each record's ranks drawn from its step to the next record's (the last one's to
    ``end_step``, the run's final step; without it, one record spacing on): the records are not
    evenly spaced (step 0, then every delta_t after t_init, then the end of the budget phase)."""
    plt = _pyplot()
    m, steps = rank_matrix(rank_history, layer_names)
    fig, ax = plt.subplots(figsize=(max(6, min(16, 0.08 * len(steps) + 5)), max(4, 0.22 * len(layer_names) + 1.5)))
    if m.size:
        im = ax.pcolormesh(step_edges(steps, end_step), np.arange(len(layer_names) + 1) - 0.5, m,
                           cmap="viridis")
        ax.invert_yaxis()
        fig.colorbar(im, ax=ax, label="rank")
    ax.set_yticks(range(len(layer_names)))
    ax.set_yticklabels([_short(n) for n in layer_names], fontsize=6)
    ax.set_xlabel("optimizer step")
    ax.set_title(f"{title} (total {int(m[:, -1].sum()) if m.size else 0} at the end)")
    _save(fig, path)
    plt.close(fig)


def step_edges(steps: Sequence[int], end_step: int | None = None) -> np.ndarray:
    """Where each record's span starts, and where the last one ends: ``end_step``, or one record
    spacing (the median) after the last record."""
    last = steps[-1] + (int(np.median(np.diff(steps))) if len(steps) > 1 else 1)
    return np.array([*steps, max(end_step or last, steps[-1] + 1)], dtype=np.float64)


def _short(name: str) -> str:
    """'L<block>.<the name after the block index>' (attention.output.dense and output.dense stay
    apart), or the last two parts of a name without one."""
    parts = name.split(".")
    blocks = [i for i, p in enumerate(parts) if p.isdigit()]
    if not blocks:
        return ".".join(parts[-2:])
    # (A layer that is itself the numbered child, in an nn.Sequential, keeps its parent's name.)
    after = parts[blocks[-1] + 1:] or parts[max(0, blocks[-1] - 1):blocks[-1]]
    return f"L{parts[blocks[-1]]}." + ".".join(after)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window or window <= 1:
        return y
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")


def plot_losses(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """``runs``: name -> {"loss_history": [{step, loss}], "eval_history": [{step, loss, accuracy}]}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, run in runs.items():
        hist = run.get("loss_history") or []
        if not hist:
            continue
        steps = np.array([h["step"] for h in hist])
        loss = np.array([h["loss"] for h in hist], dtype=np.float64)
        window = max(1, len(loss) // 25)
        line, = ax.plot(steps[window - 1:] if window > 1 else steps, _smooth(loss, window),
                        label=f"{name} train (mean of {window})")
        evals = run.get("eval_history") or []
        if evals:
            ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o--", color=line.get_color(),
                    label=f"{name} eval " + ", ".join(f"acc {e['accuracy']:.3f}" for e in evals))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def quality_title(dropped_reasons: dict[str, int]) -> str:
    """The gate's drops were never scored (not in the histogram); the wrong-label guard's were
    (part of its dropped bars)."""
    title = "quality score Q"
    gate = {k: v for k, v in dropped_reasons.items() if k != "likely_mislabeled"}
    if gate:
        title += " — not scored (gate): " + ", ".join(f"{k} {v}" for k, v in gate.items())
    if dropped_reasons.get("likely_mislabeled"):
        title += f"; of the dropped, the wrong-label guard's {dropped_reasons['likely_mislabeled']}"
    return title


def plot_quality_hist(scores: np.ndarray, kept: np.ndarray, path: Path, dropped_reasons: dict[str, int] | None = None) -> None:
    """Histogram of quality scores of kept vs dropped examples (``kept``: boolean mask)."""
    plt = _pyplot()
    scores = np.asarray(scores, dtype=np.float64)
    kept = np.asarray(kept, dtype=bool)
    finite = np.isfinite(scores)
    fig, ax = plt.subplots(figsize=(7, 4))
    if finite.any():
        bins = np.linspace(scores[finite].min(), scores[finite].max(), 50) if np.ptp(scores[finite]) > 0 else 10
        ax.hist(scores[finite & ~kept], bins=bins, alpha=0.6, label=f"dropped ({int((finite & ~kept).sum())})")
        ax.hist(scores[finite & kept], bins=bins, alpha=0.6, label=f"kept ({int((finite & kept).sum())})")
    ax.set_title(quality_title(dropped_reasons or {}), fontsize=9)
    ax.set_xlabel("Q")
    ax.set_ylabel("examples")
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def write_report(out: str | os.PathLike, *, metrics: dict[str, Any], rank_history, layer_names,
                 runs: dict[str, dict[str, Any]], scores=None, kept=None,
                 dropped_reasons: dict[str, int] | None = None, model=None) -> Path:
    """Write the report folder (see the module docstring); ``model`` (wrapped) adds ``adapter/``.
    Returns the folder. The adapter and metrics.json come first: the plots are the only part that
    needs matplotlib, and a run that trained to the end must not lose its results to a missing
    plotting library (it warns and leaves the plots out)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model is not None:
        from .adapter_io import save_adapter
        save_adapter(model, out / "adapter")
    write_json(metrics, out / "metrics.json")
    try:
        _pyplot()
    except ImportError:
        warnings.warn("tsqlora report: matplotlib is not installed, so the plots are left out "
                      "(pip install tsqlora_ext[report])")
        return out
    plot_rank_heatmap(rank_history, layer_names, out / "rank_heatmap.png",
                      end_step=(metrics.get("tsqlora") or {}).get("optimizer_steps"))
    plot_losses(runs, out / "loss.png")
    if scores is not None:
        plot_quality_hist(scores, kept, out / "quality_hist.png", dropped_reasons)
    return out


def format_ranks(final_ranks: dict[str, int], per_line: int = 6) -> str:
    """Final rank per layer, grouped by block: 'L0: q 9 k 7 v 12 ...'."""
    rows: dict[str, list[str]] = {}
    for name, r in final_ranks.items():
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        block = f"L{parts[digits[-1]]}" if digits else "-"
        leaf = ".".join(parts[digits[-1] + 1:]) if digits else name
        rows.setdefault(block, []).append(f"{_ABBREV.get(leaf, leaf)} {r}")
    return "\n".join(f"  {b}: " + "  ".join(items) for b, items in rows.items())


_ABBREV = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
           "attention.output.dense": "o", "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}


def fmt_seconds(s: float) -> str:
    if s < 59.95:  # what rounds to 60.0 s reads as a minute
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)  # round first, so 119.6 s is 2 min 0 s, not 1 min 60 s
    return f"{m} min {sec} s"


def finite_or_none(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
