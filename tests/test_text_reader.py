"""The native jsonl/csv/tsv readers: round-trips against Python's json/csv (property tests) and a
clear error, naming file and line, for every kind of bad input."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tsqlora_ext import _C

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Valid text: any code point but lone surrogates (not encodable as UTF-8).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
# A label names a class: an empty or blank one is a malformed record.
NAME = TEXT.filter(lambda s: s.strip(" \t\n\v\f\r"))
LABEL = st.one_of(st.integers(-10**6, 10**6), st.booleans(), NAME)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read(path, fmt, label="", **kw):
    return _C.read_table(str(path), fmt, "text", label, **kw)


@FUZZ
@given(rows=st.lists(st.tuples(TEXT, LABEL, st.dictionaries(TEXT, st.integers(), max_size=2)), min_size=1,
                     max_size=20), ascii=st.booleans())
def test_jsonl_round_trip(tmp_path, rows, ascii):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"extra": extra, "text": t, "label": y}, ensure_ascii=ascii) for t, y, extra in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = _read(path, "jsonl", "label")
    assert table.texts == [t for t, _, _ in rows]
    assert table.labels == [y if isinstance(y, str) else json.dumps(y) for _, y, _ in rows]
    assert [table.raw(i).decode() for i in range(table.num_rows)] == lines


@FUZZ
@given(rows=st.lists(st.tuples(TEXT, NAME), min_size=1, max_size=20), delim=st.sampled_from([",", "\t"]))
def test_csv_round_trip(tmp_path, rows, delim):
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delim)  # \r\n: quotes fields holding \r or \n
    w.writerow(["label", "text"])
    w.writerows([(y, t) for t, y in rows])
    path = tmp_path / ("d.csv" if delim == "," else "d.tsv")
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    table = _read(path, "csv" if delim == "," else "tsv", "label")
    assert table.texts == [t for t, _ in rows]
    assert table.labels == [y for _, y in rows]
    assert list(csv.reader(io.StringIO(table.header.decode(), newline=""), delimiter=delim)) == [["label", "text"]]


@FUZZ
@given(data=st.binary(max_size=300), fmt=st.sampled_from(["jsonl", "csv", "tsv"]))
def test_arbitrary_bytes_never_crash(tmp_path, data, fmt):
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(b"text\n" + data if fmt != "jsonl" else data)
    try:
        table = _read(path, fmt, skip_bad=True)
    except ValueError as e:
        assert "d." in str(e)
    else:
        assert table.num_rows >= 1
        for t in table.texts:
            t.encode("utf-8")


def _write(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return p


def test_malformed_line_names_file_and_line(tmp_path):
    p = _write(tmp_path, "train.jsonl", b'{"text": "ok"}\n\n{"text": "ok"}\n{"text": "broken}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"line 4 of train.jsonl: malformed JSON"):
        _read(p, "jsonl")
    t = _read(p, "jsonl", skip_bad=True)
    assert t.num_rows == 3 and [b[0] for b in t.bad] == [4] and t.line_numbers.tolist() == [1, 3, 5]


def test_missing_field(tmp_path):
    p = _write(tmp_path, "train.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2 of train.jsonl: field 'label' missing"):
        _read(p, "jsonl", "label")
    c = _write(tmp_path, "train.csv", b"body,label\nx,1\n")
    with pytest.raises(ValueError, match=r"train.csv: field 'text' missing from the header \(columns: body, label\)"):
        _read(c, "csv")


def test_empty_input(tmp_path):
    for name in ("e.jsonl", "e.csv"):
        with pytest.raises(ValueError, match=f"{name}: empty input"):
            _read(_write(tmp_path, name, b"\n \n" if name.endswith("jsonl") else b""), name.split(".")[1])
    with pytest.raises(ValueError, match="no valid records"):
        _read(_write(tmp_path, "bad.jsonl", b"nope\n"), "jsonl", skip_bad=True)


def test_invalid_utf8(tmp_path):
    p = _write(tmp_path, "u.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"line 2 of u.jsonl: invalid UTF-8 at byte 13"):
        _read(p, "jsonl")
    p = _write(tmp_path, "s.jsonl", b'{"text": "\\ud800"}\n')
    with pytest.raises(ValueError, match="lone surrogate"):
        _read(p, "jsonl")


def test_a_100_mb_line_is_rejected(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "')
        f.write(b"a" * (100 << 20))
        f.write(b'"}\n')
    with pytest.raises(ValueError, match=r"line 2 of big.jsonl: 104857612 bytes, over the max_line_bytes limit"):
        _read(p, "jsonl")
    assert _read(p, "jsonl", skip_bad=True).num_rows == 1


def test_csv_quoting_errors_name_the_line(tmp_path):
    p = _write(tmp_path, "q.csv", b'text,label\n"a ""quoted""\nvalue",1\n"x"y,2\nz,3,4\n"open,1\n')
    with pytest.raises(ValueError, match=r"line 4 of q.csv: unexpected character after a closing quote"):
        _read(p, "csv")
    t = _read(p, "csv", "label", skip_bad=True)
    assert t.texts == ['a "quoted"\nvalue'] and [b[0] for b in t.bad] == [4, 5, 6]
    assert "unterminated" in t.bad[-1][1]


def test_an_empty_label_is_a_malformed_record(tmp_path):
    # It became a class named "" of its own (a pandas frame of the same file is refused).
    for name, data, lines in [("e.csv", b"text,label\na b,1\nc d,\ne f, \ng h,0\n", [3, 4]),
                              ("e.jsonl", b'{"text":"a b","label":1}\n{"text":"c d","label":""}\n'
                                          b'{"text":"e f","label":" "}\n{"text":"g h","label":0}\n', [2, 3])]:
        with pytest.raises(ValueError, match=rf"line {lines[0]} of {name}: field 'label' is empty"):
            _read(_write(tmp_path, name, data), name.split(".")[1], "label")
        t = _read(tmp_path / name, name.split(".")[1], "label", skip_bad=True)
        assert t.labels == ["1", "0"] and [b[0] for b in t.bad] == lines


def test_an_unclosed_quote_costs_its_line_only(tmp_path):
    # With skip_bad, the quote ran to the end of the file: 990 rows of 1,000 vanished, counted as
    # one bad line.
    rows = [f"review {i} was fun,{i % 2}" for i in range(1000)]
    rows[10] = '"Best movie ever, said nobody,1'
    t = _read(_write(tmp_path, "u.csv", ("text,label\n" + "\n".join(rows) + "\n").encode()), "csv",
              "label", skip_bad=True)
    assert t.num_rows == 999 and [b[0] for b in t.bad] == [12] and "quote opened on line 12 never" in t.bad[0][1]
    assert t.line_numbers[10] == 13 and t.texts[10] == "review 11 was fun"
    # A record whose first field closes on its second line, where the second field opens a quote
    # that never closes: bad up to that line, not its first line only (reading went on inside the
    # closed field).
    t = _read(_write(tmp_path, "m.csv", b'text,label\n"two\nlines","open\nfake,neg\nc d,1\n'),
              "csv", "label", skip_bad=True)
    assert t.texts == ["fake", "c d"] and [b[0] for b in t.bad] == [2]
    assert "quote opened on line 3 never closes" in t.bad[0][1]
    # The quote closed where the next line's quoted field opens: that line was lost with it.
    rows = ['"a fine film",1', '"never closes, the review goes on,1', '"solid, clever",1', '"dull",0']
    p = _write(tmp_path, "n.csv", ("text,label\n" + "\n".join(rows) + "\n").encode())
    with pytest.raises(ValueError, match=r"line 3 of n.csv: unterminated quoted field \(the quote opened "
                                         r"on line 3 closes only on line 4, mid-field\)"):
        _read(p, "csv", "label")
    t = _read(p, "csv", "label", skip_bad=True)
    assert t.texts == ["a fine film", "solid, clever", "dull"] and [b[0] for b in t.bad] == [3]
    assert list(t.line_numbers) == [2, 4, 5]


def test_a_tsv_field_that_begins_with_a_quotation_is_text(tmp_path):
    # It was refused ("unexpected character after a closing quote"): in tsv a field is quoted only
    # when its closing quote ends it.
    data = b'text\tlabel\n"Best movie ever" said nobody\t1\n"a\ttab"\t0\n"He said ""hi"""\t1\n"open\t0\n'
    t = _read(_write(tmp_path, "q.tsv", data), "tsv", "label")
    assert t.texts == ['"Best movie ever" said nobody', "a\ttab", 'He said "hi"', '"open']
    assert t.labels == ["1", "0", "1", "0"]


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    # A leading EF BB BF was read as text: the csv header lacked its 'text' column and the first
    # jsonl line was malformed.
    j = _read(_write(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"text": "a b c", "label": 1}\n'), "jsonl", "label")
    assert j.texts == ["a b c"] and j.labels == ["1"] and j.raw(0) == b'{"text": "a b c", "label": 1}'
    assert j.header == b"\xef\xbb\xbf"  # written back ahead of the rows
    c = _read(_write(tmp_path, "bom.csv", b"\xef\xbb\xbftext,label\r\na b c,1\r\n"), "csv", "label")
    assert c.texts == ["a b c"] and c.labels == ["1"] and c.header == b"\xef\xbb\xbftext,label\r\n"


def test_csv_last_line_ending_in_a_lone_cr(tmp_path):
    # The final '\r' stayed in the last field: label '0\r', a class of its own.
    t = _read(_write(tmp_path, "cr.csv", b"text,label\r\na b c,1\r\nd e f,0\r"), "csv", "label")
    assert t.labels == ["1", "0"] and t.raw(1) == b"d e f,0"
    t = _read(_write(tmp_path, "mid.csv", b"text,label\na\rb,1\n"), "csv", "label")
    assert t.texts == ["a\rb"]  # elsewhere a lone '\r' is text


def test_newline_is_the_first_lines_terminator(tmp_path):
    for name, data, want in [("a.csv", b"text\r\nx\ny\n", b"\r\n"), ("b.csv", b"text\nx\r\n", b"\n"),
                             ("c.jsonl", b'\xef\xbb\xbf{"text": "x"}\r\n', b"\r\n"),
                             ("d.jsonl", b'{"text": "x"}', b"\n"),
                             # a blank first line is no record: the records' own terminator counts
                             ("e.jsonl", b'\n{"text": "x"}\r\n{"text": "y"}\r\n', b"\r\n")]:
        assert _read(_write(tmp_path, name, data), name.split(".")[1]).newline == want, name


def test_a_header_naming_a_field_twice_is_refused(tmp_path):
    # The first 'text' column was read without a word, though the text could be in the second.
    p = tmp_path / "dup.csv"
    p.write_text("text,text,label\nid-1,a fine review,1\n")
    with pytest.raises(ValueError, match=r"line 1 of .*dup.csv: header: field 'text' is both column 1 and column 2"):
        _C.read_table(str(p), "csv", "text", "label")
    p.write_text("text,label,label\na fine review,1,0\n")
    with pytest.raises(ValueError, match=r"field 'label' is both column 2 and column 3"):
        _C.read_table(str(p), "csv", "text", "label")
    assert _C.read_table(str(p), "csv", "text").texts == ["a fine review"]  # the label is not read
