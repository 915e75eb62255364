"""The C++ heuristic gate against its pure-Python specification (reference.py, text heuristics)."""

from __future__ import annotations

import numpy as np
import pytest

from tsqlora_ext import _C, reference
from tsqlora_ext.selector import GateConfig

from forked import run_in_forked_child


def _compare(texts, cfg: GateConfig, threads: int = 2):
    codes, feats, names = _C.gate_texts(texts, cfg.native(), threads)
    ref_reasons, ref_feats = reference.heuristic_gate(texts, cfg)
    got = [_C.GATE_REASONS[c] for c in codes]
    diff = [i for i, (a, b) in enumerate(zip(got, ref_reasons)) if a != b]
    assert not diff, f"{len(diff)} reasons differ, first row {diff[0]}: C++ {got[diff[0]]}, Python {ref_reasons[diff[0]]}"
    np.testing.assert_array_equal(feats, np.array(ref_feats))
    assert len(names) == feats.shape[1]
    return got


def test_gate_equals_reference_on_rotten_tomatoes(rotten_tomatoes):
    # The first 4,000 snippets keep the pure-Python side within a few seconds.
    texts = rotten_tomatoes.train_texts[:4000]
    got = _compare(texts, GateConfig())
    assert got.count("too_short") > 0 and got.count("kept") > 3500


def test_gate_equals_reference_on_bbc_news(bbc_news):
    # Long articles: the n-gram rules and near duplicates (the corpus holds reprinted stories).
    texts = bbc_news.train_texts[:400] + bbc_news.train_texts[:20]
    got = _compare(texts, GateConfig(ngram_min_words=20, near_dup_threshold=0.5))
    assert got[-20:] == ["exact_duplicate"] * 20


def test_every_rule_can_be_switched_off_and_rethresholded(rotten_tomatoes):
    texts = ["", "two words", "# # # # tag soup ###", "1 2 3 4 5 6 7 a", "same line\nsame line\nsame line\nother",
             "one two three four five"] + rotten_tomatoes.train_texts[:50]
    expect = ["empty", "too_short", "symbol_ratio", "non_alpha_ratio", "repeated_lines", "kept"]
    assert _compare(texts, GateConfig())[:6] == expect
    off = GateConfig(length=False, symbol_ratio=False, non_alpha_ratio=False, repeated_lines=False,
                     repeated_ngrams=False, exact_dup=False, near_dup=False)
    assert set(_compare(texts, off)) == {"kept"}
    assert _compare(texts, GateConfig(min_words=6))[5] == "too_short"
    assert _compare(texts, GateConfig(max_symbol_ratio=10.0))[2] != "symbol_ratio"


def test_repeated_ngrams_rule():
    spam = " ".join(["buy cheap pills now"] * 20)
    text = "a perfectly ordinary sentence about a film that runs for a while and then it ends"
    got = _compare([spam, text], GateConfig(ngram_min_words=5))
    assert got == ["repeated_ngrams", "kept"]


def test_chinese_and_japanese_are_words_per_character():
    # Words were runs of non-space only: a whole Chinese or Japanese sentence was one word, so
    # every such row was dropped as too short, and no near duplicate was ever found among them.
    zh = "这部电影非常好看，演员的表演十分出色，剧情也很吸引人，我推荐给所有朋友，明天还想再看一遍。"
    texts = [zh, "今天天气很好，我们去公园散步吧。", "この映画はとても面白かったです。俳優の演技も素晴らしい。",
             "混合 text 与 English words 和 数字 2024 年", zh.replace("明天", "后天"),
             "ภาพยนตร์เรื่องนี้สนุกมาก"]  # Thai: split at spaces only (a phrase is one word)
    got = _compare(texts, GateConfig())
    assert got == ["kept", "kept", "kept", "kept", "near_duplicate", "too_short"]
    words = _C.gate_texts(texts, GateConfig().native(), 1)[1][:, 0]
    assert words[1] == 16 and words[3] == 11  # 14 characters and 2 punctuation marks; 混 合 text ...


