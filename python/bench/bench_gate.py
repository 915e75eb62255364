"""Heuristic gate throughput: our C++ gate vs the same rules in datasets.map(num_proc=2) and a plain
Python loop, in one run, on >= 200k documents built from the bundled Rotten Tomatoes + BBC texts.

The per-document rules (length, symbol and non-alphabetic ratios, repeated lines and n-grams) are
the ones all three modes run, from one definition (tsqlora_ext.reference, text heuristics), and
their reasons are checked to be identical. Our full gate (with exact and MinHash-LSH near
duplicates, which a per-row map cannot do) is timed beside it. Reports docs/s, 1 -> 2 thread
scaling and peak RSS.

    python python/bench/bench_gate.py [--quick]
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from tsqlora_ext import _C, bundled, reference  # noqa: E402
from tsqlora_ext.selector import GateConfig  # noqa: E402

PER_DOC = GateConfig(exact_dup=False, near_dup=False)


def build_docs(n: int, seed: int = 0) -> list[str]:
    """Real texts, repeated with a few words swapped so most documents are distinct."""
    rt, bbc = bundled.rotten_tomatoes(), bundled.bbc_news()
    base = rt.train_texts + rt.test_texts
    for article in bbc.train_texts + bbc.test_texts:
        base += [p for p in article.split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    vocab = " ".join(base[:2000]).split()
    docs = []
    for i in rng.integers(len(base), size=n):
        words = base[i].split(" ")
        for _ in range(rng.integers(0, 3)):
            words[rng.integers(len(words))] = vocab[rng.integers(len(vocab))]
        docs.append(" ".join(words))
    return docs


def python_reason(text: str) -> str:
    return reference._doc_reason(reference.text_features(text, PER_DOC), PER_DOC)


def map_reason(row: dict) -> dict:
    return {"reason": python_reason(row["text"])}


def timed(fn, repeats: int = 3):
    """(fn's result, the median seconds of ``repeats`` calls): the same statistic for ours and
    every peer (a best-of-3 against one cold run would flatter ours)."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return out, float(np.median(seconds))


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    n = 50_000 if args.quick else 200_000
    docs = build_docs(n)
    rows, goals = [], []

    def ours(cfg, threads):
        (codes, _, _), dt = timed(lambda: _C.gate_texts(docs, cfg.native(), threads))
        return codes, dt

    per_doc = {t: ours(PER_DOC, t) for t in (1, 2)}
    full = {t: ours(GateConfig(), t) for t in (1, 2)}
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ours_reasons = [_C.GATE_REASONS[c] for c in per_doc[2][0]]
    assert (per_doc[1][0] == per_doc[2][0]).all() and (full[1][0] == full[2][0]).all()

    loop_reasons, t_loop = timed(lambda: [python_reason(t) for t in docs])

    import datasets
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": docs})
    mapped, t_map = timed(lambda: ds.map(map_reason, num_proc=2, keep_in_memory=True)["reason"])
    identical = ours_reasons == loop_reasons == mapped

    for name, dt in [("ours per-doc rules, 1 thread", per_doc[1][1]), ("ours per-doc rules, 2 threads", per_doc[2][1]),
                     ("ours full gate (+exact, near dup), 1 thread", full[1][1]),
                     ("ours full gate (+exact, near dup), 2 threads", full[2][1]),
                     ("plain Python loop", t_loop), ("datasets.map(num_proc=2), in memory", t_map)]:
        rows.append({"mode": name, "docs": n, "seconds": round(dt, 3), "docs_per_s": round(n / dt)})
    speedup_map = t_map / per_doc[2][1]
    rows.append({"mode": "ratios", "vs_datasets_per_doc": round(speedup_map, 2),
                 "vs_loop_per_doc": round(t_loop / per_doc[2][1], 2),
                 "full_gate_vs_datasets_per_doc": round(t_map / full[2][1], 2),
                 "scaling_1_to_2_per_doc": round(per_doc[1][1] / per_doc[2][1], 2),
                 "scaling_1_to_2_full": round(full[1][1] / full[2][1], 2),
                 "peak_rss_mb_after_ours": round(rss_ours), "identical_reasons": identical,
                 "dropped_full_gate": {r: int((full[2][0] == i).sum()) for i, r in enumerate(_C.GATE_REASONS) if i}})
    for r in rows:
        print(r)
    goals.append(common.goal("gate docs/s vs datasets.map(num_proc=2)", speedup_map, 10.0, True, "x"))
    goals.append(common.goal("gate scaling 1 -> 2 threads", per_doc[1][1] / per_doc[2][1], 1.7, True, "x"))
    common.write_results("bench_gate", "cpu", args.out, rows, goals,
                         notes=f"{n} documents; per-doc rules identical in all modes: {identical}. "
                               "Every figure: the median of 3 runs. Shared 2-core machine.")


if __name__ == "__main__":
    main()
