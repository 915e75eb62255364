"""TsqLoRAConfig: every knob of the method in one dataclass, PEFT-style.

Field names follow PEFT's LoRA/AdaLoRA vocabulary where the concept is the same (target_modules,
lora_alpha, lora_dropout, modules_to_save, tinit/tfinal/deltaT -> t_init/t_final/delta_t, beta1,
beta2, orth_reg_weight). Impossible combinations fail on construction with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .mislabel import check_guard_settings
from .files import atomic_write


# The fields tsqlora_ext.wrap builds the adapted layers from (seed aside: it also orders the
# data): fixed once a model is wrapped.
LAYER_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "r_init", "r_max",
                "lora_alpha", "lora_dropout", "init")


def check_layer_fields(model, config, who: str) -> None:
    """Refuse a config that differs from the one ``model`` was wrapped with in a LAYER_FIELDS
    field: the layers keep what wrap gave them (B_0 = r_init x layers and the scaling
    lora_alpha / r_init would not match them)."""
    wrapped = getattr(model, "tsqlora_config", None)
    changed = [f"{k} {getattr(wrapped, k)!r} there, {getattr(config, k)!r} here"
               for k in LAYER_FIELDS if wrapped is not None and getattr(wrapped, k) != getattr(config, k)]
    if changed:
        raise ValueError(f"{who}: the config differs from the one the model was wrapped with "
                         f"(tsqlora_ext.wrap) in fields that shape its layers: {'; '.join(changed)}. "
                         "The layers keep what wrap gave them (B_0 = r_init x layers and the "
                         "scaling lora_alpha / r_init would not match them): change only other "
                         "fields, e.g. model.tsqlora_config.replace(...)")


def read_text(path: str | os.PathLike) -> str:
    """A settings file's text; one that is not UTF-8 is an error naming it and the byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# α1..3 of Q = α1 z(G) + α2 z(D) + α3 z(C); score_pool's default too (see quality_weights' help).
DEFAULT_QUALITY_WEIGHTS = (0.5, 0.5, 0.0)

# The fields that name modules: None, a list of names, or (not modules_to_save) one regex.
NAME_LIST_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")

# The choices of the string fields, checked here and by the functions that take them directly.
MODES = ("full", "head")
PREFERENCES = ("high", "moderate", "uniform")
LOOKAHEADS = ("exact", "first_order")
BUDGET_UNITS = ("rank", "params")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as JSON or a flag gives it) fits a field annotated ``hint``: bool is not
    a number, an int is a float, a list stands for a tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_conforms, value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    return True  # other annotations are left to the class's own checks


def check_integers(obj, names, bad) -> None:
    """Call ``bad(message)`` for the first of the fields ``names`` of dataclass ``obj`` that does
    not hold an integer (None allowed): 2.5 for a batch size passes every comparison and fails deep
    inside, True is no count. numpy integers become int (they would not write to JSON)."""
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            bad(f"{name} must be an integer, got {value!r}")
        else:
            setattr(obj, name, int(value))


def native_seed(seed: int, where: str, draws: int = 1) -> int:
    """``seed`` as the native RNGs take it, 64 bits (a negative one as its two's complement);
    outside the signed 64-bit range two seeds would draw alike (2**64 as 0), so it is refused,
    naming ``where``. ``draws``: how many consecutive seeds from it the caller uses."""
    if not -2**63 <= seed <= 2**63 - draws:
        raise ValueError(f"{where}: seed must be a signed 64-bit integer, got {seed}")
    return seed & (2**64 - 1)


_INFINITIES = {math.inf: "inf", -math.inf: "-inf"}


def config_value(v: Any) -> Any:
    """A field's value as to_dict writes it: an infinite float as "inf" / "-inf"."""
    return _INFINITIES[v] if isinstance(v, float) and math.isinf(v) else v


def dataclass_from_dict(cls, d: dict[str, Any], source: str):
    """cls(**d), after check_fields; "inf" / "-inf" for a float field (as to_dict writes an
    infinite value) is that float."""
    if isinstance(d, dict):
        hints = typing.get_type_hints(cls)
        d = {k: (float(v) if v in ("inf", "-inf") and _conforms(0.5, hints.get(k)) else v)
             for k, v in d.items()}
    check_fields(cls, d, source)
    return cls(**d)


