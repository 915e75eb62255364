"""The standalone subset selector: heuristic gate, optional quality scores, Gumbel-top-k.

    result = tsqlora_ext.select("train.jsonl", text_field="text", label_field="label",
                                scores="scores.jsonl", fraction=0.3, temperature=1.0, seed=0,
                                out="subset.jsonl", report_out="report.json")

Every input row ends with one reason: ``kept``, a gate reason (``empty``, ``too_short``,
``too_long``, ``symbol_ratio``, ``non_alpha_ratio``, ``repeated_lines``, ``repeated_ngrams``,
``exact_duplicate``, ``near_duplicate``), ``likely_mislabeled`` (the wrong-label guard, or a mask
passed in ``drop``), or ``not_selected`` (passed every filter but was not sampled). The fraction is taken of
the rows the gate keeps: rows the wrong-label guard (or ``drop``) removes are replaced by other
survivors, as ``tsqlora train`` replaces them (``selection_budget``).

The wrong-label guard follows the rules of the TsqLoRA pipeline (tsqlora_ext.mislabel): with a
``loss`` column in the scores file (what ``tsqlora score`` writes) it fits the two-component
mixture to the losses of the scored rows and drops the rows whose P(wrong label) exceeds
``mislabel_threshold``, unless the high-loss component is a majority or a tail, or the model does
not fit the bulk of the rows yet (the low-loss component's mean loss above ln 2), when it drops
nothing; with only a ``p_mislabeled`` column it drops the rows above the threshold.

jsonl, csv and tsv files are read natively (C++ thread pool, GIL released); parquet files,
``datasets.Dataset``, ``pandas.DataFrame`` and pyarrow tables hand their text column to C++ as an
Arrow buffer without copies. Outputs are written atomically, all of them or none, and never over
the input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _C
from .config import check_integers, native_seed
from .mislabel import check_guard_settings, flag_losses, guard_abstains
from .files import check_output, write_together
from .report import strict_json

GATE_REASONS: tuple[str, ...] = tuple(_C.GATE_REASONS)
REASONS: tuple[str, ...] = GATE_REASONS + ("likely_mislabeled", "not_selected")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
DEFAULT_MAX_LINE_BYTES = 16 << 20


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_share(x) -> bool:
    return _is_number(x) and 0.0 <= x <= 1.0  # (NaN fails the comparison)


@dataclass
class GateConfig:
    """Rules and thresholds of the heuristic gate; every rule can be switched off."""

    length: bool = field(default=True, metadata={"help": "drop empty, too short and too long texts"})
    min_words: int = field(default=3, metadata={"help": "fewer words: too_short"})
    max_words: int = field(default=100_000, metadata={"help": "more words: too_long"})
    symbol_ratio: bool = field(default=True, metadata={"help": "drop on (# + ... + …) per word"})
    max_symbol_ratio: float = field(default=0.1, metadata={"help": "above: symbol_ratio"})
    non_alpha_ratio: bool = field(default=True, metadata={"help": "drop on share of words without a letter"})
    max_non_alpha_ratio: float = field(default=0.2, metadata={"help": "above: non_alpha_ratio"})
    repeated_lines: bool = field(default=True, metadata={"help": "drop on share of duplicated lines"})
    max_dup_line_frac: float = field(default=0.3, metadata={"help": "above: repeated_lines"})
    repeated_ngrams: bool = field(default=True, metadata={"help": "drop on repeated word n-grams (Gopher)"})
    ngram_min_words: int = field(default=50, metadata={"help": "n-gram rules only for texts this long"})
    top_ngram: list[tuple[int, float]] = field(
        default_factory=lambda: [(2, 0.20), (3, 0.18), (4, 0.16)],
        metadata={"help": "(n, max char share of the heaviest repeated n-gram)"})
    dup_ngram: list[tuple[int, float]] = field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        metadata={"help": "(n, max char share covered by repeated n-grams)"})
    exact_dup: bool = field(default=True, metadata={"help": "drop repeats of the same lowercased word sequence"})
    near_dup: bool = field(default=True, metadata={"help": "drop MinHash-LSH near duplicates"})
    shingle_size: int = field(default=5, metadata={"help": "words per shingle"})
    bands: int = field(default=20, metadata={"help": "LSH bands"})
    rows: int = field(default=5, metadata={"help": "min-hashes per band (bands·rows permutations)"})
    near_dup_threshold: float = field(default=0.7, metadata={"help": "share of equal min-hashes to confirm"})
    minhash_seed: int = field(default=0x5EED, metadata={"help": "seed of the min-hash permutations"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that would switch a rule off or drop every row unasked: NaN fails every
        comparison (the rule never fires), a share above 1 is never exceeded, a negative threshold
        always is. Thresholds are checked also while their rule is off, so a typo is never silent."""
        def bad(msg: str):
            raise ValueError(f"GateConfig: {msg}")

        for name in ("length", "symbol_ratio", "non_alpha_ratio", "repeated_lines", "repeated_ngrams",
                     "exact_dup", "near_dup"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                bad(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_integers(self, ("min_words", "max_words", "ngram_min_words", "shingle_size", "bands", "rows",
                              "minhash_seed"), bad)
        for name in ("min_words", "ngram_min_words"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_words < max(1, self.min_words):
            bad(f"max_words must be >= 1 and >= min_words={self.min_words}, got {self.max_words}")
        # Symbols are counted per word and a word can hold several ('###'), so this ratio may exceed 1.
        if not (_is_number(self.max_symbol_ratio) and math.isfinite(self.max_symbol_ratio)
                and self.max_symbol_ratio >= 0):
            bad(f"max_symbol_ratio must be a finite number >= 0, got {self.max_symbol_ratio!r}")
        for name in ("max_non_alpha_ratio", "max_dup_line_frac", "near_dup_threshold"):
            if not _is_share(getattr(self, name)):
                bad(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("top_ngram", "dup_ngram"):
            pairs = getattr(self, name)
            if not (isinstance(pairs, (list, tuple)) and all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], numbers.Integral)
                    and not isinstance(p[0], (bool, np.bool_)) and p[0] >= 1 and _is_share(p[1])
                    for p in pairs)):
                bad(f"{name} must be a list of (n >= 1, share in [0, 1]) pairs, got {pairs!r}")
        for name in ("shingle_size", "bands", "rows"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.minhash_seed < 2**64:
            bad(f"minhash_seed must be in [0, 2**64), got {self.minhash_seed}")

    def native(self) -> _C.GateConfig:
        self.validate()  # again: a field may have been set after construction
        cfg = _C.GateConfig()
        for f in dataclasses.fields(self):
            setattr(cfg, f.name, getattr(self, f.name))
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SelectionResult:
    """What select() returns: kept row ids (ascending), every row's score (NaN when none) and
    reason, the counts per reason, the bad input lines skipped, the report, and for in-memory
    inputs the kept subset in the input's own type."""

    indices: np.ndarray
    scores: np.ndarray
    reasons: np.ndarray
    reason_counts: dict[str, int]
    bad_lines: list[tuple[int, str]]
    report: dict[str, Any]
    subset: Any = None


# ---- input -------------------------------------------------------------------------------------

@dataclass
class _Rows:
    kind: str                       # jsonl | csv | tsv | parquet | dataset | pandas | arrow | list
    n: int
    gate: Any                       # fn(native cfg, threads) -> (reasons, features, names)
    labels: list | None
    source: Any
    table: Any = None               # TextTable (files read natively) or pyarrow.Table
    bad: list = field(default_factory=list)


def _first_null(arr) -> int | None:
    """The row of an Arrow array's first null, or None."""
    if not arr.null_count:
        return None
    return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def _arrow_gate(column, name: str, where: str):
    """A gate over an Arrow string column via its buffers (no copy of the text)."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise ValueError(f"{where}: field '{name}' must hold strings, not {arr.type}")
    if (first := _first_null(arr)) is not None:
        raise ValueError(f"{where} row {first}: field '{name}' is null")
    arr = arr.cast(pa.large_string())
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = data_buf if data_buf is not None else b""
    return lambda cfg, threads: _C.gate_buffer(data, offsets, cfg, threads)


def _from_arrow(table, kind: str, text_field: str, label_field: str | None, source) -> _Rows:
    missing = [f for f in (text_field, label_field) if f and f not in table.column_names]
    if missing:
        raise ValueError(f"{_name(source)}: field '{missing[0]}' missing (columns: {', '.join(table.column_names)})")
    labels = None
    if label_field:
        column = table.column(label_field)
        # A null label would become a class of its own ("None"); a jsonl null is refused alike.
        if (first := _first_null(column.combine_chunks())) is not None:
            raise ValueError(f"{_name(source)} row {first}: field '{label_field}' is null")
        labels = column.to_pylist()
        # An empty label too, as the file readers refuse it, rather than a class of its own.
        if (first := next((i for i, v in enumerate(labels)
                           if isinstance(v, str) and not v.strip(" \t\n\r\v\f")), None)) is not None:
            raise ValueError(f"{_name(source)} row {first}: field '{label_field}' is empty")
    return _Rows(kind, table.num_rows, _arrow_gate(table.column(text_field), text_field, _name(source)),
                 labels, source, table)


def _name(source) -> str:
    return Path(source).name if isinstance(source, (str, os.PathLike)) else type(source).__name__


def load_rows(data, text_field: str, label_field: str | None = None, *, skip_bad: bool = False,
              max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, num_threads: int = 0) -> _Rows:
    """Reads a file (jsonl/csv/tsv natively; parquet through pyarrow) or takes an in-memory
    datasets.Dataset, pandas.DataFrame, pyarrow.Table or list of str."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: unknown format (use one of {', '.join(sorted(FILE_FORMATS))})")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if fmt == "parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            if table.num_rows == 0:
                raise ValueError(f"{path.name}: empty input (no rows)")
            return _from_arrow(table, "parquet", text_field, label_field, path)
        t = _C.read_table(str(path), fmt, text_field, label_field or "", skip_bad, max_line_bytes, num_threads)
        return _Rows(fmt, t.num_rows, lambda cfg, threads: _C.gate_table(t, cfg, threads), t.labels, path,
                     t, list(t.bad))
    if isinstance(data, list):
        if not data:
            raise ValueError("empty input (no rows)")
        texts = data
        return _Rows("list", len(texts), lambda cfg, threads: _C.gate_texts(texts, cfg, threads), None, data)
    kind = type(data).__module__.split(".")[0]
    if kind == "datasets":
        table = data.data.table if hasattr(data.data, "table") else data.data
        if getattr(data, "_indices", None) is not None:
            table = data.flatten_indices().data.table
        rows = _from_arrow(table, "dataset", text_field, label_field, data)
    elif kind == "pandas":
        import pyarrow as pa
        try:
            table = pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            # A column of mixed types ([1, "1", 1.0], or a number among the texts): pyarrow's
            # message is a tuple naming the column last.
            raise ValueError(f"DataFrame: a column mixes types, which Arrow cannot hold: "
                             f"{'; '.join(map(str, e.args))}; give the column one type "
                             "(df[col].astype(str))") from None
        rows = _from_arrow(table, "pandas", text_field, label_field, data)
    elif kind == "pyarrow":
        rows = _from_arrow(data, "arrow", text_field, label_field, data)
    else:
        raise TypeError(f"select: unsupported input {type(data).__name__} (a path, list of str, "
                        "datasets.Dataset, pandas.DataFrame or pyarrow.Table)")
    if rows.n == 0:
        raise ValueError("empty input (no rows)")
    return rows


def read_scores(path, n: int) -> dict[str, np.ndarray]:
    """Per-row scores from a jsonl file (one object per row: "score", optional "index" (row id,
    else line order; each row at most once) and optional "p_mislabeled") or a .npy array of
    scores. Returns arrays of length n; rows without a score get NaN."""
    path = Path(path)
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            # Without the header np.load takes the file for a pickle and says only that.
            if f.read(6) != b"\x93NUMPY":
                raise ValueError(f"{path.name}: not a .npy file (no NumPy header)")
        try:
            scores = np.load(path)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path.name}: unreadable .npy array ({e})") from None
        return {"score": _per_row_scores(scores, n, path.name)}
    cols: dict[str, np.ndarray] = {"score": np.full(n, np.nan)}
    line_of = np.zeros(n, dtype=np.int64)  # the line that scored each row (0: none yet)
    # Read as bytes and decoded line by line, so that a byte that is not UTF-8 is named with its line.
    with open(path, "rb") as f:
        row = 0
        for lineno, raw in enumerate(f, 1):
            where = f"line {lineno} of {path.name}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "score" not in obj:
                raise ValueError(f"{where}: field 'score' missing")
            i = obj.get("index", row)
            if not isinstance(i, int) or isinstance(i, bool):
                raise ValueError(f"{where}: field 'index' must be an integer, got {i!r}")
            if not 0 <= i < n:
                raise ValueError(f"{where}: index {i} outside the {n} input rows")
            if line_of[i]:
                raise ValueError(f"{where}: index {i} was already scored on line {line_of[i]}")
            line_of[i] = lineno
            for key, value in obj.items():
                if key == "index" or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                cols.setdefault(key, np.full(n, np.nan))[i] = float(value)
            row += 1
    return cols


