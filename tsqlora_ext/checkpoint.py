"""Training checkpoints that survive SIGKILL at any moment.

A checkpoint is ONE file, ``<dir>/step-<step>.ckpt`` (a ``torch.save`` of a dict), so it is either
fully there or absent:

1. the state is written to ``<dir>/.step-<step>.ckpt.tmp-<pid>``, flushed and fsync-ed;
2. ``os.replace`` renames it into place (atomic on POSIX and Windows);
3. the directory is fsync-ed so the rename itself is durable;
4. only then are checkpoints older than the newest ``keep`` deleted.

A kill between any two of these leaves the previous good checkpoint untouched (at worst a stray
``.tmp-<pid>`` file, which is ignored and cleaned up by the next save). ``latest()`` returns the newest
checkpoint that loads; a file damaged by something outside our control (a full disk, a copy cut
short) is skipped with a warning and the one before it is used.

What goes in the dict is the trainer's business (see ``train.py``: trainable parameters and
adapter active sets, optimizer, scheduler, allocator, loader position, RNG states, metrics so far).
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_write

_NAME = re.compile(r"^step-(\d+)\.ckpt$")


class CheckpointManager:
    """Writes ``step-<N>.ckpt`` files atomically into ``directory`` and keeps the newest ``keep``.

    Args:
        directory: where checkpoints live (created if missing).
        every: ``due(step)`` is true every ``every`` optimizer steps (0: never).
        keep: how many checkpoints to keep (>= 1).
    """

    def __init__(self, directory: str | os.PathLike, every: int = 0, keep: int = 2) -> None:
        if every < 0:
            raise ValueError(f"checkpoint every must be >= 0, got {every}")
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def refuse_earlier_run(self, how_to_continue: str, label: str = "") -> None:
        """Raise when the directory already holds checkpoints that this run will not resume: they
        belong to an earlier run, whose newest outrank this run's by step number (``save`` would
        prune this run's own) and which a later resume would continue. ``how_to_continue`` says how
        to resume that run instead; ``label`` prefixes the message."""
        found = self.checkpoints()
        if found:
            raise ValueError(f"{label}{self.directory} already holds checkpoints of an earlier run "
                             f"(up to step {found[-1][0]}): {how_to_continue}")

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stray in self.directory.glob(".step-*.ckpt.tmp-*"):
            stray.unlink(missing_ok=True)
        final = atomic_save(state, self.directory / f"step-{step:09d}.ckpt")
        for _, old in self.checkpoints()[:-self.keep]:
            old.unlink(missing_ok=True)
        return final

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, as (path, state), or None when there is none."""
        for _, path in reversed(self.checkpoints()):
            try:
                return path, load_checkpoint(path)
            except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to an older one
                warnings.warn(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                              "trying the one before it", stacklevel=2)
        return None


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` so that it is either fully there or absent
    (``files.atomic_write``)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    # weights_only=False: the state holds plain Python containers, numpy RNG state and the
    # allocator's history; checkpoints are files this package wrote, not untrusted input.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a tsqlora_ext training checkpoint")
    return state


# ---- RNG state ----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every random stream training touches: Python, numpy, torch CPU and each CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