def check_fields(cls, d: dict[str, Any], source: str) -> None:
    """Refuse unknown keys and values of the wrong type for dataclass ``cls`` with a message that
    names the source and the field (a JSON file's "abc" for a number failed in a comparison deep
    inside, and 12.5 for an int passed)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: {cls.__name__} settings must be a JSON object of fields, got "
                         f"{type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        if not _conforms(value, hints[name]):
            hint = hints[name]
            raise ValueError(f"{source}: {cls.__name__}.{name} must be "
                             f"{hint.__name__ if isinstance(hint, type) else hint}, got {value!r}")


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict, tuple)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TsqLoRAConfig:
    # ---- which layers -------------------------------------------------------------------------
    target_modules: list[str] | str | None = _f(
        None, "Linear layers to adapt: a list of module-name suffixes or one regex (full match). "
        "None picks the family default (BERT/RoBERTa/DeBERTa-v2/MPNet, GPT-2, LLaMA/Mistral/Qwen2).")
    exclude_modules: list[str] | str | None = _f(
        None, "Module-name suffixes or a regex to leave out even when target_modules matches them.")
    modules_to_save: list[str] | None = _f(
        None, "Modules trained in full beside the adapters (the task head). None: the head of a "
        "classification or question-answering model ('classifier' / 'score' / 'qa_outputs' / "
        "'classification_head' / 'pre_classifier', and DeBERTa-v2's 'pooler').")
    # ---- ranks --------------------------------------------------------------------------------
    r_init: int = _f(12, "Initial average rank; the starting budget is B_0 = r_init * n_layers and "
                     "the fixed scaling is lora_alpha / r_init.")
    target_r: float = _f(8, "Final average rank; the final budget is b_T = target_r * n_layers.")
    budget_unit: str = _f(
        "rank", "What the budget counts. 'rank': components, AdaLoRA's definition (B_0 = r_init * "
        "n_layers, b_T = target_r * n_layers); rank moved to a wide layer then costs more parameters "
        "than it freed. 'params': adapter parameters, a component of layer l costing in_l + out_l + 1 "
        "(B_0 = r_init * sum_l cost_l, b_T = target_r * sum_l cost_l: the parameters of target_r "
        "components in every layer, i.e. of LoRA at rank target_r plus one E entry per component); "
        "each reallocation keeps the largest number of best components whose parameters fit.")
    r_min: int = _f(0, "Smallest rank any layer may be reallocated to (0 lets a layer be pruned).")
    r_max: int = _f(24, "Components allocated per layer (never re-created); no layer grows beyond it.")
    lora_alpha: float = _f(16.0, "Scaling numerator: output += lora_alpha / r_init * x A^T diag(E) B^T.")
    lora_dropout: float = _f(0.0, "Dropout on the adapter input.")
    init: str = _f("lora", "'lora': A Kaiming-uniform, E=1, B=0 (learns like LoRA from the start); "
                   "'adalora': E=0, A,B ~ N(0, 0.02) as PEFT AdaLoRA.")
    # ---- budget schedule (optimizer steps, never micro-batches) -------------------------------
    t_init: int = _f(0, "Warm-up steps at budget B_0 before any reallocation (covers init='lora', "
                     "where every score is 0 until B moves).")
    t_final: int = _f(0, "Final steps with ranks frozen at b_T.")
    delta_t: int = _f(10, "Reallocate every delta_t optimizer steps.")
    total_steps: int | None = _f(None, "Total optimizer steps T; the trainer fills it in from the data.")
    beta1: float = _f(0.85, "EMA factor of the sensitivity I = |p * grad p|.")
    beta2: float = _f(0.85, "EMA factor of the uncertainty |I - EMA(I)|.")
    orth_reg_weight: float = _f(0.0, "gamma of the orthogonality regularizer over active components "
                                "(0 turns it off).")
    allow_growth: bool = _f(True, "Inactive components keep their score so layers can grow back "
                            "(ElaLoRA-style); False only ever prunes.")
    sensitivity_init: bool = _f(True, "Share B_0 among layers in proportion to calibrated layer "
                                "sensitivity; False gives every layer r_init.")
    dynamic: bool = _f(True, "Reallocate rank during training; False keeps the initial ranks.")
    calibration_batches: int = _f(8, "Batches K used to measure layer sensitivity before training.")
    # ---- data quality and selection ------------------------------------------------------------
    data_fraction: float = _f(1.0, "Fraction f of the (gated) pool kept for training, in (0, 1]; "
                              "examples the wrong-label guard drops are replaced by other ones.")
    quality_weights: tuple[float, float, float] = _f(
        DEFAULT_QUALITY_WEIGHTS, "alpha1..3 of Q = a1 z(G) + a2 z(D) + a3 z(C). C defaults to 0: measured on "
        "Rotten Tomatoes with 20% flipped labels it carried no signal (AUC 0.55 with the pool mean, "
        "0.49 with a held-out clean gradient; python/experiments/quality_signals.py), and a 0 weight "
        "skips computing it.")
    quality_preference: str = _f(
        "uniform", "Which examples the selection prefers among those the gate and the wrong-label "
        "guard keep. 'uniform': a uniform sample, Q unused, so the scoring pass serves the guard; "
        "where the guard abstains (clean data) it is exactly the random sample of the same seed. "
        "'moderate': p ~ exp(-|Q - median Q| / tau), typical Q first (Moderate Coreset). 'high': "
        "p ~ exp(Q / tau), the paper's largest gradients and look-ahead gains first; Q rises with "
        "the loss, so it prefers the wrong labels (45.5% flipped kept of a pool with 20%). "
        "'uniform' is the default because no Q preference beat a random sample at full size "
        "(MiniLM, 30%, 3 seeds, CPU): 'moderate' lost 1.2 and 0.8 points on clean Rotten Tomatoes "
        "and BBC News, and on BBC News with 20% flipped labels gained +0.9 where 'uniform' gained "
        "+0.8, both keeping under 1% flipped (python/experiments/compare_methods.py, "
        "noisy_labels.py; README 'Quality selection').")
    temperature: float = _f(1.0, "tau of the Gumbel-top-k selection p ~ exp(Q / tau): small -> top-k, "
                            "large -> uniform.")
    stratify: bool = _f(True, "Keep each label's share when selecting.")
    score_mode: str = _f("head", "'full': all trainable parameters; 'head': the task head and the "
                         "last adapted block only (close to forward-only cost).")
    lookahead: str = _f("first_order", "D_i: 'exact' one-step look-ahead or 'first_order' eta*G_i^2.")
    score_warmup: int = _f(120, "Optimizer steps on a random sample before scoring; the adapter "
                           "carries on into training (a layer given fewer than r_init components "
                           "by the initial allocation keeps its strongest). Measured (MiniLM, Rotten Tomatoes, 20% labels "
                           "flipped, lr 1e-3, batch 32; python/experiments/noisy_labels.py): after 40 "
                           "steps the guard could not act and the quality-selected 30% held 32.7% "
                           "flipped (pool 20%); after 120 steps 12.9%.")
    mislabel_guard: bool = _f(True, "Drop examples whose post-warm-up loss marks them as likely "
                              "mislabeled before sampling (reason 'likely_mislabeled').")
    mislabel_threshold: float = _f(0.5, "Drop when P(wrong label) exceeds this.")
    mislabel_max_spread: float = _f(
        0.55, "The guard flags nothing when the high-loss mixture component's std / mean exceeds "
        "this: a long tail of the model's own errors (clean data: 0.64-1.03 measured) rather than a "
        "cluster of wrong labels (20% flipped: 0.39-0.45). inf turns the rule off.")
    seed: int = _f(0, "Seed of selection, initialisation and data order.")

    def __post_init__(self) -> None:
        if isinstance(self.quality_weights, list):
            self.quality_weights = tuple(self.quality_weights)
        # Name lists are stored as lists, the form JSON gives back, so a config equals itself
        # re-read from JSON (RankAllocator compares them with the wrapped model's); a set, as PEFT's
        # LoraConfig stores target_modules, is sorted so that its order is fixed.
        for name in NAME_LIST_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (set, frozenset)):
                setattr(self, name, sorted(value))
            elif isinstance(value, tuple):
                setattr(self, name, list(value))
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"TsqLoRAConfig: {msg}")

        for name in NAME_LIST_FIELDS:
            value = getattr(self, name)
            if value is None or (isinstance(value, str) and name != "modules_to_save"):
                continue
            if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                one = "" if name == "modules_to_save" else " or one regex string"
                bad(f"{name} must be None, a list of module names{one}, got {value!r}")
        check_integers(self, ("r_init", "r_min", "r_max", "t_init", "t_final", "delta_t",
                              "total_steps", "calibration_batches", "score_warmup", "seed"), bad)
        # NaN passes every comparison below, and inf makes the adapter or the selection NaN.
        for name in ("lora_alpha", "orth_reg_weight", "temperature"):
            if not math.isfinite(getattr(self, name)):
                bad(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.r_max < 1:
            bad(f"r_max must be >= 1, got {self.r_max}")
        if not 0 <= self.r_min <= self.r_max:
            bad(f"r_min must be in [0, r_max={self.r_max}], got {self.r_min}")
        if not 1 <= self.r_init <= self.r_max:
            bad(f"r_init must be in [1, r_max={self.r_max}], got {self.r_init}")
        if not self.r_min <= self.target_r <= self.r_max:
            bad(f"target_r={self.target_r} must lie in [r_min={self.r_min}, r_max={self.r_max}]")
        if self.r_init < self.r_min:
            bad(f"r_init={self.r_init} is below r_min={self.r_min}")
        if self.lora_alpha <= 0:
            bad(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init not in ("lora", "adalora"):
            bad(f"init must be 'lora' or 'adalora', got {self.init!r}")
        for name in ("t_init", "t_final", "calibration_batches", "score_warmup"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        native_seed(self.seed, "TsqLoRAConfig", draws=2)  # (training draws seed and seed + 1)
        if self.delta_t < 1:
            bad(f"delta_t must be >= 1, got {self.delta_t}")
        if self.total_steps is not None:
            if self.total_steps < 1:
                bad(f"total_steps must be >= 1, got {self.total_steps}")
            if self.dynamic and self.t_init + self.t_final >= self.total_steps:
                bad(f"t_init + t_final = {self.t_init + self.t_final} leaves no budget phase in "
                    f"total_steps = {self.total_steps}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            bad(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0.0 < self.data_fraction <= 1.0:
            bad(f"data_fraction must be in (0, 1], got {self.data_fraction}")
        w = self.quality_weights
        if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) == 0:
            bad(f"quality_weights must be 3 finite non-negative numbers, not all 0, got {w}")
        if self.temperature <= 0:
            bad(f"temperature must be > 0, got {self.temperature}")
        if self.quality_preference not in PREFERENCES:
            bad(f"quality_preference must be one of {PREFERENCES}, got {self.quality_preference!r}")
        if self.score_mode not in MODES:
            bad(f"score_mode must be one of {MODES}, got {self.score_mode!r}")
        if self.budget_unit not in BUDGET_UNITS:
            bad(f"budget_unit must be one of {BUDGET_UNITS}, got {self.budget_unit!r}")
        if self.lookahead not in LOOKAHEADS:
            bad(f"lookahead must be one of {LOOKAHEADS}, got {self.lookahead!r}")
        check_guard_settings(self.mislabel_threshold, self.mislabel_max_spread, "TsqLoRAConfig",
                             prefix="mislabel_")

    # ---- JSON round trip ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; an infinite one (mislabel_max_spread = inf: the rule off) as
        "inf" / "-inf", which strict JSON writers would otherwise turn into null."""
        d = dataclasses.asdict(self)
        d["quality_weights"] = list(self.quality_weights)
        return {k: config_value(v) for k, v in d.items()}

    # Fields that configs of earlier versions hold, with the one value that meant "off". Re-scoring
    # during training (rescore_every) was accepted but never done, so the field is gone; a config
    # saved with it off still loads, one that asked for it is refused rather than ignored.
    _RETIRED = {"rescore_every": 0}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TsqLoRAConfig:
        d = dict(d)
        for name, off in cls._RETIRED.items():
            if name in d and d.pop(name) != off:
                raise ValueError(f"{source}: {name} is not supported (re-scoring during training "
                                 f"was never implemented); remove it or set it to {off}")
        return dataclass_from_dict(cls, d, source)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> TsqLoRAConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(self.to_json() + "\n"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TsqLoRAConfig:
        return cls.from_json(read_text(path), source=str(path))

    def replace(self, **changes) -> TsqLoRAConfig:
        return dataclasses.replace(self, **changes)

    def budget(self, costs: list[int]) -> tuple[int, int]:
        """(B_0, b_T) over adapted layers whose components cost ``costs`` parameters each
        (in + out + 1): total rank, or total parameters with budget_unit='params'."""
        units = costs if self.budget_unit == "params" else [1] * len(costs)
        return self.r_init * sum(units), int(round(self.target_r * sum(units)))
