"""wrap / unwrap: put VarRankLoRALinear adapters into a Hugging Face transformers model and take them out.

``wrap(model, config)`` patches the model in place, PEFT-style, and returns it:
- every target linear layer becomes a ``VarRankLoRALinear`` around the original layer (kept as
  ``base_layer``); GPT-2's ``Conv1D`` stores its weight as [in, out], so it is converted once into an
  ``nn.Linear`` holding the transposed weight (the original is dropped, no second copy is kept) and
  converted back by ``unwrap``;
- the whole base is frozen; adapter parameters and the task head (``modules_to_save``) train;
- the config is stored on the model (``model.tsqlora_config``) for ``save_adapter``/``export_peft``;
- a one-line trainable-parameter summary is printed (``trainable_summary(model)`` returns it).

Target matching follows PEFT's LoRA: ``target_modules`` is a list of module-name suffixes (a name
matches when it equals the suffix or ends with ``"." + suffix``) or one regex that must match the
whole name; ``exclude_modules`` takes the same forms. Modules inside ``modules_to_save`` are never
adapted. Targets an adapter would break are refused with their names: a layer whose weight is tied to
another module's (an lm_head sharing the input embeddings) and nn.MultiheadAttention's out_proj.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import TsqLoRAConfig
from .layers import VarRankLoRALinear


def _conv1d_type() -> type | None:
    """transformers' Conv1D class when transformers is loaded. A model holding a Conv1D has loaded
    it already, so looking in sys.modules spares `import tsqlora_ext` the cost of importing
    transformers (seconds) and lets plain torch models be wrapped without it."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


# Default targets per ``model.config.model_type``: every linear layer of the transformer blocks,
# never embeddings, poolers or heads (DESIGN: all 36 encoder linears of MiniLM-L6 are adapted).
_ENCODER_BERT = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_DECODER_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": _ENCODER_BERT,
    "roberta": _ENCODER_BERT,
    "xlm-roberta": _ENCODER_BERT,
    "camembert": _ENCODER_BERT,
    "electra": _ENCODER_BERT,
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense"],
    "mpnet": ["attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": _DECODER_LLAMA,
    "mistral": _DECODER_LLAMA,
    "qwen2": _DECODER_LLAMA,
    "qwen3": _DECODER_LLAMA,
}

# The task head (sequence or token classification, question answering) trains in full: it starts
# random. Its names: classifier / score / qa_outputs, BART's and T5's classification_head, and
# DistilBERT's pre_classifier (the layer before its classifier, also absent from pretrained
# checkpoints). DeBERTa-v2's ContextPooler belongs to the head too: pretrained DeBERTa checkpoints
# ship without it, so it starts random and must train.
HEAD_MODULES = ["classifier", "score", "qa_outputs", "classification_head", "pre_classifier"]
DEFAULT_MODULES_TO_SAVE: dict[str, list[str]] = {"deberta-v2": ["pooler", *HEAD_MODULES]}


@dataclass
class WrapState:
    """What ``wrap`` did to a model, kept on it as ``model.tsqlora_state`` so ``unwrap`` can undo it."""

    # The Conv1D each adapted layer replaced, by name, for unwrap to put back (see wrap).
    conv1d: dict[str, nn.Module] = field(repr=False)
    modules_to_save: list[str]
    requires_grad_before: dict[str, bool] = field(repr=False)


# ---- name matching ------------------------------------------------------------------------------
def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == s or name.endswith("." + s) for s in pattern)


