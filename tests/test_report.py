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
