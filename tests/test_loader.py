"""TokenBatchLoader: padding, bucketing, per-epoch reshuffle, exact resume, sharding."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tsqlora_ext.loader import TokenBatchLoader

from forked import run_in_forked_child


def _rows(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(5, 1000, size=rng.integers(1, 60))) for _ in range(n)]


def test_batches_are_padded_rows_of_the_input():
    rows = _rows()
    labels = list(np.arange(len(rows)) % 3)
    loader = TokenBatchLoader(rows, labels, batch_size=16, pad_id=0, max_length=40, pad_to_multiple_of=8,
                              seed=3, return_index=True)
    seen = []
    for b in loader:
        ids, mask, y, index = b["input_ids"], b["attention_mask"], b["labels"], b["index"]
        assert ids.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[1] % 8 == 0
        for r, i in enumerate(index.tolist()):
            want = rows[i][:40]
            assert ids[r, :len(want)].tolist() == want
            assert mask[r].sum().item() == len(want) and (ids[r, len(want):] == 0).all()
            assert y[r].item() == labels[i]
        seen += index.tolist()
    assert sorted(seen) == list(range(len(rows)))


def test_width_never_exceeds_max_length():
    # Rounding 30 up to a multiple of 8 gave 32 columns, wider than a model with 30 positions.
    loader = TokenBatchLoader([list(range(1, 41))] * 4, [0, 1, 0, 1], batch_size=4, max_length=30,
                              pad_to_multiple_of=8, shuffle=False)
    b = next(iter(loader))
    assert b["input_ids"].shape == (4, 30) and b["attention_mask"].sum().item() == 4 * 30
    short = TokenBatchLoader([list(range(1, 11))] * 4, batch_size=4, max_length=30, pad_to_multiple_of=8)
    assert next(iter(short))["input_ids"].shape[1] == 16  # below max_length the rounding still applies


def test_bucketing_cuts_padding():
    rows = _rows(2000)
    def pad_share(mult):
        loader = TokenBatchLoader(rows, batch_size=32, bucket_multiplier=mult, seed=0)
        masks = [b["attention_mask"] for b in loader]
        return sum((m == 0).sum().item() for m in masks) / sum(m.numel() for m in masks)
    assert pad_share(50) < 0.5 * pad_share(1)


def test_language_model_labels_mask_padding():
    loader = TokenBatchLoader(_rows(40), batch_size=8, pad_id=0)
    b = next(iter(loader))
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert torch.equal(b["labels"][b["attention_mask"] == 1], b["input_ids"][b["attention_mask"] == 1])


def test_epochs_reshuffle_from_the_seed():
    rows = _rows()
    a = TokenBatchLoader(rows, batch_size=16, seed=5)
    b = TokenBatchLoader(rows, batch_size=16, seed=5)
    assert a.plan(0) == b.plan(0) and a.plan(1) == b.plan(1)
    assert a.plan(0) != a.plan(1)
    assert a.plan(0) != TokenBatchLoader(rows, batch_size=16, seed=6).plan(0)


def test_resume_yields_exactly_the_remaining_batches():
    rows = _rows()
    full = TokenBatchLoader(rows, batch_size=16, seed=1, return_index=True)
    expected = [b["index"].tolist() for b in full] + [b["index"].tolist() for b in full]
    first = TokenBatchLoader(rows, batch_size=16, seed=1, return_index=True)
    got = []
    for step, b in enumerate(first):
        got.append(b["index"].tolist())
        if step == 9:
            break
    state = first.state_dict()
    resumed = TokenBatchLoader(rows, batch_size=16, seed=1, return_index=True)
    resumed.load_state_dict(state)
    got += [b["index"].tolist() for b in resumed] + [b["index"].tolist() for b in resumed]
    assert got == expected
    with pytest.raises(ValueError, match="seed"):
        TokenBatchLoader(rows, batch_size=16, seed=2).load_state_dict(state)


def test_shards_are_disjoint_and_equal_sized():
    rows = _rows(503)
    shards = [TokenBatchLoader(rows, batch_size=10, seed=4, rank=r, world_size=3) for r in range(3)]
    plans = [s.plan(0) for s in shards]
    assert len({len(p) for p in plans}) == 1 == len({len(s) for s in shards})
    flat = [i for p in plans for batch in p for i in batch]
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="rank"):
        TokenBatchLoader(rows, batch_size=10, rank=3, world_size=3)


def test_from_texts_with_the_bundled_tokenizer(minilm_dir, rotten_tomatoes):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    texts, labels = rotten_tomatoes.train_texts[:300], rotten_tomatoes.train_labels[:300]
    loader = TokenBatchLoader.from_texts(texts, tok, labels=labels, batch_size=32, max_length=64,
                                         return_index=True)
    b = next(iter(loader))
    i = b["index"][0].item()
    want = tok(texts[i], truncation=True, max_length=64)["input_ids"]
    assert b["input_ids"][0, :len(want)].tolist() == want
    assert b["input_ids"][0, len(want):].eq(tok.pad_token_id).all()


def _remaining_batches(loader, out):
    out.put([b["index"].tolist() for b in loader])


def test_loader_made_before_fork_works_in_the_child():
    # fork() copies no threads: the child's loader waited forever for the parent's workers.
    rows = _rows()
    loader = TokenBatchLoader(rows, batch_size=16, seed=2, return_index=True)
    want = loader.plan(0)
    it = iter(loader)
    head = [next(it)["index"].tolist() for _ in range(3)]  # the workers have prefetched more
    got, exitcode = run_in_forked_child(_remaining_batches, loader)
    assert exitcode == 0 and head + got == want
    assert head + [b["index"].tolist() for b in it] == want  # the parent goes on undisturbed


def test_forked_child_exits_normally():
    # A child's exit destroyed the shared pool and any loader, joining threads that only the
    # parent has: it never ended. One loader is used in the child, one is not.
    script = textwrap.dedent("""
        import os, signal, sys
        from tsqlora_ext import _C
        from tsqlora_ext.loader import TokenBatchLoader
        _C.gate_texts([f"text {i} of some words" for i in range(5000)], _C.GateConfig(), 2)
        used = TokenBatchLoader([[1, 2, 3]] * 64, batch_size=4)
        idle = TokenBatchLoader([[1, 2, 3]] * 64, batch_size=4)
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a hung child dies of SIGALRM instead of outliving the test
            assert len(list(used)) == 16
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    try:
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a forked child hung at exit")


