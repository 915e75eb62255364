"""tsqlora_ext.select and `tsqlora select`: outputs, reasons, report, and safe file handling."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tsqlora_ext
from tsqlora_ext import cli


@pytest.fixture
def rt_jsonl(tmp_path, rotten_tomatoes):
    path = tmp_path / "train.jsonl"
    texts, labels = rotten_tomatoes.train_texts[:3000], rotten_tomatoes.train_labels[:3000]
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels)] + [{"text": texts[0], "label": labels[0]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_select_writes_subset_indices_and_report(tmp_path, rt_jsonl):
    scores = tmp_path / "scores.jsonl"
    rng = np.random.default_rng(0)
    q = rng.normal(size=3001)
    p_wrong = rng.random(3001)
    scores.write_text("".join(json.dumps({"index": i, "score": float(q[i]), "p_mislabeled": float(p_wrong[i])}) + "\n"
                              for i in range(3001)))
    out = tmp_path / "out" / "subset.jsonl"
    rc = cli.main(["select", "--input", str(rt_jsonl), "--text-field", "text", "--label-field", "label",
                   "--scores", str(scores), "--fraction", "0.3", "--temperature", "1.0", "--seed", "0",
                   "--out", str(out), "--report", str(tmp_path / "report.json"), "--threads", "2"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    idx = [int(x) for x in (tmp_path / "out" / "subset.jsonl.indices.txt").read_text().split()]
    src = rt_jsonl.read_text().splitlines()
    assert out.read_text().splitlines() == [src[i] for i in idx]
    r = report["reasons"]
    gated = tsqlora_ext.select(rt_jsonl, fraction=1.0).reasons
    assert r["exact_duplicate"] == 1
    assert r["likely_mislabeled"] == int(((gated == "kept") & (p_wrong > 0.5)).sum())
    assert sum(r.values()) == 3001 and report["kept"] == len(idx) == r["kept"]
    # A fraction of the rows the gate keeps, as tsqlora train takes it: the guard's drops are
    # replaced by other survivors (it was a fraction of the survivors, a smaller subset).
    assert report["selection"]["gated"] == int((gated == "kept").sum()) == 2976
    assert report["selection"]["k"] == round(0.3 * 2976) == report["kept"]
    assert report["scores"]["kept"]["mean"] > report["scores"]["dropped"]["mean"]
    assert set(report["labels"]) == {"0", "1"}


def test_python_select_same_as_cli_and_threads(rt_jsonl):
    a = tsqlora_ext.select(rt_jsonl, label_field="label", fraction=0.25, seed=3, num_threads=1)
    b = tsqlora_ext.select(rt_jsonl, label_field="label", fraction=0.25, seed=3, num_threads=2)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert (a.reasons == b.reasons).all()
    assert set(a.reasons[a.indices]) == {"kept"}


def test_in_memory_inputs_match_the_file(rt_jsonl, tmp_path):
    pd = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    df = pd.read_json(rt_jsonl, lines=True)
    ref = tsqlora_ext.select(rt_jsonl, label_field="label", fraction=0.3, seed=1)
    for data in (df, datasets.Dataset.from_pandas(df)):
        got = tsqlora_ext.select(data, label_field="label", fraction=0.3, seed=1)
        np.testing.assert_array_equal(got.indices, ref.indices)
        assert len(got.subset) == len(ref.indices)
    pq = tmp_path / "train.parquet"
    df.to_parquet(pq)
    got = tsqlora_ext.select(pq, label_field="label", fraction=0.3, seed=1, out=tmp_path / "sub.parquet")
    np.testing.assert_array_equal(got.indices, ref.indices)
    assert pd.read_parquet(tmp_path / "sub.parquet")["text"].tolist() == df["text"].iloc[ref.indices].tolist()


def test_parquet_nulls_are_refused_naming_the_file_row_and_field(tmp_path):
    # A null label would otherwise become a class of its own ("None"), unlike a jsonl null.
    pd = pytest.importorskip("pandas")
    path = tmp_path / "nulls.parquet"
    pd.DataFrame({"text": ["a fine review", "another review", "a third one"],
                  "label": [1.0, None, 0.0]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"nulls.parquet row 1: field 'label' is null"):
        tsqlora_ext.select(path, label_field="label", fraction=0.5)
    pd.DataFrame({"text": ["a fine review", None], "label": [1, 0]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"nulls.parquet row 1: field 'text' is null"):
        tsqlora_ext.select(path, label_field="label", fraction=0.5)


def test_empty_labels_from_arrow_are_refused_as_from_files(tmp_path):
    # A csv's empty label is refused; the same data as parquet or a DataFrame made '' a class.
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"text": ["a fine review", "another review", "a third one"],
                       "label": ["pos", "  ", "neg"]})
    df.to_parquet(tmp_path / "d.parquet")
    for data, name in ((df, "DataFrame"), (tmp_path / "d.parquet", "d.parquet")):
        with pytest.raises(ValueError, match=rf"{name} row 1: field 'label' is empty"):
            tsqlora_ext.select(data, label_field="label", fraction=0.5)


def test_a_dataframe_column_of_mixed_types_is_named():
    # pyarrow's ArrowInvalid / ArrowTypeError came through raw.
    pd = pytest.importorskip("pandas")
    texts = ["a fine review here", "another review there", "a third one here"]
    for df, column in ((pd.DataFrame({"text": texts, "label": [1, "1", 1.0]}), "label"),
                       (pd.DataFrame({"text": [texts[0], 3, texts[2]], "label": [1, 0, 1]}), "text")):
        with pytest.raises(ValueError, match=rf"DataFrame: a column mixes types.*column {column}"):
            tsqlora_ext.select(df, label_field="label", fraction=0.5)


def test_jsonl_written_from_arrow_keeps_every_number(tmp_path):
    # pandas' to_json rounded to 10 significant digits: 1e-12 became 0.0.
    pd = pytest.importorskip("pandas")
    values = [0.1234567890123456, 1e-12, 3e-11, float("nan")]
    pd.DataFrame({"text": [f"review number {i} is fine" for i in range(4)], "x": values,
                  "t": ["naïve 東京"] * 4}).to_parquet(tmp_path / "d.parquet")
    tsqlora_ext.select(tmp_path / "d.parquet", fraction=1.0, gate=False, out=tmp_path / "o.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(rows, key=lambda r: r["text"])[:3] == [
        {"text": f"review number {i} is fine", "x": values[i], "t": "naïve 東京"} for i in range(3)]
    assert sorted(rows, key=lambda r: r["text"])[3]["x"] is None  # NaN: null, as JSON has no NaN


@pytest.mark.parametrize("flag,value,message", [
    ("--mislabel-threshold", "2", r"mislabel_threshold must be in \(0, 1\), got 2"),
    ("--mislabel-max-spread", "-1", r"mislabel_max_spread must be > 0, got -1"),
    ("--mislabel-max-spread", "nan", r"mislabel_max_spread must be > 0, got nan"),
    ("--threads", "-1", r"num_threads must be >= 0 \(0: all cores\), got -1"),
    ("--max-line-bytes", "-5", r"max_line_bytes must be >= 1, got -5"),
    ("--max-symbol-ratio", "nan", r"GateConfig: max_symbol_ratio must be a finite number >= 0, got nan"),
    ("--near-dup-threshold", "2", r"GateConfig: near_dup_threshold must be in \[0, 1\], got 2"),
    ("--min-words", "-1", r"GateConfig: min_words must be >= 0, got -1"),
])
def test_out_of_range_settings_exit_2_without_a_scores_file(tmp_path, capsys, flag, value, message):
    import re

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"review number {i} here"}) + "\n" for i in range(4)))
    out = tmp_path / "sub.jsonl"
    assert cli.main(["select", "--input", str(data), "--text-field", "text", "--fraction", "0.5",
                     "--out", str(out), flag, value]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_csv_output_keeps_header_and_raw_rows(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,text\n1,"a multi\nline review, with commas"\n2,another fine review here\n3,and a third one\n')
    out = tmp_path / "o.csv"
    r = tsqlora_ext.select(p, fraction=1.0, out=out, gate=False)
    assert out.read_text() == p.read_text() and r.indices.tolist() == [0, 1, 2]


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_file_output_keeps_the_inputs_line_terminator(tmp_path, fmt, newline):
    # Kept rows were always written with '\n', after a CRLF csv's header line with '\r\n'.
    rows = [f"review number {i} is fine and long enough" for i in range(6)]
    lines = ["text"] + rows if fmt == "csv" else [json.dumps({"text": r}) for r in rows]
    p = tmp_path / f"d.{fmt}"
    p.write_bytes("".join(line + newline for line in lines).encode())
    out = tmp_path / f"o.{fmt}"
    r = tsqlora_ext.select(p, fraction=0.5, gate=False, out=out)
    rows_out = [lines[i + (fmt == "csv")] for i in r.indices]
    assert out.read_bytes() == "".join(line + newline for line in lines[:fmt == "csv"] + rows_out).encode()


def test_read_scores_refuses_non_integer_and_repeated_indices(tmp_path):
    # An index of 1.9 was read as row 1, and a second line for a row silently replaced the first.
    from tsqlora_ext.selector import read_scores

    p = tmp_path / "s.jsonl"

    def write(*rows):
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return p

    for index in (1.9, True, None, "1"):
        with pytest.raises(ValueError, match=rf"line 2 of s.jsonl: field 'index' must be an integer, got {index!r}"):
            read_scores(write({"index": 0, "score": 1.0}, {"index": index, "score": 9.0}), 3)
    with pytest.raises(ValueError, match="line 2 of s.jsonl: index 0 was already scored on line 1"):
        read_scores(write({"index": 0, "score": 5.0}, {"index": 0, "score": -5.0}), 3)
    with pytest.raises(ValueError, match="line 2 of s.jsonl: index 0 was already scored on line 1"):
        read_scores(write({"score": 5.0}, {"index": 0, "score": -5.0}), 3)  # line order, then an index
    with pytest.raises(ValueError, match="line 1 of s.jsonl: index -1 outside the 3 input rows"):
        read_scores(write({"index": -1, "score": 1.0}), 3)
    got = read_scores(write({"index": 2, "score": 2.0}, {"index": 0, "score": 0.5}), 3)["score"]
    np.testing.assert_array_equal(got, [0.5, np.nan, 2.0])


def test_errors_and_the_input_is_never_overwritten(tmp_path, rt_jsonl, capsys):
    before = rt_jsonl.read_bytes()
    assert cli.main(["select", "--input", str(rt_jsonl), "--fraction", "0.5", "--out", str(rt_jsonl)]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert rt_jsonl.read_bytes() == before
    for bad in ("0", "1.5", "-0.1"):
        assert cli.main(["select", "--input", str(rt_jsonl), "--fraction", bad, "--out", str(tmp_path / "o.jsonl")]) == 2
        assert "fraction must be in (0, 1]" in capsys.readouterr().err
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "a fine enough review"}\n{"text": oops}\n')
    assert cli.main(["select", "--input", str(broken), "--fraction", "1", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "line 2 of b.jsonl: malformed JSON" in capsys.readouterr().err
    assert cli.main(["select", "--input", str(broken), "--fraction", "1", "--skip-bad",
                     "--out", str(tmp_path / "o.jsonl")]) == 0
    report = json.loads((tmp_path / "o.jsonl.report.json").read_text())
    assert report["bad_lines"] == 1 and "line 2" in report["bad_line_messages"][0]
    assert not list(tmp_path.glob(".*tmp*"))


def _small(tmp_path, n=20):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"review number {i} is fine", "label": i % 2}) + "\n"
                            for i in range(n)))
    scores = tmp_path / "s.jsonl"
    scores.write_text("".join(json.dumps({"index": i, "score": float(i)}) + "\n" for i in range(n)))
    return data, scores


def test_a_seed_beyond_64_bits_is_refused(tmp_path):
    # 2**64 drew the rows 0 draws, and the report recorded 2**64.
    data, _ = _small(tmp_path)
    for seed in (2**64, 2**63, -2**63 - 1):
        with pytest.raises(ValueError, match=r"select: seed must be a signed 64-bit integer"):
            tsqlora_ext.select(data, fraction=0.5, seed=seed, gate=False)


def test_default_indices_and_report_are_named_after_the_whole_output_name(tmp_path):
    # o.jsonl and o.json once shared o.indices.txt and o.report.json: the second run's replaced
    # the first's, which then no longer described o.jsonl.
    data, _ = _small(tmp_path)
    for out, fraction in (("o.jsonl", "0.5"), ("o.json", "0.25")):
        assert cli.main(["select", "--input", str(data), "--fraction", fraction, "--no-gate",
                         "--out", str(tmp_path / out)]) == 0
    src = data.read_text().splitlines()
    for out, kept in (("o.jsonl", 10), ("o.json", 5)):
        idx = [int(x) for x in (tmp_path / f"{out}.indices.txt").read_text().split()]
        assert (tmp_path / out).read_text().splitlines() == [src[i] for i in idx]
        assert len(idx) == kept == json.loads((tmp_path / f"{out}.report.json").read_text())["kept"]


def test_no_output_may_be_an_input_or_another_output(tmp_path, capsys):
    data, scores = _small(tmp_path)
    before = {p: p.read_bytes() for p in (data, scores)}
    base = ["select", "--input", str(data), "--scores", str(scores), "--fraction", "0.5", "--no-gate"]
    cases = [
        (["--out", str(scores)], ["scores", str(scores)]),
        (["--out", str(tmp_path / "o.jsonl"), "--indices", str(scores)], ["scores", str(scores)]),
        (["--out", str(tmp_path / "o.jsonl"), "--report", str(scores)], ["scores", str(scores)]),
        (["--out", str(tmp_path / "o.jsonl"), "--report", str(data)], ["input", str(data)]),
        (["--out", str(tmp_path / "o.jsonl"), "--indices", str(tmp_path / "o.jsonl")],
         ["o.jsonl", "same file"]),
        (["--out", str(tmp_path / "o.jsonl"), "--indices", str(tmp_path / "x"),
          "--report", str(tmp_path / "x")], ["same file", str(tmp_path / "x")]),
    ]
    for flags, words in cases:
        assert cli.main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert all(w in err for w in words), (flags, err)
        assert {p: p.read_bytes() for p in (data, scores)} == before
        assert sorted(q.name for q in tmp_path.iterdir()) == ["d.jsonl", "s.jsonl"], flags


def test_infinite_temperature_report_is_strict_json(tmp_path):
    data, scores = _small(tmp_path)
    assert cli.main(["select", "--input", str(data), "--scores", str(scores), "--fraction", "0.5",
                     "--no-gate", "--temperature", "inf", "--out", str(tmp_path / "o.jsonl")]) == 0
    text = (tmp_path / "o.jsonl.report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert report["selection"]["temperature"] == "inf"


def test_row_without_score_names_the_scores_file(tmp_path, capsys):
    data, scores = _small(tmp_path)
    scores.write_text("".join(json.dumps({"index": i, "score": float(i)}) + "\n" for i in range(19)))
    assert cli.main(["select", "--input", str(data), "--scores", str(scores), "--fraction", "0.5",
                     "--no-gate", "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "row 19 has no score" in err and str(scores) in err


def test_a_failed_select_leaves_every_output_as_it_was(tmp_path, capsys, monkeypatch):
    # A --report that could not be written failed only after --out and --indices had been
    # replaced: they held the new selection, the report the old one.
    data, _ = _small(tmp_path)
    out = tmp_path / "o.jsonl"
    outputs = [out, tmp_path / "o.jsonl.indices.txt", tmp_path / "o.jsonl.report.json"]
    base = ["select", "--input", str(data), "--no-gate", "--out", str(out)]
    assert cli.main(base + ["--fraction", "0.5"]) == 0
    before = [p.read_bytes() for p in outputs]
    (tmp_path / "a_file").write_text("")

    def full_disk(_obj):
        raise OSError(28, "No space left on device")

    for flags, words in [
        (["--report", str(tmp_path / "a_file" / "r.json")], ["--report", "cannot create the folder"]),
        (["--indices", str(tmp_path / "a_file" / "sub" / "i.txt")],
         [f"--indices {tmp_path / 'a_file' / 'sub' / 'i.txt'}", "cannot create the folder"]),
        (["--indices", str(tmp_path)], ["--indices", "is a folder"]),
        ([], ["--report", "No space left on device"]),  # written last, after the other two
    ]:
        if not flags:
            monkeypatch.setattr("tsqlora_ext.selector.strict_json", full_disk)
        assert cli.main(base + ["--fraction", "0.25"] + flags) == 2, flags
        err = capsys.readouterr().err
        assert all(w in err for w in words), (flags, err)
        assert [p.read_bytes() for p in outputs] == before, flags
        assert not list(tmp_path.glob(".*tmp*")), flags


def test_npy_scores_must_hold_one_number_per_row(tmp_path, capsys):
    # A (20, 2) array for 40 rows was flattened into 40 "per-row" scores.
    from tsqlora_ext.selector import read_scores

    data, _ = _small(tmp_path, n=40)
    npy = tmp_path / "s.npy"
    base = ["select", "--input", str(data), "--scores", str(npy), "--fraction", "0.5", "--no-gate",
            "--out", str(tmp_path / "o.jsonl")]
    np.save(npy, np.arange(40.0).reshape(20, 2))
    assert cli.main(base) == 2
    assert "s.npy: scores of shape (20, 2); expected one per row, shape (40,)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"select: scores of shape \(20, 2\)"):
        tsqlora_ext.select(data, scores=np.arange(40.0).reshape(20, 2), fraction=0.5, gate=False)
    np.save(npy, np.arange(40.0).reshape(40, 1))
    np.testing.assert_array_equal(read_scores(npy, 40)["score"], np.arange(40.0))
    np.save(npy, np.arange(39.0))
    with pytest.raises(ValueError, match=r"s.npy: 39 scores for 40 rows"):
        read_scores(npy, 40)
    npy.write_bytes(b"garbage")  # np.load said "pickled (object) data" without the file
    with pytest.raises(ValueError, match=r"s.npy: not a .npy file \(no NumPy header\)"):
        read_scores(npy, 40)
    np.save(npy, np.arange(40.0))
    npy.write_bytes(npy.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"s.npy: unreadable .npy array"):
        read_scores(npy, 40)


def test_drop_masks_must_hold_one_bool_per_row(tmp_path):
    # Row indices [3, 7] (or any 20 numbers) were cast to bool and dropped other rows than meant;
    # a (10, 2) mask was flattened.
    data, _ = _small(tmp_path)
    kw = dict(fraction=0.5, gate=False, mislabel_guard=False)
    for mask, message in [(np.arange(20) % 3, r"drop\['likely_mislabeled'\]: expected bools .* \[2, 2, 2\]"),
                          ([3, 7], r"a mask of shape \(2,\); expected one bool per row, shape \(20,\)"),
                          (np.zeros((10, 2), bool), r"a mask of shape \(10, 2\)"),
                          (np.full(20, np.nan), r"expected bools .* \[nan, nan, nan\]")]:
        with pytest.raises(ValueError, match=message):
            tsqlora_ext.select(data, drop={"likely_mislabeled": mask}, **kw)
    bools = tsqlora_ext.select(data, drop={"likely_mislabeled": np.arange(20) < 5}, **kw)
    assert list(bools.reasons[:5]) == ["likely_mislabeled"] * 5
    assert "likely_mislabeled" not in list(bools.reasons[5:])
    zeros_ones = tsqlora_ext.select(data, drop={"likely_mislabeled": (np.arange(20) < 5).astype(int)}, **kw)
    assert list(zeros_ones.indices) == list(bools.indices)


def test_scores_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    from tsqlora_ext.selector import read_scores

    p = tmp_path / "s.jsonl"
    rows = [json.dumps({"score": i, "note": "é" if i == 2 else "e"}, ensure_ascii=False) + "\n" for i in range(4)]
    p.write_bytes("".join(rows).encode("latin-1"))
    with pytest.raises(ValueError, match=r"line 3 of s.jsonl: invalid UTF-8 at byte 22 of the line"):
        read_scores(p, 4)
    p.write_bytes(b"\xef\xbb\xbf" + "".join(rows).encode())  # a byte-order mark is still read
    np.testing.assert_array_equal(read_scores(p, 4)["score"], [0.0, 1.0, 2.0, 3.0])
