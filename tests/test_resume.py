"""Kill a training run with SIGKILL mid-way, resume it, and get exactly the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import train_worker as tw  # noqa: E402

from tsqlora_ext.checkpoint import CheckpointManager  # noqa: E402

WORKER = str(Path(__file__).with_name("train_worker.py"))
STEPS = 20


def _run(out, *extra, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, WORKER, "--out", str(out), "--steps", str(STEPS),
                             "--checkpoint-every", "4", *extra], env=env, text=True, **popen)


def _adapter(out):
    return tw.adapter_tensors(Path(out) / "adapter-rank0")


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _run(full).wait(timeout=240) == 0

    proc = _run(killed, "--step-delay", "0.25", stdout=subprocess.PIPE)
    deadline = time.time() + 240
    for line in proc.stdout:  # kill between two checkpoints, after the second one
        if line.strip() == "step 10" or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpts = CheckpointManager(killed / "checkpoints").checkpoints()
    assert [s for s, _ in ckpts] == [4, 8]  # keep=2; the kill lost at most 4 steps
    assert not (killed / "result-rank0.json").exists()

    assert _run(killed, "--resume").wait(timeout=240) == 0
    a = json.loads((full / "result-rank0.json").read_text())
    b = json.loads((killed / "result-rank0.json").read_text())
    assert b["optimizer_steps"] == a["optimizer_steps"] == STEPS
    assert [h["loss"] for h in b["loss_history"]] == [h["loss"] for h in a["loss_history"]]
    assert b["rank_history"] == a["rank_history"]
    assert b["active"] == a["active"]
    assert b["metrics"] == a["metrics"]
    wa, wb = _adapter(full), _adapter(killed)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def test_latest_skips_a_damaged_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, every=1, keep=3)
    m.save(1, {"step": 1, "x": torch.arange(3)})
    m.save(2, {"step": 2, "x": torch.arange(4)})
    path2 = m.checkpoints()[-1][1]
    path2.write_bytes(path2.read_bytes()[:20])  # a file cut short by something outside our control
    (tmp_path / ".step-000000003.ckpt.tmp-123").write_bytes(b"partial")  # a write killed midway
    with pytest.warns(UserWarning, match="could not be read"):
        path, state = m.latest()
    assert state["step"] == 1 and path.name == "step-000000001.ckpt"
    m.save(3, {"step": 3})
    assert [s for s, _ in m.checkpoints()] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp*"))
    m.save(4, {"step": 4})
    assert [s for s, _ in m.checkpoints()] == [2, 3, 4]
