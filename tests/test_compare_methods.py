"""python/experiments/compare_methods.py: learning-rate choice, paired differences, goals and the
resumable run store, on synthetic run records (no model is trained here)."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("compare_methods",
                                                  REPO / "python/experiments/compare_methods.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compare_methods"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("compare_methods", None)


def _run(method, lr, seed, val, test, step_ms=10.0):
    return {"key": f"t|{method}|lr={lr:g}|seed={seed}", "task": "t", "method": method, "lr": lr,
            "seed": seed, "device": "cpu", "settings_id": "s", "val": {"accuracy": val},
            "test": {"accuracy": test}, "params_active": 100, "final_ranks": {"a": 4, "b": 4},
            "train_examples": 50, "optimizer_steps": 5, "wall_s": 1.0, "step_ms_median": step_ms,
            "rank_history": [{"step": 0, "ranks": {"a": 4, "b": 4}}] if method == "tsqlora" else None}


def test_lr_is_picked_on_validation_never_on_test(cm):
    runs = [_run("lora", 1e-3, 0, val=0.80, test=0.50), _run("lora", 1e-2, 0, val=0.70, test=0.99)]
    assert cm.pick_lr(runs, (1e-3, 1e-2), 0) == 1e-3
    assert cm.pick_lr(runs, (1e-3, 3e-3, 1e-2), 0) is None  # grid not finished yet
    tie = [_run("lora", 1e-3, 0, 0.8, 0.5), _run("lora", 1e-2, 0, 0.8, 0.6)]
    assert cm.pick_lr(tie, (1e-3, 1e-2), 0) == 1e-3


def test_summary_pairs_seeds_and_measures_goals(cm):
    lrs, seeds = (1e-3, 1e-2), (0, 1, 2)
    runs = []
    for method, base, ms in (("adalora", 0.80, 12.0), ("lora", 0.78, 10.0), ("tsqlora", 0.83, 9.0),
                             ("quality@0.3", 0.82, 9.0), ("random@0.3", 0.79, 9.0)):
        runs.append(_run(method, 1e-2, 0, val=0.1, test=0.0))  # loses on validation: never reported
        for s in seeds:
            runs.append(_run(method, 1e-3, s, val=0.9, test=base + 0.01 * s, step_ms=ms))
    summary = cm.summarize(runs, lrs, seeds, "cmd")
    rows = summary["tasks"]["t"]["methods"]
    assert rows["tsqlora"]["lr"] == 1e-3 and rows["tsqlora"]["seeds"] == [0, 1, 2]
    assert rows["tsqlora"]["test_accuracy"][0] == pytest.approx(0.84)
    assert rows["tsqlora"]["test_accuracy"][1] == pytest.approx(0.01)
    assert rows["tsqlora"]["vs_adalora"]["mean"] == pytest.approx(0.03)
    assert rows["tsqlora"]["vs_adalora"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert rows["tsqlora"]["val_accuracy_by_lr"] == {"0.001": 0.9, "0.01": 0.1}
    goals = {g["goal"].split(" (")[0]: g["met"] for g in summary["tasks"]["t"]["goals"]}
    assert goals["TsqLoRA ≥ PEFT AdaLoRA ≥ PEFT LoRA"] is True
    assert goals["quality 30% beats random 30% by more than the seed spread"] is True  # +3 > 1 point
    assert goals["quality 30% within 0.5 points of TsqLoRA on all data"] is False  # -1 point
    assert goals["TsqLoRA step time ≤ PEFT LoRA's"] is True
    assert summary["tasks"]["t"]["rank_history_run"] == "t|tsqlora|lr=0.001|seed=0"
    md = cm.render_markdown(summary, "title")
    assert "| TsqLoRA, all data | 0.001 | 84.00 ± 1.00 | 3.00 ± 0.00 |" in md


def test_goals_say_what_qualifies_their_figures(cm):
    # Each read as plain success: equal rank passed for equal parameters, a quality arm that drew
    # the random arm's rows for quality selection, a 30% arm that also warmed up on the whole pool
    # for 30% of the data, and step times of runs that shared the machine for a timing.
    lrs, seeds = (1e-3,), (0, 1)
    runs = []
    for method, params, warm, jobs in (("adalora", 90, 0, 1), ("lora", 80, 0, 1), ("tsqlora", 120, 0, 4),
                                       ("quality@0.3", 110, 30, 4), ("random@0.3", 110, 30, 4)):
        for s in seeds:
            r = _run(method, 1e-3, s, val=0.9, test=0.8 + 0.01 * s)
            r.update(params_active=params, warmup_examples=warm, jobs=jobs,
                     train_examples=15 if "@" in method else 50)
            runs.append(r)
    goals = {g["goal"].split(" (")[0]: g for g in cm.summarize(runs, lrs, seeds, "cmd")["tasks"]["t"]["goals"]}
    order = goals["TsqLoRA ≥ PEFT AdaLoRA ≥ PEFT LoRA"]
    assert "at equal total rank" in order["goal"] and "parameters at the end 120 / 90 / 80" in order["measured"]
    assert "trained on the same rows at every seed" in goals["quality 30% beats random 30% by more than the seed spread"]["measured"]
    within = goals["quality 30% within 0.5 points of TsqLoRA on all data"]["measured"]
    # 1 - (1 - 15/50)(1 - 1/50)^30 = 0.616
    assert "30 warm-up draws from the whole pool the arm saw about 62% of the pool's rows" in within
    step = goals["TsqLoRA step time ≤ PEFT LoRA's"]
    assert step["met"] is None and "not comparable: 4 runs shared the machine" in step["measured"]
    assert "| n/a |" in cm.render_markdown(cm.summarize(runs, lrs, seeds, "cmd"), "title")


def test_a_parameter_budget_run_gets_a_goal_row_of_its_own(cm):
    lrs, seeds = (1e-3,), (0, 1)
    runs = []
    for method, params, base in (("adalora", 90, 0.80), ("lora", 80, 0.78), ("tsqlora", 120, 0.83),
                                 ("tsqlora_params", 81, 0.79)):
        for s in seeds:
            r = _run(method, 1e-3, s, val=0.9, test=base + 0.01 * s)
            r.update(params_active=params)
            runs.append(r)
    summary = cm.summarize(runs, lrs, seeds, "cmd")
    goals = {g["goal"].split(" (")[0]: g for g in summary["tasks"]["t"]["goals"]}
    assert goals["TsqLoRA ≥ PEFT AdaLoRA ≥ PEFT LoRA"]["met"] is True  # at equal rank
    at_params = goals["TsqLoRA with a parameter budget ≥ PEFT AdaLoRA ≥ PEFT LoRA"]
    assert at_params["met"] is False  # 0.795 < 0.805
    assert "parameters at the end 81 / 90 / 80" in at_params["measured"]
    md = cm.render_markdown(summary, "title")
    assert "'TsqLoRA, parameter budget' counts its budget in parameters" in md
    assert "| TsqLoRA, parameter budget | 0.001 | 79.50 ± 0.71 |" in md


def test_summary_keeps_to_the_requested_grid_and_marks_partial_rows(cm):
    """A partial grid (e.g. cut by gpu_experiments.sh's time limit) must not pass off one seed or
    a partly tried grid as the requested 3-seed result, nor mix in other calls' rates or seeds."""
    lrs, seeds = (1e-3, 1e-2), (0, 1, 2)
    runs = []
    for method, base in (("adalora", 0.80), ("lora", 0.78)):
        runs.append(_run(method, 1e-2, 0, val=0.1, test=0.0))
        runs += [_run(method, 1e-3, s, val=0.9, test=base) for s in seeds]
    runs.append(_run("lora", 1e-3, 7, val=0.9, test=0.0))      # a seed not requested
    runs.append(_run("lora", 0.1, 0, val=0.99, test=0.99))     # a rate not requested
    runs.append(_run("tsqlora", 1e-3, 0, val=0.9, test=0.95))  # seed 0 of one rate only
    summary = cm.summarize(runs, lrs, seeds, "cmd")
    rows = summary["tasks"]["t"]["methods"]
    assert rows["lora"]["lr"] == 1e-3 and rows["lora"]["seeds"] == [0, 1, 2]
    assert rows["lora"]["complete"] and rows["lora"]["test_accuracy"][0] == pytest.approx(0.78)
    ts = rows["tsqlora"]
    assert not ts["complete"] and ts["missing_lrs"] == [1e-2] and ts["missing_seeds"] == [1, 2]
    assert ts["seeds"] == [0]
    assert not any("TsqLoRA" in g["goal"] for g in summary["tasks"]["t"]["goals"])
    md = cm.render_markdown(summary, "title")
    assert "| TsqLoRA, all data *partial* | 0.001 | 95.00 ± 0.00 |" in md
    assert md.count(" | 0, 1, 2 |") == 2 and " | 0 |" in md
    assert "- TsqLoRA, all data: rate picked without 0.01 (not finished on seed 0); seed(s) 1, 2 " \
        "not finished at 0.001" in md


def test_store_is_rewritten_atomically_and_skips_finished(cm, tmp_path):
    path = tmp_path / "runs.jsonl"
    store = cm.RunStore(path)
    store.add(_run("lora", 1e-3, 0, 0.8, 0.7))
    again = cm.RunStore(path)
    assert again.done("t|lora|lr=0.001|seed=0", "s") is not None
    assert again.done("t|lora|lr=0.001|seed=0", "other-settings") is None
    assert not list(tmp_path.glob("*.tmp"))
    path.write_text(path.read_text() + "{torn\n")
    with pytest.raises(ValueError, match="line 2 of .*runs.jsonl"):
        cm.RunStore(path)


def test_schedule_fits_every_run_length(cm):
    for t in (1, 2, 7, 45, 323):
        s = cm.schedule(t)
        assert s["t_init"] + s["t_final"] < t and s["delta_t"] >= 1
    assert json.dumps(cm.schedule(323)) == json.dumps({"t_init": 48, "t_final": 48, "delta_t": 10})


def test_committed_runs_keep_matching_the_settings(cm):
    """A rerun resumes from the committed runs file only while their settings ids still match:
    a change to the MiniLM settings (or to how ids are made) must not orphan them silently."""
    path = REPO / "python/experiments/results/compare_methods-runs.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ids = {cm.settings_id(s, t) for t, s in cm.task_settings("minilm", quick=False).items()}
    assert runs and {r["settings_id"] for r in runs} <= ids
    decoder = cm.task_settings("smollm2", quick=False)["rotten_tomatoes"]
    assert cm.settings_id(decoder, "rotten_tomatoes") not in ids


def test_decoder_runs_whole_split_on_a_gpu_in_files_of_its_own(cm):
    """SmolLM2 on CUDA trains on the full split, and its runs and tables never mix with the CPU
    subset's (other settings ids, other file names)."""
    cpu = cm.task_settings("smollm2", quick=False, device="cpu")["rotten_tomatoes"]
    gpu = cm.task_settings("smollm2", quick=False, device="cuda")["rotten_tomatoes"]
    assert cpu.limit_train > 0 and (gpu.limit_train, gpu.limit_val, gpu.limit_test) == (0, 0, 0)
    assert cm.settings_id(cpu, "rotten_tomatoes") != cm.settings_id(gpu, "rotten_tomatoes")
    assert cm.task_settings("minilm", quick=False, device="cuda") == cm.task_settings("minilm", False)

    def name(**over):
        opts = dict(model="minilm", device="cpu", quick=False, tag="") | over
        return cm.results_name(types.SimpleNamespace(**opts))

    assert name() == name(device="cuda") == "compare_methods"
    assert name(model="smollm2") == "compare_methods-smollm2"
    assert name(model="smollm2", device="cuda") == "compare_methods-smollm2-cuda"
    assert name(model="smollm2", device="cuda", quick=True) == "compare_methods-smollm2-quick-cuda"
    assert name(tag="cpu") == "compare_methods-cpu"


def test_tagged_partial_grid_names_its_files_and_its_command(cm, tmp_path):
    """A partial grid kept apart with --tag (e.g. CPU runs beside the GPU table) writes its own
    files, and its table's command repeats every option needed to reproduce it."""
    settings = cm.task_settings("minilm", quick=False)["rotten_tomatoes"]
    store = cm.RunStore(tmp_path / "compare_methods-cpu-rt-runs.jsonl")
    for method in ("quality@0.3", "random@0.3"):
        for seed in (0, 1):
            run = _run(method, 1e-3, seed, val=0.8, test=0.7 + 0.01 * seed)
            run.update(task="rotten_tomatoes", key=cm.run_key("rotten_tomatoes", method, 1e-3, seed),
                       settings_id=cm.settings_id(settings, "rotten_tomatoes"))
            store.add(run)
    # A quality run made with another quality_preference is another run, never summarised here.
    for seed in (0, 1):
        store.add({**run, "method": "quality@0.3", "seed": seed, "test": {"accuracy": 0.1},
                   "key": cm.run_key("rotten_tomatoes", "quality@0.3", 1e-3, seed, "high")})
    args = ["--out", str(tmp_path), "--tasks", "rotten_tomatoes", "--methods", "quality@0.3",
            "random@0.3", "--seeds", "0", "1", "--lrs", "1e-3", "--tag", "cpu-rt"]
    assert cm.main(args + ["--summarize"]) == 0
    md = (tmp_path / "compare_methods-cpu-rt.md").read_text()
    assert ("`python python/experiments/compare_methods.py --device cpu --jobs 1 --tasks rotten_tomatoes "
            "--methods quality@0.3 random@0.3 --seeds 0 1 --lrs 0.001 --tag cpu-rt`") in md
    assert md.startswith("### TsqLoRA against PEFT LoRA and AdaLoRA (bundled MiniLM) — partial grid 'cpu-rt' "
                         "(cpu): TsqLoRA, quality-selected 30%, TsqLoRA, random 30%; quality arms select "
                         "with quality_preference 'uniform'\n")
    summary = json.loads((tmp_path / "compare_methods-cpu-rt.json").read_text())
    assert summary["seeds"] == [0, 1]
    quality = summary["tasks"]["rotten_tomatoes"]["methods"]["quality@0.3"]
    assert quality["test_accuracy_per_seed"] == [0.7, 0.71]  # not the other preference's 0.1
    # ... but in its own table, which says so and how to reproduce it.
    assert cm.main(args + ["--summarize", "--quality-preference", "high"]) == 0
    md = (tmp_path / "compare_methods-cpu-rt-high.md").read_text()
    assert "--tag cpu-rt --quality-preference high`" in md and "quality_preference 'high'" in md
    high = json.loads((tmp_path / "compare_methods-cpu-rt-high.json").read_text())
    assert high["tasks"]["rotten_tomatoes"]["methods"]["quality@0.3"]["test_accuracy_per_seed"] == [0.1, 0.1]
    with pytest.raises(SystemExit):
        cm.main(["--summarize", "--tag", "../elsewhere"])


def test_quality_and_random_arms_share_a_worker_call(cm):
    """The arms of one (task, lr, seed) share the warm-up and scoring pass; nothing else does."""
    settings = cm.task_settings("minilm", quick=True)

    def spec(task, method, lr, seed):
        return {"key": cm.run_key(task, method, lr, seed), "task": task, "method": method, "lr": lr,
                "seed": seed, "settings_id": cm.settings_id(settings[task], task)}
    specs = [spec("rotten_tomatoes", m, lr, seed) for m in ("quality@0.1", "random@0.5", "tsqlora",
                                                            "no_realloc", "lora")
             for lr in (1e-3, 3e-3) for seed in (0, 1)]
    specs.append(spec("bbc_news", "random@0.1", 1e-3, 0))
    calls = cm.worker_calls(specs, settings)
    assert sorted(len(c) for c in calls) == [1] * 13 + [2] * 4
    for call in calls:
        assert len({(s["task"], s["lr"], s["seed"]) for s in call}) == 1
        if len(call) == 2:
            assert {s["method"] for s in call} == {"quality@0.1", "random@0.5"}
    assert sorted(s["key"] for c in calls for s in c) == sorted(s["key"] for s in specs)


def test_the_caption_says_whether_a_random_arm_s_wall_time_counts_the_scoring_pass(cm):
    def caption(scoring_recorded):
        runs = []
        for method in ("quality@0.3", "random@0.3"):
            for s in (0, 1):
                r = _run(method, 1e-3, s, val=0.9, test=0.8)
                if scoring_recorded:
                    r["scoring_s"] = 2.0
                runs.append(r)
        return cm.render_markdown(cm.summarize(runs, (1e-3,), (0, 1), "cmd"), "title")

    # runs recorded before the random arm left the scoring pass out of its wall time
    assert "a random arm's too: it shares the quality arms' scoring pass" in caption(False)
    assert "a random arm's without the scoring pass it does not need" in caption(True)