def selection_budget(gated: int, survivors: int, fraction: float) -> int:
    """How many rows to keep: ``fraction`` of the rows the gate keeps. The wrong-label guard does
    not shrink it: the rows it drops are replaced by other survivors (all of them when fewer
    survive)."""
    return max(1, min(survivors, math.floor(fraction * gated + 0.5)))


def _per_row_scores(scores, n: int, where: str) -> np.ndarray:
    """``scores`` as n float64s, one per row: shape (n,), or (n, 1) as a column. Any other shape is
    refused, naming ``where``: flattening (n/2, 2) gave n numbers that are not per-row scores."""
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: scores must be numbers ({e})") from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{where}: scores of shape {arr.shape}; expected one per row, shape ({n},)")
    if arr.size != n:
        raise ValueError(f"{where}: {arr.size} scores for {n} rows")
    return arr


def _row_mask(mask, n: int, where: str) -> np.ndarray:
    """``mask`` as n bools, one per row. Anything else is refused, naming ``where``: row indices
    ([3, 7]) or scores cast to bool would silently drop other rows than meant."""
    arr = np.asarray(mask)
    if arr.ndim != 1 or arr.size != n:
        raise ValueError(f"{where}: a mask of shape {arr.shape}; expected one bool per row, shape ({n},)")
    if arr.dtype != bool and not (arr.size and np.isin(arr, (0, 1)).all()):
        raise ValueError(f"{where}: expected bools (True drops the row), got {arr.dtype} values "
                         f"such as {arr[~np.isin(arr, (0, 1))][:3].tolist()}")
    return arr.astype(bool)


