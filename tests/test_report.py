"""Small formatting helpers of the run report."""

from __future__ import annotations

import pytest

from tsqlora_ext.report import fmt_seconds


@pytest.mark.parametrize("seconds, text", [
    (5.04, "5.0 s"), (59.94, "59.9 s"), (59.96, "1 min 0 s"), (119.4, "1 min 59 s"),
    (119.6, "2 min 0 s"), (518.2, "8 min 38 s"),
])
def test_fmt_seconds_rounds_before_splitting_minutes(seconds, text):
    assert fmt_seconds(seconds) == text


def test_write_json_is_strict_json(tmp_path):
    import json

    import numpy as np

    from tsqlora_ext.report import write_json

    write_json({"loss": [1.5, float("nan")], "norm": np.float64("inf"), "ids": np.arange(2),
                "n": np.int64(3), "pair": (0.5, -np.inf)}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": [1.5, None], "norm": None, "ids": [0, 1], "n": 3, "pair": [0.5, None]}


def test_report_without_matplotlib_keeps_metrics_and_warns(tmp_path, monkeypatch):
    # A run that trained to the end must not lose its results to a missing plotting library.
    import builtins
    import json

    from tsqlora_ext import report

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="matplotlib is not installed, so the plots are left out"):
        report.write_report(tmp_path, metrics={"accuracy": 0.5}, rank_history=[], layer_names=[],
                            runs={})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"accuracy": 0.5}
    assert not list(tmp_path.glob("*.png"))