def _is_linear_like(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _generic_name(name: str) -> str:
    """'bert.encoder.layer.3.attention.self.query' -> 'attention.self.query' (the part after the
    last numeric component), so candidate lists stay short for deep models."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i + 1:]) or name
    return name


def candidate_target_names(model: nn.Module) -> list[str]:
    """Distinct names (layer index stripped) of the linear / Conv1D modules a target could name."""
    return sorted({_generic_name(n) for n, m in model.named_modules() if n and _is_linear_like(m)})


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _resolve_targets(model: nn.Module, config: TsqLoRAConfig) -> list[str] | str:
    if config.target_modules is not None:
        return config.target_modules
    model_type = _model_type(model)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"tsqlora_ext.wrap: no default target_modules for model_type {model_type!r} "
            f"({type(model).__name__}); families with defaults: {sorted(DEFAULT_TARGET_MODULES)}. "
            f"Set TsqLoRAConfig.target_modules, e.g. from these linear layers: "
            f"{candidate_target_names(model)}")
    return DEFAULT_TARGET_MODULES[model_type]


def _top_level_matches(model: nn.Module, pattern: list[str]) -> list[str]:
    """Names of modules matching the suffix list, skipping those nested inside an earlier match."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and _matches(name, pattern) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def _resolve_modules_to_save(model: nn.Module, config: TsqLoRAConfig) -> list[str]:
    if config.modules_to_save is None:
        wanted = DEFAULT_MODULES_TO_SAVE.get(_model_type(model), HEAD_MODULES)
        return _top_level_matches(model, wanted)  # a model without a head simply has none
    found = _top_level_matches(model, list(config.modules_to_save))
    missing = [s for s in config.modules_to_save if not _top_level_matches(model, [s])]
    if missing:
        top = sorted({n.split(".")[0] for n, _ in model.named_modules() if n})
        raise ValueError(f"tsqlora_ext.wrap: modules_to_save {missing} match no module of "
                         f"{type(model).__name__}; its top-level modules: {top}")
    return found


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _uncompiled(model: nn.Module) -> nn.Module:
    """The model inside a torch.compile'd one (an OptimizedModule, which holds it as ``_orig_mod``
    and names its modules and parameters "_orig_mod.<name>"), else ``model``: adapter files and the
    wrapping must use the model's own class and names. Dynamo is loaded when a model is compiled, so
    looking in sys.modules spares importing it."""
    optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


# ---- Conv1D <-> Linear --------------------------------------------------------------------------
def _conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D computes x @ W + b with W: [in, out]; nn.Linear holds W^T: [out, in]."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear.train(conv.training)


def _restore_conv1d(conv: nn.Module, linear: nn.Linear) -> nn.Module:
    """The original Conv1D ``conv`` again, its weight that of ``linear`` (merged or not), in the
    same Parameter: hooks on the module, and an optimizer holding the weight, find them again."""
    conv.weight.data = linear.weight.detach().t().contiguous()
    return conv.train(linear.training)  # (its bias is the Parameter the Linear shared)


def _put_back(model: nn.Module, replaced: dict[str, nn.Module],
              requires_grad_before: dict[str, bool]) -> None:
    """Put ``replaced`` (name -> module) back in place, and every parameter's requires_grad as
    before the wrap (a parameter the wrap did not know keeps its own)."""
    for name, module in replaced.items():
        _set_submodule(model, name, module)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad_before.get(name, p.requires_grad))


# ---- checks -------------------------------------------------------------------------------------
def _refuse_unadaptable(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> None:
    """Refuse targets an adapter would break, naming each: a layer whose weight is shared with
    another module (a tied lm_head: merging would add ΔW to the input embeddings too), the
    out_proj of an nn.MultiheadAttention (which reads out_proj.weight directly, never calling it),
    and a layer whose weight accelerate offloads (kept on the meta device and loaded by a hook
    around each call, which the adapted layer, reading the weight itself, would never run)."""
    names_of: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(pname)
    problems = []
    for name, module in chosen:
        for pname, p in module.named_parameters(prefix=name, recurse=False):
            tied = [n for n in names_of[id(p)] if n != pname]
            if tied:
                problems.append(f"{name}: its {pname.rpartition('.')[2]} is tied to {tied[0]} (the "
                                "same Parameter), so merging the adapter would change that too")
        if getattr(getattr(module, "_hf_hook", None), "offload", False):
            problems.append(f"{name}: accelerate offloads its weight (device_map with 'cpu' or "
                            "'disk', cpu_offload); load the model with its weights in memory")
        parent_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name), nn.MultiheadAttention):
            problems.append(f"{name}: nn.MultiheadAttention reads its weight directly instead of "
                            "calling it, so an adapter there would be bypassed or fail")
    if problems:
        raise ValueError(f"tsqlora_ext.wrap: these target_modules cannot be adapted: {problems}; "
                         "leave them out of target_modules (or add them to exclude_modules)")


