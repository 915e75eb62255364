"""Small formatting helpers of the run report."""

from __future__ import annotations

import pytest

from tsqlora_ext.report import _short, fmt_seconds, quality_title, step_edges


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


def test_rank_heatmap_spans_each_record_to_the_next():
    # imshow spread unevenly spaced records evenly: step 8's ranks were drawn over steps 3.7-7.9
    # and the axis stopped short of the run's last step.
    assert step_edges([0, 8, 12, 16], end_step=24).tolist() == [0, 8, 12, 16, 24]
    assert step_edges([0, 8, 12, 16]).tolist() == [0, 8, 12, 16, 20]
    assert step_edges([0]).tolist() == [0, 1]


def test_heatmap_labels_keep_layers_apart():
    names = ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
             "model.layers.11.self_attn.q_proj", "classifier.dense", "head.net.2"]
    assert [_short(n) for n in names] == ["L0.attention.output.dense", "L0.output.dense",
                                          "L11.self_attn.q_proj", "classifier.dense", "L2.net"]


def test_quality_histogram_title_tells_gate_drops_from_guard_drops():
    # The guard's drops were listed as "dropped before scoring", though they were scored and
    # counted in the histogram's dropped bars.
    title = quality_title({"too_short": 3, "exact_duplicate": 2, "likely_mislabeled": 76})
    assert title == ("quality score Q — not scored (gate): too_short 3, exact_duplicate 2; of the "
                     "dropped, the wrong-label guard's 76")


def test_a_failed_atomic_write_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path):
    from tsqlora_ext.files import atomic_write

    path = tmp_path / "metrics.json"
    path.write_text("earlier")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and path.read_text() == "earlier"
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and path.read_text() == "new"
