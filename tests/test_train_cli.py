"""`tsqlora train` end to end on user files with a tiny model folder: the report folder, the
adapter loading back to the same predictions, bad input failing with exit code 2 and the file and
line, and `--resume` after SIGKILL giving exactly the uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("safetensors")

from tsqlora_ext import load_adapter  # noqa: E402
from tsqlora_ext.cli import main  # noqa: E402
from tsqlora_ext.report import REPORT_FILES  # noqa: E402
from tsqlora_ext.train import TokenizedData, evaluate, lora_layers  # noqa: E402

import train_worker as tw  # noqa: E402

# A few steps of everything: 2 warm-up steps, scoring, selection, 1 calibration batch, 8 steps
# with a reallocation every step between steps 1 and 7.
FLAGS = ["--r-init", "4", "--target-r", "2", "--r-max", "6", "--lora-alpha", "8", "--t-init", "1",
         "--t-final", "1", "--delta-t", "1", "--calibration-batches", "1", "--score-warmup", "2",
         "--data-fraction", "0.5", "--batch-size", "8", "--max-steps", "8", "--lr", "5e-3",
         "--max-length", "16", "--num-workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tw.tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


def _write(path: Path, texts, labels) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    else:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "text"])
            w.writerows(zip(labels, texts))
    return path


def _data(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    train = _write(tmp_path / f"train.{fmt}", *tw.tiny_texts(160, seed=1))
    held_out = _write(tmp_path / f"eval.{fmt}", *tw.tiny_texts(40, seed=2))
    return train, held_out


@pytest.mark.parametrize("fmt,bf16", [("jsonl", "off"), ("csv", "on")])
def test_train_on_a_user_file_writes_the_report_and_a_loadable_adapter(tmp_path, model_dir, fmt, bf16, capsys):
    torch.set_num_threads(1)
    train_file, eval_file = _data(tmp_path, fmt)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--data", str(train_file), "--eval-data", str(eval_file),
               "--out", str(out), "--bf16", bf16, *FLAGS])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "selected fraction" in printed and "final rank per layer" in printed

    for name in (*REPORT_FILES, "run.json", "selection.json", "scores.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    tsq = m["tsqlora"]
    assert m["task"] == "train" and m["train_args"]["bf16"] == bf16
    selection = json.loads((out / "selection.json").read_text())
    assert m["selection"]["rows"] == 160 and m["selection"]["kept"] == len(selection["indices"]) > 0
    assert tsq["optimizer_steps"] == 8 and tsq["reallocations"] > 0
    assert len(tsq["loss_history"]) == 8
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in tsq["loss_history"])
    assert sum(tsq["final_ranks"].values()) == 2 * len(tsq["final_ranks"])  # target_r per layer
    initial = tsq["rank_history"][0]["ranks"]
    assert any(tsq["final_ranks"][n] != initial[n] for n in initial)
    assert tsq["metrics"]["n"] == 40 and 0 <= tsq["metrics"]["accuracy"] <= 1
    assert len(scores := (out / "scores.jsonl").read_text().splitlines()) == m["selection"]["pool"]
    assert {"Q", "index"} <= set(json.loads(scores[0]))

    # The saved adapter on a freshly loaded base model predicts exactly what the run measured.
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = load_adapter(base, out / "adapter")
    texts, labels = tw.tiny_texts(40, seed=2)
    held_out = TokenizedData.from_texts(tokenizer, texts, [["neg", "pos"].index(y) for y in labels], 16)
    again = evaluate(model, held_out, batch_size=m["train_args"]["eval_batch_size"], max_length=16,
                     pad_id=tokenizer.pad_token_id, bf16=bf16, num_workers=1)
    assert again["accuracy"] == tsq["metrics"]["accuracy"]
    assert again["loss"] == pytest.approx(tsq["metrics"]["loss"], rel=1e-5)
    assert {n: lay.rank for n, lay in lora_layers(model)} == tsq["final_ranks"]
    # The head's classes are the file's labels, in the run's report and on the loaded model.
    assert m["labels"] == ["neg", "pos"] and model.config.id2label == {0: "neg", 1: "pos"}


def test_a_schedule_the_run_cannot_hold_leaves_the_folder_free(tmp_path, model_dir, capsys):
    # Refused only inside train(), after the scoring pass had written selection.json and
    # scores.jsonl: a corrected run into the same --out was then refused as "an earlier run" whose
    # --resume repeated the error.
    torch.set_num_threads(1)
    train_file, eval_file = _data(tmp_path, "jsonl")
    out = tmp_path / "run"
    base = ["train", "--model", str(model_dir), "--data", str(train_file), "--eval-data",
            str(eval_file), "--out", str(out), *FLAGS[:FLAGS.index("--max-steps")],
            *FLAGS[FLAGS.index("--max-steps") + 2:]]
    for bad in (["--max-steps", "2"], ["--epochs", "0.1"]):  # before the gate / after selection
        assert main([*base, *bad]) == 2
        assert "t_init + t_final = 2 leaves no budget phase" in capsys.readouterr().err
        assert not (out / "selection.json").exists() and not (out / "scores.jsonl").exists()
    assert main([*base, "--max-steps", "4"]) == 0


def test_three_classes_on_a_folder_with_a_two_class_head(tmp_path, model_dir, capsys):
    # The saved 2-way head could not be loaded for 3 labels: an uncaught RuntimeError (exit 1).
    torch.set_num_threads(1)
    texts, labels = tw.tiny_texts(120, seed=3)
    labels = [["neg", "pos", "mid"][i % 3] if y == "pos" else y for i, y in enumerate(labels)]
    data = _write(tmp_path / "three.jsonl", texts, labels)
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "r"),
                 *FLAGS]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["labels"] == ["mid", "neg", "pos"] and "macro_f1" in m["tsqlora"]["metrics"]
    # Only the head may be new: another weight that does not fit the config is refused, not
    # silently re-initialised.
    from tsqlora_ext.pipeline import _load_model
    odd = tmp_path / "odd-model"
    tw.tiny_model_dir(odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 7}))
    with pytest.raises(ValueError, match=r"weights whose shapes do not fit the model's config: "
                                         r".*word_embeddings.weight"):
        _load_model(odd, ["a", "b", "c"], seed=0)
    # A --data path that does not exist is named before anything is written.
    assert main(["train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert f"--data {tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_input_exits_2_naming_file_and_line(tmp_path, model_dir, capsys):
    train_file, _ = _data(tmp_path, "jsonl")
    lines = train_file.read_text().splitlines()
    base = ["train", "--model", str(model_dir), "--out", str(tmp_path / "out"), *FLAGS]

    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text("\n".join(lines[:3] + [json.dumps({"body": "w1 w2 w3 w4", "label": "pos"})]
                                 + lines[3:]) + "\n")
    assert main([*base, "--data", str(no_text)]) == 2
    assert "line 4 of no_text.jsonl: field 'text' missing" in capsys.readouterr().err

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("\n".join(lines[:6] + ['{"text": "w1 w2 w3", "label": '] + lines[6:]) + "\n")
    assert main([*base, "--data", str(bad_json)]) == 2
    assert "line 7 of bad.jsonl: malformed JSON" in capsys.readouterr().err

    eval_file = _write(tmp_path / "eval.csv", ["w1 w2 w3 w4", "w5 w6 w7 w8", "w9 w10 w11"],
                       ["pos", "neg", "maybe"])
    assert main([*base, "--data", str(train_file), "--eval-data", str(eval_file)]) == 2
    err = capsys.readouterr().err
    assert f"line 4 of {eval_file}: label 'maybe' does not occur in the training data" in err

    missing = tmp_path / "no-such-model.gguf"
    assert main(["train", "--model", str(missing), "--data", str(train_file), "--out", str(tmp_path / "out"),
                 *FLAGS]) == 2
    assert f"no such GGUF file {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


# ---- --resume through the CLI -----------------------------------------------------------------
def _record_pipeline(monkeypatch) -> list:
    """Replace the pipeline with a recorder of what `tsqlora train` would run."""
    from tsqlora_ext import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda model, task, out, config, args, **kw:
                        calls.append({"model": model, "task": task, "out": out, "args": args, **kw}))
    monkeypatch.setattr(pipeline, "file_task", lambda data, *a, **k: data)
    return calls


def test_resume_finds_the_run_from_any_directory_and_refuses_other_flags(tmp_path, monkeypatch, capsys):
    calls = _record_pipeline(monkeypatch)
    proj = tmp_path / "proj"
    (proj / "model").mkdir(parents=True)
    (proj / "model" / "config.json").write_text("{}")
    (proj / "train.jsonl").write_text('{"text": "w1 w2 w3", "label": 0}\n')
    monkeypatch.chdir(proj)
    assert main(["train", "--data", "train.jsonl", "--out", "runs/x", "--model", "model"]) == 0
    run = json.loads((proj / "runs/x/run.json").read_text())
    assert (run["data"], run["model"], run["out"], run["train"]["checkpoint_dir"]) == (
        str(proj / "train.jsonl"), str(proj / "model"), str(proj / "runs/x"),
        str(proj / "runs/x/checkpoints"))

    monkeypatch.chdir(tmp_path)  # elsewhere, naming the run folder from there
    assert main(["train", "--resume", "proj/runs/x"]) == 0
    assert (calls[-1]["out"], calls[-1]["task"], calls[-1]["resume"]) == (
        str(proj / "runs/x"), str(proj / "train.jsonl"), True)
    assert calls[-1]["args"].checkpoint_dir == str(proj / "runs/x/checkpoints")

    (proj / "runs/x").rename(tmp_path / "moved")  # the run folder itself moved
    assert main(["train", "--resume", "moved"]) == 0
    assert calls[-1]["out"] == str(tmp_path / "moved")
    assert calls[-1]["args"].checkpoint_dir == str(tmp_path / "moved/checkpoints")

    n = len(calls)
    assert main(["train", "--resume", "moved", "--epochs", "5", "--out", "other", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues" in err and "got --epochs, --out (to train" in err
    assert len(calls) == n
    # What changes nothing the remaining steps compute may be given, as the error of a run stopped
    # by non-finite steps suggests, and the next --resume keeps it.
    assert main(["train", "--resume", "moved", "--max-nonfinite-steps", "50", "--no-progress"]) == 0
    assert (calls[-1]["args"].max_nonfinite_steps, calls[-1]["args"].progress) == (50, False)
    assert main(["train", "--resume", "moved"]) == 0
    assert calls[-1]["args"].max_nonfinite_steps == 50


def test_a_new_run_into_an_earlier_runs_folder_is_refused(tmp_path, monkeypatch, capsys):
    calls = _record_pipeline(monkeypatch)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000000050.ckpt").write_bytes(b"an earlier run's")
    (out / "run.json").write_text("{}")
    assert main(["train", "--data", str(tmp_path / "train.jsonl"), "--out", str(out)]) == 2
    assert f"{out / 'checkpoints'} already holds checkpoints of an earlier run (up to step 50): continue it with " \
        f"--resume {out}, or choose another --out" in capsys.readouterr().err
    assert (out / "run.json").read_text() == "{}" and not calls


def test_what_a_new_run_would_overwrite_is_refused_before_anything_is_written(tmp_path, monkeypatch,
                                                                             capsys):
    # An earlier run's checkpoints even when this run keeps none (--checkpoint-every 0), an earlier
    # run's results without checkpoints, input files that are the run's own outputs, and a demo
    # into a train run's folder: each refused with the reason, run.json and the data untouched.
    calls = _record_pipeline(monkeypatch)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "w1 w2 w3", "label": 0}\n')
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000000050.ckpt").write_bytes(b"an earlier run's")
    (out / "run.json").write_text('{"earlier": true}')
    argv = ["train", "--data", str(data), "--out", str(out)]
    assert main(argv + ["--checkpoint-every", "0"]) == 2
    assert "already holds checkpoints of an earlier run" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert f"{out} is the folder of a tsqlora train run" in capsys.readouterr().err

    (out / "checkpoints" / "step-000000050.ckpt").unlink()
    (out / "metrics.json").write_text("{}")
    assert main(argv + ["--checkpoint-every", "0"]) == 2
    assert f"--out {out} holds the results of an earlier run (metrics.json)" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    capsys.readouterr()
    assert (out / "run.json").read_text() == '{"earlier": true}'

    # An earlier run whose checkpoints went to a --checkpoint-dir of its own, stopped during
    # training (its selection written, no results yet): still resumable, so not replaced.
    (out / "metrics.json").unlink()
    elsewhere = tmp_path / "ckpts"
    elsewhere.mkdir()
    (elsewhere / "step-000000010.ckpt").write_bytes(b"an earlier run's")
    (out / "run.json").write_text(json.dumps({"train": {"checkpoint_dir": str(elsewhere)}}))
    (out / "selection.json").write_text("{}")
    assert main(argv) == 2
    assert f"{elsewhere} already holds checkpoints of an earlier run (up to step 10)" in capsys.readouterr().err
    assert (out / "selection.json").read_text() == "{}"

    # A tsqlora demo folder: results without a run.json are still someone's.
    demo = tmp_path / "demo"
    (demo / "adapter").mkdir(parents=True)
    (demo / "metrics.json").write_text('{"task": "rotten_tomatoes"}')
    assert main(["train", "--data", str(data), "--out", str(demo)]) == 2
    assert f"--out {demo} holds the results of an earlier run (adapter, metrics.json): choose " \
        "another --out" in capsys.readouterr().err
    assert (demo / "metrics.json").read_text() == '{"task": "rotten_tomatoes"}'

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "scores.jsonl").write_text(data.read_text())
    assert main(["train", "--data", str(fresh / "scores.jsonl"), "--out", str(fresh)]) == 2
    assert f"--data {fresh / 'scores.jsonl'} is a file this run writes into --out" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--eval-data", str(fresh / "scores.jsonl"),
                 "--out", str(fresh)]) == 2
    assert "--eval-data" in capsys.readouterr().err
    assert not (fresh / "run.json").exists() and not calls


def test_a_checkpoint_dir_that_cannot_be_one_and_refused_data_leave_no_run(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "w1 w2 w3", "label": 0}\n{"text": "w4 w5 w6", "label": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "run"
    for argv, want in (
            (["--checkpoint-dir", str(tmp_path / "notes.txt")],
             f"--checkpoint-dir {tmp_path / 'notes.txt'}: a file is there, not a folder"),
            (["--checkpoint-dir", ""], "--checkpoint-dir: empty"),
            # Read before run.json is written: a demo or a corrected run may then use the folder.
            (["--data", "bundled:rotten_tomato"], "unknown bundled data set 'rotten_tomato'"),
            ([], "holding 1 distinct label(s); training needs at least 2")):
        assert main(["train", "--data", str(data), "--out", str(out), *argv]) == 2
        assert want in capsys.readouterr().err
        assert not out.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_module_flags_take_one_regex_or_name_suffixes(tmp_path, monkeypatch):
    # nargs="+" made every value a list, which wrap reads as suffixes: a regex never matched.
    from tsqlora_ext import pipeline

    configs = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda model, task, out, config, args, **kw:
                        configs.append(config))
    monkeypatch.setattr(pipeline, "bundled_task", lambda name: name)
    for i, (flags, want) in enumerate(((["query", "value"], ["query", "value"]),
                                       (["attention.self.query"], ["attention.self.query"]),
                                       ([r".*self\.(query|value)"], r".*self\.(query|value)"))):
        assert main(["train", "--data", "bundled:bbc_news", "--out", str(tmp_path / str(i)),
                     "--target-modules", *flags, "--exclude-modules", *flags]) == 0
        assert configs[-1].target_modules == want == configs[-1].exclude_modules


def test_resume_of_a_damaged_run_json_and_an_out_that_is_a_file_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for text, want in (("{not json", "is not a run's settings (JSONDecodeError"),
                       ("{}", "lacks model, data,")):
        (run / "run.json").write_text(text)
        assert main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run / 'run.json'}" in err and want in err, err
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "w1 w2 w3", "label": 0}\n')
    assert main(["train", "--data", str(data), "--out", str(data)]) == 2  # a file, not a folder
    assert "tsqlora train: error:" in capsys.readouterr().err


def test_a_config_file_that_is_not_an_object_of_fields_exits_2(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    argv = ["train", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--config", str(cfg)]
    for text, want in (("null", "settings must be a JSON object, got NoneType"),
                       ('{"tsqlora": 5}', '"tsqlora" must be a JSON object of fields, got int'),
                       ('{"lr": "abc"}', "TrainArgs.lr must be float, got 'abc'"),
                       ('{"seed": "caf\xe9"}'.encode("latin-1"), "not UTF-8 text (invalid continuation byte at byte 13)")):
        cfg.write_bytes(text.encode() if isinstance(text, str) else text)
        assert main(argv) == 2
        assert f"{cfg}: {want}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_pipeline_refuses_earlier_checkpoints_before_it_overwrites_anything(tmp_path, resume):
    # Called directly (not through the CLI's own check): the refusal must come before the gate and
    # the scoring pass rewrite selection.json and scores.jsonl of the run the checkpoints belong to.
    from tsqlora_ext.config import TsqLoRAConfig
    from tsqlora_ext.pipeline import TextTask, run_pipeline
    from tsqlora_ext.train import TrainArgs

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000000050.ckpt").write_bytes(b"an earlier run's")
    (out / "scores.jsonl").write_text("kept\n")
    task = TextTask("t", ["a", "b"], ["x y z"] * 4, [0, 1] * 2, ["x y z"] * 2, [0, 1])
    want = (r"selection\.json is missing, so the run whose checkpoints .* holds cannot be resumed"
            if resume else r"already holds checkpoints of an earlier run \(up to step 50\): continue it "
            r"with resume=True")
    args = TrainArgs(checkpoint_every=5, checkpoint_dir=str(out / "checkpoints"))
    with pytest.raises(ValueError, match=rf"run_pipeline: .*{want}"):
        run_pipeline(tmp_path / "no-model", task, out, TsqLoRAConfig(), args,
                     resume=resume, verbose=False)
    assert (out / "scores.jsonl").read_text() == "kept\n"


def test_resume_refuses_data_that_changed_since_the_run_started(tmp_path):
    from tsqlora_ext.config import TsqLoRAConfig
    from tsqlora_ext.pipeline import TextTask, data_fingerprint, run_pipeline
    from tsqlora_ext.train import TrainArgs

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000000050.ckpt").write_bytes(b"the run's")
    task = TextTask("t", ["a", "b"], ["x y z", "u v w"] * 2, [0, 1] * 2, ["x y z"] * 2, [0, 1])
    (out / "selection.json").write_text(json.dumps({"data": data_fingerprint(task)}))
    edited = TextTask("t", ["a", "b"], ["x y z", "u v w!"] * 2, [0, 1] * 2, ["x y z"] * 2, [0, 1])
    args = TrainArgs(checkpoint_every=5, checkpoint_dir=str(out / "checkpoints"))
    with pytest.raises(ValueError, match=r"run_pipeline: the data differ from those the run in .* "
                                         r"started on \(sha256 changed; selection\.json records 4 "
                                         r"training and 2 evaluation rows\)"):
        run_pipeline(tmp_path / "no-model", edited, out, TsqLoRAConfig(), args, resume=True,
                     verbose=False)


def test_resuming_a_run_whose_classes_were_numbered_in_text_order_is_refused(tmp_path):
    # selection.json of the previous version records no data: its classes 0..11 were numbered
    # "0", "1", "10", "11", "2", ..., and resuming would train its head on other ids.
    from tsqlora_ext.config import TsqLoRAConfig
    from tsqlora_ext.pipeline import TextTask, run_pipeline
    from tsqlora_ext.train import TrainArgs

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000000050.ckpt").write_bytes(b"the run's")
    (out / "selection.json").write_text("{}")
    names = [str(i) for i in range(12)]
    task = TextTask("t", names, ["x y z"] * 12, list(range(12)), ["x y z"] * 12, list(range(12)))
    args = TrainArgs(checkpoint_every=5, checkpoint_dir=str(out / "checkpoints"))
    with pytest.raises(ValueError, match=r"started by an earlier version, which numbered its classes "
                                         r"in text order \(0, 1, 10, 11, 2,"):
        run_pipeline(tmp_path / "no-model", task, out, TsqLoRAConfig(), args, resume=True, verbose=False)


def test_labels_are_classes_by_value_numbered_in_order_of_value(tmp_path):
    from tsqlora_ext.pipeline import file_task

    def task(rows, name="d.jsonl", **kw):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"text": f"text {i}", "label": y}) + "\n"
                                for i, y in enumerate(rows)))
        return file_task(path, "text", "label", **kw)

    # A number is one class however it is spelled (it was "0" and "0.0", two classes).
    t = task([0, 0.0, "0", 1, "1.0", 1e0, " 1 ", "+1", "1.", 0.5, ".5"] * 3, eval_fraction=0.2)
    assert t.label_names == ["0", "0.5", "1"]
    # Twelve numbered classes keep their numbers as class ids ("10" sorted before "2").
    t = task(list(range(12)) * 2, eval_path=_write(tmp_path / "e.csv", ["a", "b"], ["10", "2.0"]))
    assert t.label_names == [str(i) for i in range(12)]
    assert t.train_labels == list(range(12)) * 2 and t.eval_labels == [10, 2]
    # Two rows leave one for training: refused, not trained on a single example.
    with pytest.raises(ValueError, match=r"tiny\.jsonl: 2 rows, of which 1 remain for training after "
                                         r"holding out 1 .* holding 1 distinct label\(s\)"):
        task(["neg", "pos"], name="tiny.jsonl")


def test_file_only_flags_with_bundled_data_are_refused(tmp_path, monkeypatch, capsys):
    calls = _record_pipeline(monkeypatch)
    for flag in ("--eval-data", "--text-field", "--label-field"):
        assert main(["train", "--data", "bundled:rotten_tomatoes", flag, "x",
                     "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} applies to file data only" in err and "bundled:rotten_tomatoes" in err
    assert not calls and not (tmp_path / "out").exists()


# `tsqlora train` that pauses once checkpoint PAUSE_AT is written, so the test kills it at a known
# point: that checkpoint on disk, the steps after it not yet run.
_PAUSING_CLI = """
import sys, time
from tsqlora_ext import checkpoint, cli
save = checkpoint.CheckpointManager.save
def pausing_save(self, step, state):
    path = save(self, step, state)
    if step == int(sys.argv[1]):
        print(f"saved {step}", flush=True)
        time.sleep(120)
    return path