# ---- output ------------------------------------------------------------------------------------

def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _refuse_clashing_files(data, scores, outputs: dict) -> None:
    """Before anything is written: no output may be the input or the scores file, and no two
    outputs may be the same file (the later write would replace the earlier one)."""
    inputs = {name: Path(p) for name, p in (("input", data), ("scores", scores))
              if isinstance(p, (str, os.PathLike))}
    given = [(name, Path(p)) for name, p in outputs.items() if p is not None]
    for i, (name, path) in enumerate(given):
        for in_name, in_path in inputs.items():
            if _same_file(path, in_path):
                raise ValueError(f"select: refusing to overwrite the {in_name} {in_path} with "
                                 f"{name} {path}")
        for other, other_path in given[:i]:
            if _same_file(path, other_path):
                raise ValueError(f"select: {other} {other_path} and {name} {path} are the same file")


def _subset_writer(rows: _Rows, indices: np.ndarray, out: Path):
    """write(tmp) for the kept rows as --out names them; a format that cannot be written is
    refused here, before any output is written."""
    fmt = FILE_FORMATS.get(out.suffix.lower())
    if rows.kind in ("jsonl", "csv", "tsv"):
        if fmt != rows.kind:
            raise ValueError(f"--out {out.name}: the kept rows are written in the input's format ({rows.kind})")
        t = rows.table

        def write(tmp):
            newline = t.newline  # the input's (the header carries its own)
            with open(tmp, "wb") as f:
                f.write(t.header)
                for i in indices:
                    f.write(t.raw(int(i)))
                    f.write(newline)
        return write
    if rows.kind == "list":
        raise ValueError("select: a list of str has no file format; use the returned indices")
    import pyarrow as pa
    table = rows.table.take(pa.array(indices, type=pa.int64()))
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return lambda tmp: pq.write_table(table, tmp)
    if fmt == "jsonl":
        return lambda tmp: _write_jsonl(table, tmp)
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        return lambda tmp: table.to_pandas().to_csv(tmp, sep=sep, index=False)
    raise ValueError(f"--out {out.name}: use .parquet, .jsonl, .csv or .tsv")


