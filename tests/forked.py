"""Run a function in a fork()ed child and return what it reports, failing the test if it hangs
(the hang is the bug those tests look for: fork() copies no threads)."""

from __future__ import annotations

import multiprocessing
import queue

import pytest


def run_in_forked_child(target, *args, timeout: float = 30):
    """(what target(*args, out) put on ``out``, the child's exit code)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, out))
    child.start()
    try:
        got = out.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"{target.__name__} hung in a forked child")
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    return got, child.exitcode