@pytest.mark.parametrize("change", [dict(shuffle=False), dict(drop_last=True), dict(bucket_multiplier=1),
                                    dict(max_length=8), dict(pad_to_multiple_of=8), dict(pad_id=3)])
def test_resume_refuses_a_state_of_a_loader_with_other_batches(change):
    rows = _rows()
    first = TokenBatchLoader(rows, batch_size=16, seed=1)
    next(iter(first))
    state = first.state_dict()
    (name, value), = change.items()
    with pytest.raises(ValueError, match=f"{name} is {value} here but"):
        TokenBatchLoader(rows, batch_size=16, seed=1, **change).load_state_dict(state)
    with pytest.raises(ValueError, match="seed is 2 here.*shuffle is False here"):
        TokenBatchLoader(rows, batch_size=16, seed=2, shuffle=False).load_state_dict(state)
    # A state saved before these fields were recorded still loads.
    old = {k: v for k, v in state.items() if k not in change}
    TokenBatchLoader(rows, batch_size=16, seed=1, **change).load_state_dict(old)


def test_fractional_token_ids_and_labels_are_refused():
    # np.int64 conversion truncated them: label 1.9 trained as class 1, token 2.7 as token 2.
    with pytest.raises(TypeError, match="token ids must be integers"):
        TokenBatchLoader([[1, 2], [1.5, 2.7]], [0, 1])
    with pytest.raises(ValueError, match="label of row 1 is 1.9, not an integer class id"):
        TokenBatchLoader([[1, 2], [3]], [0.0, 1.9])
    with pytest.raises(ValueError, match="2 token rows but 3 labels"):
        TokenBatchLoader([[1, 2], [3]], [0, 1, 1])
    batch = next(iter(TokenBatchLoader([[1, 2], [3]], np.array([1.0, 0.0]), shuffle=False)))
    assert batch["labels"].tolist() == [1, 0]