def _write_jsonl(table, path: Path) -> None:
    """One JSON object per row (``strict_json``), numbers exact: pandas' to_json rounded floats to
    10 significant digits (1e-12 became 0.0)."""
    with open(path, "w", encoding="utf-8") as f:
        for batch in table.to_batches():
            for row in batch.to_pylist():
                f.write(strict_json(row, indent=None, ensure_ascii=False))


def _stats(x: np.ndarray) -> dict[str, Any]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"count": 0}
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"count": int(x.size), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "p05": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
            "p95": float(q[4]), "max": float(x.max())}


def _score_report(scores: np.ndarray, kept: np.ndarray, bins: int = 20) -> dict[str, Any]:
    finite = np.isfinite(scores)
    rep: dict[str, Any] = {"kept": _stats(scores[kept]), "dropped": _stats(scores[~kept])}
    if finite.any():
        lo, hi = float(scores[finite].min()), float(scores[finite].max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        rep["histogram"] = {"edges": edges.tolist(),
                            "kept": np.histogram(scores[kept & finite], edges)[0].tolist(),
                            "dropped": np.histogram(scores[~kept & finite], edges)[0].tolist()}
    return rep


# ---- the selector ------------------------------------------------------------------------------

# A decimal number as pandas' csv reader takes one (+1, 1., .5, 007 and 1e3 included).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def label_key(value) -> str:
    """The class a label value names, as text. Numbers compare by value whatever their type or
    spelling (0, 0.0, "0.0" and 0e0 are class "0"; 1.5 is "1.5"), because a file's writer picks
    the spelling, not the class: the native jsonl reader hands a number over as its text, pyarrow
    as a float, pandas as an int. Other text is the class name without surrounding whitespace
    (csv fields keep the blanks after a comma). Booleans are "true" / "false", as jsonl spells them."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value.strip()
        if not _NUMBER.fullmatch(text):
            return text
        value = int(text) if text.lstrip("+-").isdigit() else float(text)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def label_names(keys) -> list[str]:
    """The distinct label keys in class-id order: numbers by value first (labels 0..9, 10 give
    class ids 0..10, as the file means them), then names alphabetically."""
    return sorted(set(keys), key=lambda k: (0, float(k), k) if _NUMBER.fullmatch(k) else (1, 0.0, k))


def label_ids(labels: list) -> tuple[list[str], np.ndarray]:
    """(the class names in id order, each label's class id)."""
    keys = [label_key(v) for v in labels]
    names = label_names(keys)
    index = {k: i for i, k in enumerate(names)}
    return names, np.array([index[k] for k in keys], dtype=np.int64)


def _mislabel_guard(cols: dict[str, np.ndarray], threshold: float,
                    max_spread: float) -> tuple[np.ndarray | None, dict | None]:
    """(rows flagged likely_mislabeled or None, what the guard did) from a scores file's columns."""
    if "loss" in cols:
        scored = int(np.isfinite(cols["loss"]).sum())
        flagged, mix = flag_losses(cols["loss"], threshold, max_spread)
        if mix is None:
            return flagged, {"rule": "mixture", "scored": scored, "flagged": 0, "abstains": "too_few"}
        return flagged, {"rule": "mixture", "scored": scored, "flagged": int(flagged.sum()),
                         "threshold": threshold, "max_spread": max_spread,
                         "abstains": guard_abstains(mix, max_spread=max_spread),
                         "mixture": {"weights": mix.weights, "means": mix.means, "stds": mix.stds}}
    if "p_mislabeled" in cols:
        flagged = np.nan_to_num(cols["p_mislabeled"]) > threshold
        return flagged, {"rule": "p_mislabeled", "threshold": threshold, "flagged": int(flagged.sum())}
    return None, None


def select(data, *, text_field: str = "text", label_field: str | None = None, scores=None,
           fraction: float | None = None, count: int | None = None, temperature: float = 1.0,
           seed: int = 0, stratify: bool | None = None, gate: GateConfig | None | bool = None,
           drop: dict[str, np.ndarray] | None = None, mislabel_guard: bool = True,
           mislabel_threshold: float = 0.5, mislabel_max_spread: float = 0.55,
           num_threads: int | None = None, skip_bad: bool = False,
           max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, out=None, indices_out=None,
           report_out=None) -> SelectionResult:
    """Gate, filter and sample a subset.

    data: a jsonl/csv/tsv/parquet path, datasets.Dataset, pandas.DataFrame, pyarrow.Table or list
    of str. scores: a scores file (see read_scores), an array of per-row Q, or None (uniform).
    fraction (of the rows that pass every filter, in (0, 1]) or count: how many to keep.
    temperature τ: Gumbel-top-k of Q/τ (0: top-k of Q, the seed drawing among equal Q; inf:
    uniform). stratify (default: when a label field is given): keep each label's share. gate: a
    GateConfig, None for the defaults, or False for no gate. drop: extra {reason: bool mask}
    filters applied after the gate (reason ``likely_mislabeled`` for the wrong-label guard).
    mislabel_guard / mislabel_threshold / mislabel_max_spread: the guard applied to a scores file
    (see the module docstring); the report's "mislabel_guard" entry says what it did.
    num_threads: C++ threads (default all cores).
    """
    if (fraction is None) == (count is None):
        raise ValueError("select: give exactly one of fraction and count")
    if fraction is not None and not (0.0 < fraction <= 1.0):
        raise ValueError(f"select: fraction must be in (0, 1], got {fraction}")
    if count is not None and count < 1:
        raise ValueError(f"select: count must be >= 1, got {count}")
    if not temperature >= 0:
        raise ValueError(f"select: temperature must be >= 0, got {temperature}")
    # Checked whether or not a scores file brings the guard into play, so a typo is never silent.
    check_guard_settings(mislabel_threshold, mislabel_max_spread, "select", prefix="mislabel_")
    if num_threads is not None and int(num_threads) < 0:
        raise ValueError(f"select: num_threads must be >= 0 (0: all cores), got {num_threads}")
    if max_line_bytes < 1:  # (below 1 every line of a jsonl/csv/tsv input would be malformed)
        raise ValueError(f"select: max_line_bytes must be >= 1, got {max_line_bytes}")
    native = native_seed(int(seed), "select")
    threads = 0 if num_threads is None else int(num_threads)
    stratify = bool(label_field) if stratify is None else stratify
    if stratify and not label_field:
        raise ValueError("select: stratify needs a label field")

    _refuse_clashing_files(data, scores, {"out": out, "indices_out": indices_out,
                                          "report_out": report_out})
    outputs = {flag: Path(path) for flag, path in (("--out", out), ("--indices", indices_out),
                                                   ("--report", report_out)) if path is not None}
    for flag, path in outputs.items():
        check_output(flag, path)
    rows = load_rows(data, text_field, label_field, skip_bad=skip_bad, max_line_bytes=max_line_bytes,
                     num_threads=threads)
    n = rows.n
    codes = np.zeros(n, dtype=np.uint8)
    gate_cfg = None
    if gate is not False:
        gate_cfg = gate if isinstance(gate, GateConfig) else GateConfig()
        codes, _, _ = rows.gate(gate_cfg.native(), threads)
        codes = np.asarray(codes).astype(np.uint8)

    extra: dict[str, np.ndarray] = {}
    score_cols: dict[str, np.ndarray] = {}
    guard_report = None
    if scores is None:
        q = np.zeros(n)
    elif isinstance(scores, (str, os.PathLike)):
        score_cols = read_scores(scores, n)
        q = score_cols["score"]
        if mislabel_guard:
            # Fitted to the rows the gate keeps, as training fits it to its pool: `tsqlora score`
            # scores every row, and the gate's rejects (too short, duplicates) would shift the fit.
            passed = np.array(GATE_REASONS, dtype=object)[codes] == "kept"
            fit_cols = {k: np.where(passed, v, np.nan) if k == "loss" else v
                        for k, v in score_cols.items()}
            flagged, guard_report = _mislabel_guard(fit_cols, mislabel_threshold,
                                                    mislabel_max_spread)
            if flagged is not None:
                extra["likely_mislabeled"] = flagged
    else:
        q = _per_row_scores(scores, n, "select")
    for reason, mask in (drop or {}).items():
        if reason not in REASONS or reason in ("kept", "not_selected"):
            raise ValueError(f"select: unknown drop reason {reason!r}")
        mask = _row_mask(mask, n, f"select: drop[{reason!r}]")
        extra[reason] = extra.get(reason, np.zeros(n, dtype=bool)) | mask

    reasons = np.array(GATE_REASONS, dtype=object)[codes]
    for reason, mask in extra.items():
        reasons[(reasons == "kept") & mask] = reason
    pool = reasons == "kept"
    pool_size = int(pool.sum())
    if pool_size == 0:
        counts = ", ".join(f"{r} {c}" for r, c in zip(*np.unique(reasons, return_counts=True)))
        raise ValueError(f"{_name(rows.source)}: no rows left after the filters ({counts}); the "
                         "gate's settings can be changed or the gate turned off")
    missing = pool & ~np.isfinite(q)
    if missing.any():
        where = f" in the scores file {scores}" if isinstance(scores, (str, os.PathLike)) else ""
        raise ValueError(f"select: row {int(np.flatnonzero(missing)[0])} has no score{where}")
    gated = int((np.array(GATE_REASONS, dtype=object)[codes] == "kept").sum())
    if fraction is not None:
        k = selection_budget(gated, pool_size, fraction)
    else:
        if count > pool_size:
            raise ValueError(f"select: count {count} exceeds the {pool_size} rows left after the filters")
        k = count
    labels = label_ids(rows.labels)[1] if (stratify and rows.labels is not None) else None
    q_pool = np.where(pool, q, 0.0)
    indices = np.asarray(_C.gumbel_top_k(n, k, q_pool, labels, pool.astype(np.uint8), float(temperature),
                                         native, bool(stratify), threads))
    kept = np.zeros(n, dtype=bool)
    kept[indices] = True
    reasons[pool & ~kept] = "not_selected"
    counts = {r: int((reasons == r).sum()) for r in REASONS}

    report = {
        "input": str(rows.source) if rows.kind in FILE_FORMATS.values() else rows.kind,
        "format": rows.kind,
        "rows": n,
        "bad_lines": len(rows.bad),
        "bad_line_messages": [m for _, m in rows.bad[:20]],
        "gate": gate_cfg.as_dict() if gate_cfg else None,
        "selection": {"fraction": fraction, "count": count, "k": int(k), "gated": gated, "pool": pool_size,
                      # JSON has no infinity: τ = inf (uniform) is recorded as the string "inf".
                      "temperature": "inf" if math.isinf(temperature) else temperature, "seed": seed, "stratify": stratify,
                      "scores": str(scores) if isinstance(scores, (str, os.PathLike)) else
                      ("array" if scores is not None else None),
                      "mislabel_threshold": mislabel_threshold if "likely_mislabeled" in extra else None},
        "mislabel_guard": guard_report,
        "kept": int(k),
        "reasons": counts,
        "scores": _score_report(q if scores is not None else np.full(n, np.nan), kept),
    }
    if rows.labels is not None:
        by_label: dict[str, dict[str, int]] = {}
        for lab, p, kk in zip(map(label_key, rows.labels), pool, kept):
            d = by_label.setdefault(lab, {"rows": 0, "pool": 0, "kept": 0})
            d["rows"] += 1
            d["pool"] += int(p)
            d["kept"] += int(kk)
        report["labels"] = by_label

    write = {"--indices": lambda tmp: Path(tmp).write_text("".join(f"{i}\n" for i in indices)),
             "--report": lambda tmp: Path(tmp).write_text(strict_json(report))}
    if "--out" in outputs:
        write["--out"] = _subset_writer(rows, indices, outputs["--out"])
    write_together([(flag, path, write[flag]) for flag, path in outputs.items()])

    subset = None
    if rows.kind == "dataset":
        subset = data.select(indices)
    elif rows.kind == "pandas":
        subset = data.iloc[indices]
    elif rows.kind == "arrow":
        subset = data.take(indices)
    return SelectionResult(indices, np.where(np.isfinite(q), q, np.nan) if scores is not None else np.full(n, np.nan),
                           reasons.astype(str), counts, rows.bad, report, subset)
