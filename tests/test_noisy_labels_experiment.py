"""python/experiments/noisy_labels.py without training: seeded, nested label flips; the summary's
goal verdicts; a rerun skipping the runs its results file already holds; other settings refused."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pandas")
_path = Path(__file__).resolve().parents[1] / "python" / "experiments" / "noisy_labels.py"
_spec = importlib.util.spec_from_file_location("noisy_labels", _path)
nl = importlib.util.module_from_spec(_spec)
sys.modules["noisy_labels"] = nl
_spec.loader.exec_module(nl)


def test_flips_are_seeded_exact_and_nested():
    y = np.random.default_rng(0).integers(0, 5, 1000)
    a, fa = nl.flip_labels(y, 5, 0.2, seed=7)
    b, fb = nl.flip_labels(y, 5, 0.2, seed=7)
    np.testing.assert_array_equal(a, b)
    assert fa.sum() == 200 and np.all(a[fa] != y[fa]) and np.all(a[~fa] == y[~fa])
    assert a.min() >= 0 and a.max() <= 4
    small, fs = nl.flip_labels(y, 5, 0.1, seed=7)
    assert fs.sum() == 100 and np.all(fa[fs]) and np.array_equal(small[fs], a[fs])
    _, other = nl.flip_labels(y, 5, 0.2, seed=8)
    assert not np.array_equal(fa, other)


def _run(arm, seed, acc, flip=0.2, kept_flip=0.05, dataset="rotten_tomatoes"):
    return {"key": nl.run_key(dataset, flip, seed, arm), "dataset": dataset, "flip": flip,
            "seed": seed, "arm": arm, "device": "cpu", "accuracy": acc, "kept_flip_share": kept_flip,
            "pool_flip_share": flip, "kept": 30, "wall_s": 1.0}


def test_goal_verdicts_follow_the_numbers():
    runs = [_run("quality", s, a) for s, a in enumerate([0.80, 0.81, 0.82])]
    runs += [_run("random", s, a, kept_flip=0.2) for s, a in enumerate([0.70, 0.72, 0.74])]
    runs += [_run("quality", s, a, flip=0.0, kept_flip=0.0) for s, a in enumerate([0.80, 0.80, 0.80])]
    runs += [_run("random", s, a, flip=0.0, kept_flip=0.0) for s, a in enumerate([0.81, 0.82, 0.83])]
    goals = {g["flip"]: g for g in nl.summarize(runs)["goals"]}
    noisy, clean = goals[0.2], goals[0.0]
    assert noisy["flip_share_met"] and noisy["beats_random_met"]
    assert noisy["accuracy_diff"] == pytest.approx(0.09) and noisy["seed_spread"] == pytest.approx(0.02)
    assert not clean["no_worse_met"] and clean["accuracy_diff"] == pytest.approx(-0.02)
    runs[0]["kept_flip_share"] = runs[1]["kept_flip_share"] = runs[2]["kept_flip_share"] = 0.07
    assert not {g["flip"]: g for g in nl.summarize(runs)["goals"]}[0.2]["flip_share_met"]
    # A preference measured beside the default gets its own verdicts.
    runs_u = runs + [_run("quality_uniform", s, a, kept_flip=0.01) for s, a in enumerate([0.6, 0.7, 0.8])]
    uniform = [g for g in nl.summarize(runs_u)["goals"] if g["arm"] == "quality_uniform"]
    assert [g["flip"] for g in uniform] == [0.2] and uniform[0]["flip_share_met"]
    assert not uniform[0]["beats_random_met"]  # +0.0 against random, spread 0.1
    one_seed = [r for r in runs if r["seed"] == 0]
    assert {g["flip"]: g for g in nl.summarize(one_seed)["goals"]}[0.2]["beats_random_met"] is None


def test_a_guard_that_flagged_nothing_is_named_as_the_random_sample():
    # "no worse than random: met (+0.0000)" read as a quality result, though the arm had trained
    # on the random arm's rows at every seed.
    runs = [_run("random", s, a, flip=0.0, kept_flip=0.0) for s, a in enumerate([0.81, 0.82])]
    runs += [{**_run("quality_uniform", s, a, flip=0.0, kept_flip=0.0), "guard": {"flagged": 0}}
             for s, a in enumerate([0.81, 0.82])]
    (goal,) = nl.summarize(runs)["goals"]
    assert goal["same_as_random"] and goal["no_worse_met"]
    runs[-1]["accuracy"] = 0.83  # another row drawn somewhere: no longer the same sample
    assert not nl.summarize(runs)["goals"][0]["same_as_random"]


def test_rerun_skips_finished_runs_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--quick", "--datasets", "rotten_tomatoes", "--arms", "random", "--out", str(out)]
    ns = type("A", (), {"quick": True, "pool": 1000, "eval": 200, "fraction": 0.3})
    runs = [_run("random", 0, 0.6, flip=f) for f in (0.0, 0.2)]
    out.write_text(json.dumps({"settings": nl.settings(ns), "runs": runs}))
    assert nl.main(args) == 0
    printed = capsys.readouterr().out
    assert "0 runs to do (2 already in" in printed
    table = out.with_suffix(".md").read_text()
    assert "| rotten_tomatoes | 20% | random | 0.6000 ± 0.0000 |" in table
    assert ("Command: `python python/experiments/noisy_labels.py --datasets rotten_tomatoes --flips 0 "
            "0.2 --seeds 0 --arms random --quick --pool 1000 --eval 200 --out ") in table
    assert json.loads(out.read_text())["runs"] == runs
    with pytest.raises(SystemExit, match="other settings"):
        nl.main(args[:-2] + ["--fraction", "0.5", "--out", str(out)])
    with pytest.raises(SystemExit, match="other settings"):
        nl.main(args + ["--score-warmup", "7"])
    warm7 = tmp_path / "w.json"
    ns.score_warmup = 7
    warm7.write_text(json.dumps({"settings": nl.settings(ns), "runs": runs}))
    assert nl.main(args[:-1] + [str(warm7), "--score-warmup", "7"]) == 0
    assert "--quick --score-warmup 7 --pool 1000" in warm7.with_suffix(".md").read_text()
    # A file made under another default preference stays reproducible, and names it.
    ns.quality_preference = "high"
    warm7.write_text(json.dumps({"settings": nl.settings(ns), "runs": runs}))
    assert nl.main(args[:-1] + [str(warm7), "--score-warmup", "7", "--quality-preference", "high"]) == 0
    table = warm7.with_suffix(".md").read_text()
    assert "--quick --score-warmup 7 --quality-preference high --pool 1000" in table
    assert "quality preference 'high'" in table


def test_schedule_fits_short_runs():
    from tsqlora_ext.pipeline import demo_settings

    config, targs, _ = demo_settings()
    assert nl.fit_schedule(config, 3417, targs) == config  # the demo's own length: unchanged
    for n in (540, 120, 33):  # BBC News' 30%, --pool runs, a tiny quick run
        steps = int(np.ceil(np.ceil(n / targs.batch_size) * targs.epochs))
        fitted = nl.fit_schedule(config, n, targs)
        fitted.replace(total_steps=steps)  # validates: t_init + t_final < total_steps
        assert fitted.t_init + fitted.t_final < steps and fitted.delta_t >= 1


_RESULTS = _path.parent / "results"


@pytest.mark.parametrize("name", sorted(p.name for p in _RESULTS.glob("noisy_labels-*.json")))
def test_committed_results_files_stay_extendable_and_keep_their_flags(name, tmp_path):
    """A committed results file written before TsqLoRAConfig retired rescore_every and TrainArgs
    gained max_nonfinite_steps still passes a rerun's settings check, and its regenerated table
    names every flag that differs from today's default."""
    out = tmp_path / name
    out.write_text((_RESULTS / name).read_text())
    payload = json.loads(out.read_text())
    s = payload["settings"]
    cfg = s["config"]
    ns = type("A", (), {"quick": False, "pool": s["pool"], "eval": s["eval"],
                        "fraction": s["fraction"], "score_warmup": cfg["score_warmup"],
                        "quality_preference": cfg["quality_preference"]})
    assert nl.settings_diff(s, nl.settings(ns)) == []
    committed = (_RESULTS / name).with_suffix(".md").read_text()
    command = next(line for line in committed.splitlines() if line.startswith("Command: "))
    assert command in nl.markdown(payload, _RESULTS / name)  # markdown() only builds the text


