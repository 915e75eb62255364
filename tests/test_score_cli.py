"""`tsqlora score` (warm-up + scoring pass over a user file) and `tsqlora select --scores` applying
the pipeline's wrong-label guard, abstain rules included, to the scores file it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from tsqlora_ext import cli  # noqa: E402
from tsqlora_ext.mislabel import flag_mislabeled  # noqa: E402
from tsqlora_ext.quality import SCORE_FIELDS, read_scores, selection_score  # noqa: E402

import train_worker as tw  # noqa: E402

FLAGS = ["--r-init", "4", "--r-max", "6", "--lora-alpha", "8",
         "--score-warmup", "3", "--batch-size", "8", "--max-length", "16", "--lr", "5e-3",
         "--num-workers", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tw.tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


def _jsonl(path: Path, texts, labels) -> Path:
    path.write_text("".join(json.dumps({"review": t, "y": y}) + "\n" for t, y in zip(texts, labels)))
    return path


def test_score_writes_every_row_then_select_uses_it(tmp_path, model_dir, capsys):
    texts, labels = tw.tiny_texts(48, seed=4)
    data = _jsonl(tmp_path / "data.jsonl", texts, labels)
    out = tmp_path / "scores" / "scores.jsonl"
    rc = cli.main(["score", "--model", str(model_dir), "--input", str(data), "--text-field", "review",
                   "--label-field", "y", "--out", str(out), *FLAGS])
    assert rc == 0
    assert "scored 48 rows" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(48))
    assert all(set(r) == set(SCORE_FIELDS) | {"likely_mislabeled"} for r in rows)
    s = read_scores(out)
    assert np.all(s.loss > 0) and np.all(s.G > 0) and np.all((s.p_mislabeled >= 0) & (s.p_mislabeled <= 1))
    np.testing.assert_array_equal(s.score, 0.0)  # the default preference, 'uniform'
    assert np.all(np.isfinite(s.Q)) and np.ptp(s.Q) > 0  # Q is still written for other rules
    meta = json.loads((tmp_path / "scores" / "scores.jsonl.meta.json").read_text())
    assert meta["warmup"]["steps"] == 3 and meta["labels"] == ["neg", "pos"] and meta["n"] == 48
    assert not list((tmp_path / "scores").glob("*.tmp*"))

    subset = tmp_path / "subset.jsonl"
    rc = cli.main(["select", "--input", str(data), "--text-field", "review", "--label-field", "y",
                   "--scores", str(out), "--fraction", "0.5", "--no-gate", "--out", str(subset),
                   "--report", str(tmp_path / "report.json")])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    _, flags, _ = flag_mislabeled(s.loss)  # the pipeline's guard on the same losses
    assert report["mislabel_guard"]["rule"] == "mixture"
    assert report["reasons"]["likely_mislabeled"] == int(flags.sum())
    assert len(subset.read_text().splitlines()) == report["kept"]


def test_score_refuses_bad_input(tmp_path, model_dir, capsys):
    texts, labels = tw.tiny_texts(8, seed=5)
    data = _jsonl(tmp_path / "data.jsonl", texts, labels)
    rc = cli.main(["score", "--model", str(model_dir), "--input", str(data), "--text-field", "review",
                   "--label-field", "label", "--out", str(tmp_path / "s.jsonl"), *FLAGS])
    assert rc == 2 and "label" in capsys.readouterr().err
    before = data.read_bytes()
    rc = cli.main(["score", "--model", str(model_dir), "--input", str(data), "--text-field", "review",
                   "--label-field", "y", "--out", str(data), *FLAGS])
    assert rc == 2 and "refusing to overwrite the input" in capsys.readouterr().err
    assert data.read_bytes() == before
    _jsonl(tmp_path / "one.jsonl", texts, ["pos"] * len(texts))
    rc = cli.main(["score", "--model", str(model_dir), "--input", str(tmp_path / "one.jsonl"),
                   "--text-field", "review", "--label-field", "y", "--out", str(tmp_path / "s.jsonl"),
                   *FLAGS])
    assert rc == 2 and "1 distinct label" in capsys.readouterr().err
    # An --out that cannot be written is refused before the warm-up and scoring pass, not after.
    (tmp_path / "taken").mkdir()
    rc = cli.main(["score", "--model", str(model_dir), "--input", str(data), "--text-field", "review",
                   "--label-field", "y", "--out", str(tmp_path / "taken"), *FLAGS,
                   "--score-warmup", "1000000"])
    assert rc == 2 and f"--out {tmp_path / 'taken'}: is a folder" in capsys.readouterr().err
    # A warm-up that diverges is named as one, with the rate to lower.
    rc = cli.main(["score", "--model", str(model_dir), "--input", str(data), "--text-field", "review",
                   "--label-field", "y", "--out", str(tmp_path / "s.jsonl"), *FLAGS, "--lr", "1e30"])
    err = capsys.readouterr().err
    assert rc == 2 and "have a NaN/inf loss" in err and "3 warm-up steps at lr 1e+30: lower the learning rate" in err
    assert not list(tmp_path.glob("s.jsonl*"))


def _scores_file(path: Path, loss: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    p, _, _ = flag_mislabeled(loss, max_spread=np.inf)
    path.write_text("".join(json.dumps({"index": i, "loss": float(loss[i]), "G": 1.0, "D": 1.0,
                                        "C": None, "Q": 0.0, "score": float(rng.normal()),
                                        "p_mislabeled": float(p[i])}) + "\n"
                            for i in range(loss.size)))
    return path


def _select(tmp_path, data, scores, *extra) -> dict:
    rc = cli.main(["select", "--input", str(data), "--text-field", "review", "--label-field", "y",
                   "--scores", str(scores), "--fraction", "0.3", "--no-gate", "--out",
                   str(tmp_path / "subset.jsonl"), "--report", str(tmp_path / "r.json"), *extra])
    assert rc == 0
    return json.loads((tmp_path / "r.json").read_text())


def test_select_guard_flags_a_cluster_and_abstains_on_a_tail(tmp_path, capsys):
    n = 400
    texts, labels = [f"review number {i} of the pool" for i in range(n)], ["a", "b"] * (n // 2)
    data = _jsonl(tmp_path / "data.jsonl", texts, labels)
    rng = np.random.default_rng(3)
    # A cluster of wrong labels: 20% of the rows around a high loss. The guard drops them.
    cluster = np.concatenate([np.abs(rng.normal(0.1, 0.08, 320)), rng.normal(2.5, 0.4, 80)])
    r = _select(tmp_path, data, _scores_file(tmp_path / "c.jsonl", cluster))
    assert r["mislabel_guard"]["abstains"] is None
    dropped = r["reasons"]["likely_mislabeled"]
    assert dropped == int(flag_mislabeled(cluster)[1].sum()) and 70 <= dropped <= 90
    assert f"wrong-label guard: flags {dropped} rows as likely mislabeled (P > 0.5)" in capsys.readouterr().out
    assert _select(tmp_path, data, tmp_path / "c.jsonl",
                   "--no-mislabel-guard")["reasons"]["likely_mislabeled"] == 0
    # A long tail of model errors (clean data): the p_mislabeled column says > 0.5 for many rows,
    # but the mixture's high-loss component is a tail, so the guard drops nothing, as in training.
    tail = rng.exponential(0.4, n)
    path = _scores_file(tmp_path / "t.jsonl", tail)
    assert sum(json.loads(x)["p_mislabeled"] > 0.5 for x in path.read_text().splitlines()) > 40
    r = _select(tmp_path, data, path)
    assert r["mislabel_guard"]["abstains"] == "tail" and r["reasons"]["likely_mislabeled"] == 0
    assert "wrong-label guard: abstains (tail: the high-loss component is a tail" in capsys.readouterr().out
    r = _select(tmp_path, data, path, "--mislabel-max-spread", "1e9")
    assert r["reasons"]["likely_mislabeled"] > 40


def test_selection_score_prefers_typical_high_or_no_q():
    q = np.array([-3.0, -0.5, 0.0, 0.4, 5.0])
    np.testing.assert_array_equal(selection_score(q, "high"), q)
    m = selection_score(q, "moderate")
    assert np.argmax(m) == 2 and np.argmin(m) == 4 and np.all(m <= 0)
    # 'uniform': every scored example equally likely; an unscorable one stays unscorable.
    u = selection_score(np.append(q, np.nan), "uniform")
    np.testing.assert_array_equal(u[:-1], 0.0)
    assert np.isnan(u[-1])
    with pytest.raises(ValueError, match="preference"):
        selection_score(q, "low")


@pytest.mark.parametrize("flag", ["--epochs", "--max-steps", "--grad-accum", "--data-fraction",
                                  "--temperature", "--target-r", "--r-min", "--t-init",
                                  "--calibration-batches", "--beta1", "--warmup-ratio",
                                  "--keep-checkpoints", "--checkpoint-every",
                                  "--max-nonfinite-steps"])
def test_score_has_no_flag_it_would_ignore(tmp_path, flag, capsys):
    """score reads only the adapter, warm-up and scoring fields; a training-only flag is refused
    (it used to be accepted and silently ignored)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["score", "--input", "x.jsonl", "--out", str(tmp_path / "s.jsonl"), flag, "2"])
    assert e.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_score_flags_are_the_fields_scoring_reads():
    import dataclasses

    from tsqlora_ext.config import TsqLoRAConfig
    from tsqlora_ext.train import TrainArgs

    assert set(cli.SCORE_METHOD_FIELDS) <= {f.name for f in dataclasses.fields(TsqLoRAConfig)}
    assert set(cli.SCORE_TRAIN_FIELDS) <= {f.name for f in dataclasses.fields(TrainArgs)}
    args = cli.build_parser().parse_args(["score", "--input", "x", "--out", "y", "--score-warmup", "5",
                                          "--lr", "1e-2", "--r-max", "4", "--r-init", "2"])
    assert (args.score_warmup, args.lr, args.r_max) == (5, 1e-2, 4)


