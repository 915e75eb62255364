"""`tsqlora demo` end to end in reduced mode (few steps, tiny subset of the bundled data)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from tsqlora_ext.cli import main  # noqa: E402
from tsqlora_ext.report import REPORT_FILES  # noqa: E402


@pytest.mark.slow
def test_demo_quick_writes_every_report_file(tmp_path, minilm_dir, rotten_tomatoes, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["selection"]["fraction_of_rows"] <= 1
    assert m["baseline"]["examples"] == m["selection"]["kept"]
    assert 0 <= m["tsqlora"]["metrics"]["accuracy"] <= 1
    assert 0 <= m["baseline"]["metrics"]["accuracy"] <= 1
    assert sum(m["tsqlora"]["final_ranks"].values()) == round(m["config"]["target_r"] * 36)
    for needle in ("selected fraction", "held-out accuracy", "plain LoRA", "wall time",
                   "trainable params", "final rank per layer"):
        assert needle in printed
    abstains = (m["scoring"]["mixture"] or {}).get("guard_abstains")
    guard = (f"abstains ({abstains}: " if abstains else
             f"flags {m['selection']['reasons']['likely_mislabeled']:,} rows as likely mislabeled")
    assert f"wrong-label guard    {guard}" in printed, printed
