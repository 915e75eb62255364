"""Two gloo processes on CPU: identical rank decisions everywhere, and the result of one process
at the same global batch (batch B on 2 processes == batch B with gradient accumulation 2)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import train_worker as tw  # noqa: E402

WORKER = str(Path(__file__).with_name("train_worker.py"))


def _adapter(out, rank):
    return tw.adapter_tensors(Path(out) / f"adapter-rank{rank}")


def _run(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process at the two-process runs' global batch (batch 8, accumulation 2)."""
    out = tmp_path_factory.mktemp("one")
    _run([sys.executable, WORKER, "--out", str(out), "--steps", "12", "--batch", "8",
          "--grad-accum", "2"], {**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def _check_two_match_one(two, one):
    r0, r1, single = (json.loads((d / f"result-rank{k}.json").read_text())
                      for d, k in ((two, 0), (two, 1), (one, 0)))
    assert r0["active"] == r1["active"]  # every process made the same rank decisions
    assert r0["rank_history"] == r1["rank_history"]
    assert r0["reallocations"] > 0
    a0, a1 = _adapter(two, 0), _adapter(two, 1)
    for k in a0:
        torch.testing.assert_close(a1[k], a0[k], rtol=0, atol=0, msg=k)

    # the same global batch on one process: same active sets, same adapter within float tolerance
    assert single["active"] == r0["active"]
    ref = _adapter(one, 0)
    for k in ref:
        torch.testing.assert_close(a0[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    for x, y in zip(r0["loss_history"], single["loss_history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
    assert r0["metrics"]["accuracy"] == pytest.approx(single["metrics"]["accuracy"], abs=1 / 64 + 1e-9)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, one_process):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    two = tmp_path / "two"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          WORKER, "--out", str(two), "--steps", "12", "--batch", "8"], {**os.environ, "OMP_NUM_THREADS": "1"})
    _check_two_match_one(two, one_process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one_process(tmp_path, one_process):
    """`accelerate launch` with 2 processes, torch.distributed set up by accelerate.Accelerator
    (train() finds the initialised group). On a machine without GPUs, accelerate 1.x starts 2
    processes only with --multi_gpu (which then runs MULTI_CPU on gloo): --cpu --num_processes 2
    starts ONE process unless an mpirun hostfile is given."""
    pytest.importorskip("accelerate")
    if not torch.distributed.is_available() or torch.cuda.is_available():
        pytest.skip("needs torch.distributed on a machine without GPUs (the run is CPU-only)")
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user config
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", str(_free_port()),
          WORKER, "--out", str(two), "--steps", "12", "--batch", "8", "--accelerator"], env)
    _check_two_match_one(two, one_process)