@pytest.mark.parametrize("command", ["score", "train"])
def test_a_wrong_model_path_is_an_error_naming_it(tmp_path, command, capsys):
    data = _jsonl(tmp_path / "data.jsonl", ["a b c", "d e f"], ["x", "y"])
    empty = tmp_path / "empty"
    empty.mkdir()
    where = ["--input", str(data)] if command == "score" else ["--data", str(data)]
    for model in (tmp_path / "no-such-folder", empty, tmp_path / "no-such.gguf", data):
        rc = cli.main([command, "--model", str(model), *where, "--out", str(tmp_path / "out.jsonl")])
        assert rc == 2
        assert "--model" in (err := capsys.readouterr().err) and str(model) in err
    assert not (tmp_path / "out.jsonl").exists()


def test_select_fits_the_guard_to_the_rows_the_gate_keeps(tmp_path):
    # As training fits it to its gated pool: `tsqlora score` scores every row, and the rows the
    # gate drops entered the fit (here a fifth of the file, too short, at a high loss).
    n = 400
    texts = [f"review number {i} of the pool" if i % 5 else "too short" for i in range(n)]
    data = _jsonl(tmp_path / "data.jsonl", texts, ["a", "b"] * (n // 2))
    rng = np.random.default_rng(4)
    loss = np.where(np.arange(n) % 5 == 0, rng.normal(2.5, 0.4, n), np.abs(rng.normal(0.1, 0.08, n)))
    rc = cli.main(["select", "--input", str(data), "--text-field", "review", "--label-field", "y",
                   "--scores", str(_scores_file(tmp_path / "s.jsonl", loss)), "--fraction", "0.3",
                   "--out", str(tmp_path / "subset.jsonl"), "--report", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["reasons"]["too_short"] == n // 5 and r["mislabel_guard"]["scored"] == n - n // 5
    want = flag_mislabeled(loss[np.arange(n) % 5 != 0])[1].sum()
    assert r["reasons"]["likely_mislabeled"] == want