checkpoint.CheckpointManager.save = pausing_save
sys.exit(cli.main(sys.argv[2:]))
"""


def _cli(*argv, pause_at: int | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = ["-c", _PAUSING_CLI, str(pause_at)] if pause_at is not None else ["-m", "tsqlora_ext.cli"]
    return subprocess.Popen([sys.executable, *head, *map(str, argv)], env=env, text=True, **popen)


@pytest.mark.slow
def test_cli_resume_after_sigkill_matches_uninterrupted_run(tmp_path, model_dir):
    train_file, eval_file = _data(tmp_path, "jsonl")
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["train", "--model", model_dir, "--data", train_file, "--eval-data", eval_file,
            *FLAGS, "--checkpoint-every", "2", "--keep-checkpoints", "2"]

    proc = _cli(*args, "--out", killed, pause_at=4, stdout=subprocess.PIPE)
    uninterrupted = _cli(*args, "--out", full, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.strip() == "saved 4" or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in sorted((killed / "checkpoints").glob("step-*.ckpt"))] == \
        ["step-000000002.ckpt", "step-000000004.ckpt"]
    assert not (killed / "metrics.json").exists()

    assert _cli("train", "--resume", killed, stdout=subprocess.DEVNULL).wait(timeout=120) == 0
    assert uninterrupted.wait(timeout=120) == 0
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["selection"] == a["selection"]
    for key in ("metrics", "eval_history", "loss_history", "rank_history", "final_ranks",
                "optimizer_steps", "reallocations"):
        assert b["tsqlora"][key] == a["tsqlora"][key], key
    assert b["tsqlora"]["optimizer_steps"] == 8
    wa, wb = tw.adapter_tensors(full / "adapter"), tw.adapter_tensors(killed / "adapter")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def test_flags_take_the_fields_declared_type():
    """The type of a flag comes from its field's annotation, not from its default's type
    (target_r: float = 8 refused 7.5)."""
    from tsqlora_ext.cli import build_parser

    args = build_parser().parse_args(["train", "--target-r", "7.5", "--lr", "2", "--max-steps", "3",
                                      "--quality-weights", "1", "0", "0", "--no-dynamic"])
    assert (args.target_r, args.lr, args.max_steps, args.quality_weights, args.dynamic) == \
        (7.5, 2.0, 3, [1.0, 0.0, 0.0], False)
    assert (type(args.lr), type(args.max_steps)) == (float, int)


@pytest.mark.parametrize("command", ["train", "score", "select", "demo"])
def test_help_lists_every_flag(command, capsys):
    """--help renders (argparse %-formats help texts, and field texts quote percentages)."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and f" {command}" in out.splitlines()[0]
    if command in ("train", "score"):
        assert "20%" in out  # from a field's help text, the percent sign intact


def test_ctrl_c_says_how_to_continue_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    from tsqlora_ext import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    monkeypatch.setattr(pipeline, "bundled_task", lambda name: name)
    assert main(["train", "--data", "bundled:bbc_news", "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == (f"tsqlora train: interrupted (continue with --resume "
                                       f"{tmp_path / 'run'})\n")