def test_settings_check_ignores_non_outcome_and_retired_fields():
    ns = type("A", (), {"quick": True, "pool": 1000, "eval": 200, "fraction": 0.3})
    now = nl.settings(ns)
    old = json.loads(json.dumps(now))
    old["config"]["rescore_every"] = 0
    for name in ("max_nonfinite_steps", "num_workers", "progress"):
        old["train"].pop(name, None)
    old["train"]["checkpoint_every"] = 5
    assert nl.settings_diff(old, now) == []
    old["config"]["rescore_every"] = 3
    assert nl.settings_diff(old, now) == ["config.rescore_every 3 then, 0 now"]
    old["config"]["rescore_every"] = 0
    old["train"]["lr"] = 0.5
    assert [d.split(" ")[0] for d in nl.settings_diff(old, now)] == ["train.lr"]


def test_selection_rules_rerun_adds_missing_rules_and_records_every_calls_grid():
    """selection_rules.py keyed finished work per (dataset, flip, seed), so a rerun asking for more
    rules skipped them; and its recorded args were only the latest call's."""
    spec = importlib.util.spec_from_file_location("selection_rules",
                                                  _path.parent / "selection_rules.py")
    sr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sr)
    runs = [{"dataset": "rotten_tomatoes", "flip": 0.2, "seed": s, "rule": r}
            for s in (0, 1) for r in ("random", "guarded")]
    args = type("A", (), {"datasets": ["rotten_tomatoes"], "flips": [0.2], "seeds": [0, 1],
                          "rules": ["random", "low"], "pool": 0, "eval": 0, "fraction": 0.3})
    jobs = sr.pending(runs, args, threads=1)
    assert [(j["seed"], j["rules"]) for j in jobs] == [(0, ["low"]), (1, ["low"])]
    args.rules = ["random", "guarded"]
    assert sr.pending(runs, args, threads=1) == []
    runs.append({"dataset": "rotten_tomatoes", "flip": 0.2, "seed": 0, "rule": "low"})
    rec = sr.recorded_args(runs, {"datasets": ["bbc_news"], "flips": [0.0], "seeds": [5],
                                  "rules": ["low"], "pool": 0, "eval": 0, "fraction": 0.3,
                                  "out": "x.json"})
    assert rec["rules"] == ["random", "guarded", "low"] and rec["seeds"] == [0, 1]
    assert rec["datasets"] == ["rotten_tomatoes"] and rec["flips"] == [0.2] and rec["out"] == "x.json"
