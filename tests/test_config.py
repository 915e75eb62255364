"""TsqLoRAConfig: help on every field, JSON round trip, impossible combinations fail with a reason."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tsqlora_ext.config import TsqLoRAConfig


def test_every_field_has_help():
    for f in dataclasses.fields(TsqLoRAConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help"


def test_json_round_trip(tmp_path):
    cfg = TsqLoRAConfig(target_modules=["query", "value"], r_init=6, target_r=4.5, r_max=10,
                        quality_weights=(0.5, 0.5, 0.0), total_steps=100, t_init=10, t_final=20)
    assert TsqLoRAConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert TsqLoRAConfig.load(tmp_path / "c.json") == cfg


def test_name_lists_given_as_sets_or_tuples_round_trip_through_json():
    # PEFT's LoraConfig keeps target_modules as a set: JSON could not write one (save_adapter
    # failed after training), and a tuple came back as a list, so the allocator refused the
    # re-read config as another one.
    cfg = TsqLoRAConfig(target_modules={"value", "query"}, exclude_modules=("key",),
                        modules_to_save=("classifier",))
    assert (cfg.target_modules, cfg.exclude_modules, cfg.modules_to_save) == (
        ["query", "value"], ["key"], ["classifier"])
    assert TsqLoRAConfig.from_json(cfg.to_json()) == cfg


def test_an_infinite_setting_survives_strict_json(tmp_path):
    # mislabel_max_spread = inf (the rule off) became null in run.json, and --resume then refused
    # the run's own settings.
    from tsqlora_ext.report import write_json
    cfg = TsqLoRAConfig(mislabel_max_spread=math.inf)
    write_json(cfg.to_dict(), tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["mislabel_max_spread"] == "inf"
    assert TsqLoRAConfig.from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg


def test_configs_of_earlier_versions_with_rescore_every_off_still_load():
    d = TsqLoRAConfig().to_dict()
    assert "rescore_every" not in d
    assert TsqLoRAConfig.from_dict({**d, "rescore_every": 0}) == TsqLoRAConfig()
    with pytest.raises(ValueError, match="old.json: rescore_every is not supported"):
        TsqLoRAConfig.from_dict({**d, "rescore_every": 50}, source="old.json")


@pytest.mark.parametrize("changes, message", [
    (dict(r_init=30, r_max=24), "r_init"),
    (dict(r_min=5, r_init=4), "r_init"),
    (dict(target_r=30), "target_r"),
    (dict(total_steps=10, t_init=5, t_final=5), "no budget phase"),
    (dict(data_fraction=0.0), "data_fraction"),
    (dict(data_fraction=1.5), "data_fraction"),
    (dict(quality_weights=(0, 0, 0)), "quality_weights"),
    (dict(quality_preference="hard"), "quality_preference"),
    (dict(temperature=0), "temperature"),
    (dict(init="svd"), "init"),
    (dict(delta_t=0), "delta_t"),
    (dict(beta1=1.0), "beta1"),
    (dict(lora_alpha=float("nan")), r"lora_alpha must be a finite number, got nan"),
    (dict(lora_alpha=float("inf")), r"lora_alpha must be a finite number, got inf"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(modules_to_save="classifier"), "modules_to_save must be None, a list of module names"),
    (dict(target_modules=["query", 3]), "target_modules must be None, a list of module names or one regex"),
    (dict(exclude_modules=[""]), "exclude_modules must be"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(orth_reg_weight=float("nan")), "orth_reg_weight"),
    (dict(orth_reg_weight=float("inf")), "orth_reg_weight"),
    (dict(quality_weights=(float("nan"), 0.5, 0.0)), "quality_weights"),
    (dict(quality_weights=(float("inf"), 0.5, 0.0)), "quality_weights"),
])
def test_impossible_combinations_fail_with_the_reason(changes, message):
    with pytest.raises(ValueError, match=message):
        TsqLoRAConfig(**changes)


def test_unknown_and_malformed_json_are_named(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text('{"r_init": 4, "rank": 3}')
    with pytest.raises(ValueError, match=r"cfg\.json: unknown TsqLoRAConfig field\(s\) \['rank'\]"):
        TsqLoRAConfig.load(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match=r"cfg\.json: not valid JSON"):
        TsqLoRAConfig.load(p)


@pytest.mark.parametrize("text,message", [
    ('{"r_init": 12.5}', r"TsqLoRAConfig\.r_init must be int, got 12\.5"),
    ('{"lora_alpha": "16"}', r"TsqLoRAConfig\.lora_alpha must be float, got '16'"),
    ('{"stratify": 1}', r"TsqLoRAConfig\.stratify must be bool, got 1"),
    ('{"quality_weights": [1, 2]}', r"TsqLoRAConfig\.quality_weights must be tuple\[float, float, float\]"),
    ('{"target_modules": ["query", 3]}', r"TsqLoRAConfig\.target_modules must be list\[str\] \| str \| None"),
    ('[1, 2]', r"expected a JSON object, got list"),
])
def test_values_of_the_wrong_type_are_named(tmp_path, text, message):
    # They failed in a comparison deep inside ('<=' not supported ...) or passed (12.5 for an int).
    p = tmp_path / "cfg.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=r"cfg\.json: " + message):
        TsqLoRAConfig.load(p)


def test_train_args_refuse_wrong_types_and_non_finite_numbers():
    from tsqlora_ext.train import TrainArgs

    with pytest.raises(ValueError, match=r"run\.json: TrainArgs\.max_steps must be int \| None, got '3'"):
        TrainArgs.from_dict({"max_steps": "3"}, "run.json")
    for name in ("lr", "epochs"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
                TrainArgs(**{name: value})
    assert TrainArgs.from_dict({"lr": 1, "max_steps": None}, "x").lr == 1  # an int is a float


def test_budget():
    assert TsqLoRAConfig(r_init=12, target_r=8).budget([769] * 36) == (432, 288)
    # a parameter budget: the parameters of r_init (target_r) components in every layer
    params = TsqLoRAConfig(r_init=12, target_r=8, budget_unit="params")
    assert params.budget([769, 1921]) == (12 * 2690, 8 * 2690)
    with pytest.raises(ValueError, match="budget_unit must be one of"):
        TsqLoRAConfig(budget_unit="parameters")
