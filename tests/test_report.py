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
