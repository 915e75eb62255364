"""The training loop's data loader: the Python face of the C++ BatchLoader.

Texts are tokenized once by the model's fast tokenizer (no padding); the token ids go to C++ as one
flat array plus offsets, and C++ worker threads build padded, length-bucketed batches ahead of the
training step. Every epoch's order is a pure function of (seed, epoch), so `state_dict()` (seed,
epoch, position) is all it takes to resume exactly where training stopped.

    loader = TokenBatchLoader.from_texts(texts, tokenizer, labels=labels, batch_size=32, max_length=64)
    for epoch in range(3):
        for batch in loader:           # dict of input_ids, attention_mask, labels (int64 tensors)
            loss = model(**batch).loss
"""

from __future__ import annotations

import numbers
import operator
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import _C
from .config import native_seed


class TokenBatchLoader:
    """Padded, length-bucketed, prefetched batches over token-id sequences.

    token_ids: one sequence of ints per row. labels: one class id per row, or None for language
    modeling (labels = input_ids with -100 on padding). bucket_multiplier: rows are sorted by length
    within windows of batch_size·bucket_multiplier shuffled rows (1: no bucketing). rank/world_size:
    this process takes every world_size-th batch, all ranks the same number. num_workers/prefetch:
    C++ threads and how many batches they build ahead.
    """

    def __init__(self, token_ids: Sequence[Sequence[int]], labels: Sequence[int] | None = None, *,
                 batch_size: int = 32, pad_id: int = 0, max_length: int | None = None,
                 pad_to_multiple_of: int = 1, bucket_multiplier: int = 50, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, prefetch: int = 4, return_index: bool = False):
        lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        try:  # (operator.index: a float id such as 2.7 would be truncated to 2 unnoticed)
            flat = np.fromiter((operator.index(i) for t in token_ids for i in t), dtype=np.int64,
                               count=int(offsets[-1]))
        except TypeError as e:
            raise TypeError(f"TokenBatchLoader: token ids must be integers ({e})") from None
        lab = None if labels is None else class_ids(labels)
        if lab is not None and len(lab) != len(lengths):
            raise ValueError(f"TokenBatchLoader: {len(lengths)} token rows but {len(lab)} labels")
        self._seed = int(seed)
        native = native_seed(self._seed, "TokenBatchLoader")
        self._config = dict(num_rows=len(lengths), batch_size=batch_size, rank=rank, world_size=world_size)
        # Also change the batches; checked only when the state has them (states saved before
        # they were recorded lack them).
        self._batching = dict(shuffle=bool(shuffle), drop_last=bool(drop_last),
                              bucket_multiplier=int(bucket_multiplier), max_length=max_length or None,
                              pad_to_multiple_of=int(pad_to_multiple_of), pad_id=int(pad_id))
        self.return_index = return_index
        self._native = _C.BatchLoader(flat, offsets, lab, batch_size, pad_id, max_length or 0, pad_to_multiple_of,
                                      bucket_multiplier, shuffle, drop_last, native, rank,
                                      world_size, num_workers, prefetch)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, labels: Sequence[int] | None = None, *,
                   max_length: int | None = None, **kwargs) -> "TokenBatchLoader":
        """Tokenizes once with a (fast) Hugging Face tokenizer; pad_id defaults to its pad token."""
        enc = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length,
                        padding=False, return_attention_mask=False)
        kwargs.setdefault("pad_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        return cls(enc["input_ids"], labels, max_length=max_length, **kwargs)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self._native.num_batches

    @property
    def epoch(self) -> int:
        return self._native.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (like DistributedSampler.set_epoch)."""
        self._native.seek(epoch, 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The remaining batches of the current epoch; when they run out the loader moves to the
        next epoch, so `for batch in loader` once per epoch walks epoch after epoch."""
        if self._native.position >= len(self):
            self._native.seek(self._native.epoch + 1, 0)
        while True:
            item = self._native.next()
            if item is None:
                self._native.seek(self._native.epoch + 1, 0)
                return
            input_ids, attention_mask, labels, index = item
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            if self.return_index:
                batch["index"] = index
            yield batch

    def plan(self, epoch: int) -> list[list[int]]:
        """Row ids of every batch of `epoch` for this rank, in order."""
        return self._native.plan(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: resuming from it yields exactly the batches not yet seen."""
        return {"seed": self._seed, "epoch": self._native.epoch, "position": self._native.position,
                **self._config, **self._batching}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; refuses a state of a loader that makes other batches
        (another seed, batch size, shard, shuffle, drop_last, bucketing, max_length or padding),
        naming every field that differs."""
        here = {**self._config, "seed": self._seed}
        here.update({k: v for k, v in self._batching.items() if k in state})
        differ = [f"{key} is {value} here but {state.get(key)} in the state"
                  for key, value in here.items() if state.get(key) != value]
        if differ:
            raise ValueError("TokenBatchLoader.load_state_dict: the state is of a loader that makes "
                             "other batches: " + "; ".join(differ))
        self._native.seek(int(state["epoch"]), int(state["position"]))


def class_ids(labels) -> np.ndarray:
    """Labels as an int64 array of one class id per example, refusing what is not: a float such
    as 0.7 (int64 conversion would truncate it to class 0), text, nested lists."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one class id per example, got an array of shape {arr.shape}")
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if bad.size:
            raise ValueError(f"label of row {bad[0]} is {arr[bad[0]]}, not an integer class id")
    elif arr.dtype.kind not in "iub" and arr.size:
        # The first label that is not even an integer's text (in [0, 1, "pos"] numpy made every
        # one a string); the first one when all are ("0", "1").
        values = list(labels)
        row = next((i for i, v in enumerate(values) if not isinstance(v, numbers.Integral)
                    and not str(v).strip().lstrip("-").isdigit()), 0)
        value = values[row].item() if isinstance(values[row], np.generic) else values[row]
        raise ValueError(f"labels must be integer class ids, got {value!r} in row {row} (number "
                         "the classes first, e.g. with sorted(set(labels)))")
    return arr.astype(np.int64)