# ---- public API ---------------------------------------------------------------------------------
def adapted_layers(model: nn.Module) -> Iterator[tuple[str, VarRankLoRALinear]]:
    """(name, layer) for every VarRankLoRALinear in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, VarRankLoRALinear):
            yield name, module


def is_wrapped(model: nn.Module) -> bool:
    return getattr(model, "tsqlora_state", None) is not None


def wrap(model: nn.Module, config: TsqLoRAConfig | None = None, verbose: bool = True) -> nn.Module:
    """Adapt ``model`` in place with variable-rank LoRA and return it.

    Args:
        model: a transformers model (or any ``nn.Module`` when ``config.target_modules`` is set),
            or a torch.compile'd one, whose model is then wrapped.
        config: the TsqLoRAConfig; ``TsqLoRAConfig()`` when None.
        verbose: print the one-line trainable-parameter summary.
    """
    given, model = model, _uncompiled(model)
    config = TsqLoRAConfig() if config is None else config
    if not isinstance(config, TsqLoRAConfig):
        raise TypeError(f"tsqlora_ext.wrap: config must be a TsqLoRAConfig, got {type(config).__name__}")
    config.validate()  # again: its fields may have been set after construction
    if is_wrapped(model) or any(True for _ in adapted_layers(model)):
        raise ValueError("tsqlora_ext.wrap: the model is already wrapped; unwrap() it first")

    targets = _resolve_targets(model, config)
    exclude = config.exclude_modules
    modules_to_save = _resolve_modules_to_save(model, config)

    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets) or _inside(name, modules_to_save):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError(
            f"tsqlora_ext.wrap: target_modules {targets!r} matched no module of {type(model).__name__} "
            f"(after exclude_modules={exclude!r} and outside modules_to_save={modules_to_save}); "
            f"candidate linear layers: {candidate_target_names(model)}")
    unsupported = [f"{n} ({type(m).__name__})" for n, m in chosen if not _is_linear_like(m)]
    if unsupported:
        raise TypeError(
            f"tsqlora_ext.wrap: target_modules matched modules of unsupported type: "
            f"{unsupported[:8]}{' ...' if len(unsupported) > 8 else ''}; only nn.Linear and "
            f"transformers Conv1D can be adapted. Narrow target_modules (linear layers: "
            f"{candidate_target_names(model)})")

    _refuse_unadaptable(model, chosen)

    requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    # Seed the adapter initialisation from config.seed without disturbing the caller's RNG.
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    conv1d: dict[str, nn.Module] = {}
    replaced: dict[str, nn.Module] = {}
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(config.seed)
            for name, module in chosen:
                if isinstance(module, nn.Linear):
                    base = module
                else:
                    base = _conv1d_to_linear(module)
                    conv1d[name] = module
                layer = VarRankLoRALinear(base, r_max=config.r_max, r_init=config.r_init,
                                          alpha=config.lora_alpha, dropout=config.lora_dropout,
                                          init=config.init)
                # A new module starts in training mode; the model may be in eval mode
                # (from_pretrained returns it so), where adapter dropout must not run.
                layer.train(module.training)
                _set_submodule(model, name, layer)
                replaced[name] = module
    except BaseException:
        _put_back(model, replaced, requires_grad_before)  # not left frozen and half adapted
        raise

    for conv in conv1d.values():
        # Its weight lives on, transposed, in the adapted layer's base. The Parameter keeps its
        # identity for unwrap, but not a second copy of the data.
        conv.weight.data = conv.weight.data.new_empty(0)
    for name in modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)

    model.tsqlora_config = config
    model.tsqlora_state = WrapState(conv1d=conv1d, modules_to_save=modules_to_save,
                                    requires_grad_before=requires_grad_before)
    if verbose:
        print(trainable_summary(model))
    return given


def unwrap(model: nn.Module, merge: bool = True) -> nn.Module:
    """Give back the plain model, in place: each adapted layer is replaced by its base layer (with
    the adapter merged into the weight when ``merge``, dropped otherwise), Conv1D layers are restored
    and every parameter gets back the ``requires_grad`` it had before ``wrap``."""
    given, model = model, _uncompiled(model)
    state = getattr(model, "tsqlora_state", None)
    if state is None:
        raise ValueError("tsqlora_ext.unwrap: the model is not wrapped (no tsqlora_state)")
    bases = {}
    for name, layer in adapted_layers(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        conv = state.conv1d.get(name)
        bases[name] = layer.base_layer if conv is None else _restore_conv1d(conv, layer.base_layer)
    _put_back(model, bases, state.requires_grad_before)
    del model.tsqlora_state
    del model.tsqlora_config
    return given


def trainable_summary(model: nn.Module) -> str:
    """One line: adapted layers and their ranks, trainable and total parameters (PEFT's wording)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    layers = [layer for _, layer in adapted_layers(model)]
    ranks = [layer.rank for layer in layers]
    active = sum(layer.rank * (layer.in_features + layer.out_features + 1) for layer in layers)
    rank_text = (f"rank {min(ranks)}-{max(ranks)}" if ranks and min(ranks) != max(ranks)
                 else f"rank {ranks[0] if ranks else 0}")
    r_max = max((layer.r_max for layer in layers), default=0)
    return (f"tsqlora: {len(layers)} layers adapted ({rank_text}, r_max {r_max}) || "
            f"trainable params: {trainable:,} (active adapter params: {active:,}) || "
            f"all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")