def test_planted_near_duplicates_are_found(bbc_news):
    rng = np.random.default_rng(0)
    base = [t for t in bbc_news.train_texts if len(t.split()) > 200][:150]
    planted = []
    for t in base[:50]:
        words = t.split()
        for _ in range(max(1, len(words) // 100)):  # change ~1% of the words
            words[rng.integers(len(words))] = "zzplanted"
        planted.append(" ".join(words))
    texts = base + planted
    codes, _, _ = _C.gate_texts(texts, GateConfig().native(), 2)
    got = [_C.GATE_REASONS[c] for c in codes]
    found = sum(r == "near_duplicate" for r in got[150:])
    assert found == 50, f"only {found} of 50 planted near duplicates found"
    assert got[:150].count("near_duplicate") <= 3  # reprints inside BBC itself


def test_gate_is_identical_for_any_thread_count(bbc_news, rotten_tomatoes):
    texts = bbc_news.train_texts[:600] + rotten_tomatoes.train_texts[:3000]
    cfg = GateConfig().native()
    r1, f1, _ = _C.gate_texts(texts, cfg, 1)
    for threads in (2, 3, 7):
        rn, fn, _ = _C.gate_texts(texts, cfg, threads)
        np.testing.assert_array_equal(r1, rn)
        np.testing.assert_array_equal(f1, fn)


def test_arrow_buffer_and_list_give_the_same_gate(rotten_tomatoes):
    pa = pytest.importorskip("pyarrow")
    texts = rotten_tomatoes.train_texts[:2000]
    arr = pa.array(texts, type=pa.large_string()).slice(5, 1500)
    _, offsets, data = arr.buffers()
    off = np.frombuffer(offsets, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    a = _C.gate_buffer(data, off, GateConfig().native(), 2)
    b = _C.gate_texts(texts[5:1505], GateConfig().native(), 2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bad_gate_config_is_a_clear_error():
    with pytest.raises(ValueError, match="bands"):
        _C.gate_texts(["a b c"], GateConfig(bands=0).native(), 1)


def _gate_reasons(texts, out):
    out.put(_C.gate_texts(texts, _C.GateConfig(), 2)[0].tolist())


def test_gate_runs_in_a_forked_child():
    # fork() copies no threads: the child inherited the shared pool without its workers, and its
    # first parallel call waited for them forever.
    texts = [f"document number {i} has some words in it" for i in range(5000)]
    want = _C.gate_texts(texts, _C.GateConfig(), 2)[0].tolist()  # the pool now has workers here
    got, exitcode = run_in_forked_child(_gate_reasons, texts)
    assert got == want and exitcode == 0


def test_invalid_utf8_at_the_end_stays_within_the_text():
    # A lead byte closing a text made the word splitter hash up to 3 bytes past the text's end:
    # equal texts followed by different bytes hashed differently (no exact_duplicate), and the last
    # text of a buffer was read beyond the buffer.
    text = b"one two three four five \xe2"
    offsets = np.array([0, len(text), 2 * len(text)], dtype=np.int64)
    codes, feats, _ = _C.gate_buffer(text + text + b"Q", offsets, GateConfig(near_dup=False).native(), 1)
    assert [_C.GATE_REASONS[c] for c in codes] == ["kept", "exact_duplicate"]
    np.testing.assert_array_equal(feats[0], feats[1])


@pytest.mark.parametrize("name,value,message", [
    # NaN fails every comparison: the rule never fired.
    ("max_symbol_ratio", float("nan"), "a finite number >= 0"),
    ("max_symbol_ratio", float("inf"), "a finite number >= 0"),
    ("max_symbol_ratio", -1.0, "a finite number >= 0"),  # dropped every row
    ("max_non_alpha_ratio", 1.5, r"in \[0, 1\]"),
    ("max_non_alpha_ratio", float("nan"), r"in \[0, 1\]"),
    ("max_dup_line_frac", -0.1, r"in \[0, 1\]"),
    ("near_dup_threshold", 2.0, r"in \[0, 1\]"),  # no pair ever agreed on enough min-hashes
    ("near_dup_threshold", float("nan"), r"in \[0, 1\]"),
    ("min_words", -1, ">= 0"),
    ("min_words", 2.5, "an integer"),
    ("max_words", 0, ">= 1 and >= min_words=3, got 0"),
    ("max_words", 2, ">= 1 and >= min_words=3, got 2"),  # every text too short or too long
    ("ngram_min_words", -1, ">= 0"),
    ("shingle_size", 0, ">= 1"),
    ("bands", 0, ">= 1"),
    ("rows", -1, ">= 1"),
    ("minhash_seed", -1, r"in \[0, 2\*\*64\)"),
    ("minhash_seed", 2**64, r"in \[0, 2\*\*64\)"),
    ("top_ngram", [(0, 0.2)], r"\(n >= 1, share in \[0, 1\]\) pairs"),
    ("top_ngram", [(2, float("nan"))], r"\(n >= 1, share in \[0, 1\]\) pairs"),
    ("dup_ngram", [(5, 1.5)], r"\(n >= 1, share in \[0, 1\]\) pairs"),
    ("dup_ngram", [5, 0.15], r"\(n >= 1, share in \[0, 1\]\) pairs"),
    ("near_dup", "no", "True or False"),
])
def test_gate_config_refuses_values_that_silently_change_a_rule(name, value, message):
    with pytest.raises(ValueError, match=rf"GateConfig: {name} must be.*{message}"):
        GateConfig(**{name: value})


def test_gate_config_is_checked_again_when_changed_after_construction():
    cfg = GateConfig()
    cfg.near_dup_threshold = float("nan")
    with pytest.raises(ValueError, match=r"GateConfig: near_dup_threshold must be in \[0, 1\], got nan"):
        cfg.native()


def test_gate_config_takes_the_bounds_themselves():
    cfg = GateConfig(min_words=0, max_words=1, max_symbol_ratio=0.0, max_non_alpha_ratio=1.0,
                     max_dup_line_frac=0.0, ngram_min_words=0, near_dup_threshold=1.0,
                     top_ngram=[(1, 0.0)], dup_ngram=[], minhash_seed=2**64 - 1)
    codes, _, _ = _C.gate_texts(["one", "two words"], cfg.native(), 1)
    assert [_C.GATE_REASONS[c] for c in codes] == ["kept", "too_long"]


def test_ctrl_c_stops_the_gate_at_once():
    # The C++ gate held the call until it was done: Ctrl-C came through seconds (minutes on
    # millions of rows) later. The texts take the gate several seconds on one thread.
    import os
    import signal
    import threading
    import time

    rng = np.random.default_rng(0)
    vocab = np.array([f"tok{i}" for i in range(5000)])
    texts = [" ".join(row) for row in vocab[rng.integers(0, 5000, size=(100_000, 60))]]
    # Python's own Ctrl-C handler: a process started in the background inherits SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    try:
        start = time.perf_counter()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            _C.gate_texts(texts, GateConfig().native(), 1)
        assert time.perf_counter() - start < 2.0
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert _compare(texts[:50], GateConfig()) == ["kept"] * 50  # the next job runs to its end


def test_threads_that_cannot_start_are_an_error():
    # With the workers' stacks out of address space the pool's constructor threw while workers
    # waited on its condition variable: the process hung instead of raising.
    import subprocess
    import sys

    script = """
import resource
from tsqlora_ext import _C
from tsqlora_ext.selector import GateConfig
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
try:
    _C.gate_texts(["aa bb cc dd"] * 10, GateConfig().native(), 2000)
except RuntimeError as e:
    print("refused:", e)
print(_C.gate_texts(["aa bb cc dd"] * 3, GateConfig().native(), 1)[0].tolist())
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "refused: cannot start 1999 worker threads" in run.stdout, run.stdout + run.stderr
    assert "ask for fewer threads" in run.stdout and run.stdout.endswith("[0, 8, 8]\n")  # 8: exact_duplicate
