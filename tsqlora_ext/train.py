"""The TsqLoRA training loop: ``tsqlora_ext.train(model, train_data, eval_data, config, args)``.

One optimizer step = ``grad_accum`` micro-batches from the C++ loader:

    for each micro-batch:  forward (bf16 autocast where supported) -> loss / n_micro
                           (+ the orthogonality regularizer over active components) -> backward
    then:                  clip -> AdamW step (inactive components held still) -> LR schedule step
                           -> allocator.step()  (sensitivity EMAs + reallocation every delta_t)
                           -> zero grads -> checkpoint when due

Rank work happens only there, after the optimizer step, never on a micro-batch: that is what
makes the allocator's step count equal the optimizer's (DESIGN "Dynamic reallocation").

Multi-process (``torchrun --nproc_per_node=N``, or ``accelerate launch`` with a script that
creates an ``accelerate.Accelerator`` first): when torch.distributed is initialised the model
is wrapped in DistributedDataParallel, the loader shards the batches by rank (rank r takes batches
r, r+N, ...: N processes at batch B see the same pairs of batches as one process at batch B with
grad_accum N), gradients are averaged by DDP and the allocator all-reduces its statistics, so
every process makes the same rank decisions.

Resume: ``args.checkpoint_dir`` + ``args.checkpoint_every`` write atomic checkpoints
(``checkpoint.py``); ``resume=DIR`` continues from the newest good one exactly where it stopped:
trainable parameters and active sets, optimizer, scheduler, allocator, loader position, RNG
states and the metrics gathered so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .config import TsqLoRAConfig, check_integers, check_layer_fields, config_value, dataclass_from_dict
from .layers import VarRankLoRALinear, protect_inactive, refuse_merged
from .loader import TokenBatchLoader, class_ids
from .files import atomic_write


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArgs:
    """How to train (the method itself is configured by TsqLoRAConfig)."""

    lr: float = _f(1e-3, "Peak learning rate of AdamW.")
    epochs: float = _f(1.0, "Passes over the training data (fractions allowed: 0.5 stops at the first "
                       "optimizer step that covers half of it).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = _f(32, "Examples per micro-batch on each process.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = _f(0.06, "Share of the optimizer steps spent warming the LR up linearly "
                             "from 0; it then decays linearly to 0.")
    weight_decay: float = _f(0.0, "AdamW weight decay (inactive components are never touched).")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0: no clipping).")
    max_nonfinite_steps: int = _f(10, "A step whose gradients hold NaN/inf is skipped (no parameter, "
                                  "optimizer, LR or score update); stop with an error after this "
                                  "many in a row.")
    max_length: int = _f(64, "Truncate examples to this many tokens.")
    bf16: str = _f("auto", "'auto': bf16 autocast on CUDA devices that support it, off on CPU; "
                   "'on' / 'off' force it.")
    eval_batch_size: int = _f(64, "Examples per evaluation batch.")
    checkpoint_dir: str | None = _f(None, "Write resumable checkpoints here.")
    checkpoint_every: int = _f(0, "Checkpoint every this many optimizer steps (0: never).")
    keep_checkpoints: int = _f(2, "Keep only the newest this many checkpoints.")
    num_workers: int = _f(2, "Loader threads building batches ahead of training.")
    progress: bool = _f(True, "Show a progress bar (rank 0 only).")

    def __post_init__(self) -> None:
        def bad(msg):
            raise ValueError(f"TrainArgs: {msg}")
        check_integers(self, ("max_steps", "batch_size", "grad_accum", "max_nonfinite_steps",
                              "max_length", "eval_batch_size", "checkpoint_every", "keep_checkpoints",
                              "num_workers"), bad)
        # (NaN passes a comparison such as lr <= 0.)
        if not (0 < self.lr < math.inf):
            bad(f"lr must be a finite number > 0, got {self.lr}")
        if not (0 < self.epochs < math.inf):
            bad(f"epochs must be a finite number > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "keep_checkpoints",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            bad(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.max_grad_norm >= 0:  # (NaN would turn clipping off unnoticed)
            bad(f"max_grad_norm must be a number >= 0 (0 or inf: no clipping), got {self.max_grad_norm}")
        if not 0 <= self.weight_decay < math.inf:
            bad(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            bad(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.bf16 not in ("auto", "on", "off"):
            bad(f"bf16 must be 'auto', 'on' or 'off', got {self.bf16!r}")
        if self.checkpoint_every < 0:
            bad(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.checkpoint_every and not self.checkpoint_dir:
            bad("checkpoint_every is set but checkpoint_dir is not")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "train args") -> TrainArgs:
        return dataclass_from_dict(cls, d, source)


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class TokenizedData:
    """Examples tokenized once (no padding): ``token_ids[i]`` with class label ``labels[i]``."""

    token_ids: list[list[int]]
    labels: np.ndarray

    def __post_init__(self) -> None:
        # As an int64 array whatever was given (a list, bools, a tensor): evaluation and the loader
        # read it as one, and a list or a tensor passed every check but failed evaluation after an
        # epoch of training.
        self.labels = class_ids(self.labels.cpu() if isinstance(self.labels, torch.Tensor) else self.labels)
        if len(self.labels) != len(self.token_ids):
            raise ValueError(f"{len(self.token_ids)} token rows but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], labels: Sequence[int],
                   max_length: int) -> TokenizedData:
        if len(texts) != len(labels):
            raise ValueError(f"texts ({len(texts)}) and labels ({len(labels)}) differ in length")
        if len(texts) == 0:
            raise ValueError("no examples to tokenize")
        ids = class_ids(labels)
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False)["input_ids"]
        return cls(enc, ids)

    def subset(self, rows: Sequence[int]) -> TokenizedData:
        rows = np.asarray(rows, dtype=np.int64)
        return TokenizedData([self.token_ids[r] for r in rows], self.labels[rows])

    def padded(self, max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
        """Every row padded to the longest: input_ids, attention_mask, labels tensors."""
        width = min(max_length, max(len(t) for t in self.token_ids))
        ids = torch.full((len(self), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(self), width), dtype=torch.long)
        for i, t in enumerate(self.token_ids):
            t = t[:width]
            ids[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
            mask[i, :len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(self.labels)}


def check_labels(data: TokenizedData, model: nn.Module, what: str) -> None:
    """Every label a class of the model's head, [0, config.num_labels). Otherwise an eval label
    fails inside the loss only at the first evaluation, after an epoch of training, and -100
    is ignored by the loss yet counted as a wrong answer by accuracy."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    labels = data.labels  # (int64 class ids: TokenizedData checked them)
    if num_labels is None or not labels.size:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if bad.size:
        raise ValueError(f"{what} row {bad[0]}: label {labels[bad[0]]} is not a class of the model "
                         f"({bad.size} such row(s)); its head has config.num_labels = {num_labels}, "
                         f"so labels must lie in [0, {num_labels})")


def as_tokenized(data, tokenizer, max_length: int, what: str) -> TokenizedData:
    """Accept TokenizedData, a ``(texts, labels)`` pair or a mapping with 'text' and 'label'."""
    if isinstance(data, TokenizedData):
        return data
    if isinstance(data, dict):
        missing = [k for k in ("text", "label") if k not in data]
        if missing:
            raise ValueError(f"{what}: mapping is missing {missing} (needs 'text' and 'label')")
        texts, labels = data["text"], data["label"]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        texts, labels = data
    else:
        raise TypeError(f"{what}: expected TokenizedData, (texts, labels) or {{'text', 'label'}}, "
                        f"got {type(data).__name__}")
    if tokenizer is None:
        raise ValueError(f"{what}: raw texts need a tokenizer (pass tokenizer=...)")
    try:
        return TokenizedData.from_texts(tokenizer, texts, labels, max_length)
    except ValueError as e:  # (from_texts does not know which argument it was given)
        raise ValueError(f"{what}: {e}") from None


def optimizer_steps(epochs: float, micro_per_epoch: int, grad_accum: int) -> int:
    """The optimizer steps of ``epochs`` passes over ``micro_per_epoch`` micro-batches: an epoch
    ends with a shorter accumulation when grad_accum does not divide it, and a fraction of an epoch
    ends at the first step that covers that share of its micro-batches (0.5 of 8 micro-batches:
    4, so 2 steps of grad_accum 2, and 2 steps, 6 micro-batches, of grad_accum 3)."""
    whole = math.floor(epochs)
    # (less a hair: 0.1 * 10 is 1.0000000000000002, one micro-batch, not two)
    rest = math.ceil((epochs - whole) * micro_per_epoch - 1e-9)
    return max(1, whole * math.ceil(micro_per_epoch / grad_accum) + math.ceil(rest / grad_accum))


def scheduled(config: TsqLoRAConfig, args: TrainArgs,
              micro_per_epoch: int) -> tuple[TsqLoRAConfig, int]:
    """(config with total_steps filled in when unset, the run's optimizer steps) for a loader of
    ``micro_per_epoch`` micro-batches; raises, as the config does, when its schedule does not fit
    the run (t_init + t_final leaving no budget phase)."""
    total_steps = args.max_steps or optimizer_steps(args.epochs, micro_per_epoch, args.grad_accum)
    return (config.replace(total_steps=total_steps) if config.total_steps is None else config), total_steps


def pad_id_of(tokenizer, model: nn.Module | None = None) -> int:
    """The tokenizer's padding id, else the model config's, else their end-of-sequence id (a
    decoder that ships without a pad token), else 0. Pre-tokenized data comes without a tokenizer,
    and a decoder classifier reads each row at its last token before the config's pad id: padding
    with another id would make it read a padding position."""
    sources = (tokenizer, getattr(model, "config", None))
    for attr in ("pad_token_id", "eos_token_id"):  # a decoder without a pad token pads with its eos
        for source in sources:
            value = getattr(source, attr, None)
            if isinstance(value, int):
                return value
    return 0


def make_loader(data: TokenizedData, *, batch_size: int, max_length: int, pad_id: int,
                shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 2) -> TokenBatchLoader:
    """The native loader over ``data``: length-bucketed when shuffling, in order otherwise."""
    return TokenBatchLoader(data.token_ids, data.labels, batch_size=batch_size, pad_id=pad_id,
                            max_length=max_length, pad_to_multiple_of=8,
                            bucket_multiplier=50 if shuffle else 1, shuffle=shuffle, seed=seed,
                            rank=rank, world_size=world_size, num_workers=num_workers,
                            return_index=True)


# ---- distributed --------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """(rank, world_size), (0, 1) without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Initialise the process group when launched by torchrun / accelerate (WORLD_SIZE > 1):
    nccl on GPU, gloo on CPU. Returns True when this call initialised it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    return True


# ---- model helpers ------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, VarRankLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, VarRankLoRALinear)]


def grad_norm(params, max_grad_norm: float) -> float:
    """The global gradient norm, clipping to ``max_grad_norm`` first when it is > 0. Not finite
    means the step's gradients hold NaN/inf. One host sync."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else \
        torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(norm)


def count_trainable(model: nn.Module) -> dict[str, int]:
    """Trainable parameters: allocated (r_max) and in active components (what the adapter uses)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = [m for _, m in lora_layers(model)]
    lora_alloc = sum(m.lora_A.numel() + m.lora_E.numel() + m.lora_B.numel() for m in layers)
    lora_active = sum(m.rank * (m.in_features + m.out_features + 1) for m in layers)
    return {"trainable": trainable, "active": trainable - lora_alloc + lora_active,
            "total": sum(p.numel() for p in model.parameters())}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train plus every adapter's active set: all a checkpoint needs on top of
    the frozen base, which the resumed run rebuilds from the same model files."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = p.detach().cpu().clone()
    for name, m in lora_layers(model):
        state[f"{name}.active"] = m.active.detach().cpu().clone()
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    layers = dict(lora_layers(model))
    for key, value in state.items():
        if key.endswith(".active") and key[:-len(".active")] in layers:
            layers[key[:-len(".active")]].set_active(value)
        elif key in params:
            with torch.no_grad():
                params[key].copy_(value)
        else:
            raise ValueError(f"checkpoint holds {key!r}, which this model does not have: resume "
                             "with the same model and TsqLoRAConfig as the interrupted run")


def _autocast(device: torch.device, mode: str):
    if mode == "off" or (mode == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- evaluation ---------------------------------------------------------------------------------
def classification_metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, plus macro-F1 when there are more than two classes: the mean F1 over the classes
    that occur among the labels or the predictions (scikit-learn's f1_score(average='macro')); a
    class absent from both, as in a small evaluation set, has no F1 to count."""
    out = {"accuracy": float((preds == labels).mean()) if len(labels) else float("nan"),
           "n": int(len(labels))}
    if num_labels > 2:
        f1s = []
        for c in range(num_labels):
            tp = int(((preds == c) & (labels == c)).sum())
            fp = int(((preds == c) & (labels != c)).sum())
            fn = int(((preds != c) & (labels == c)).sum())
            if tp + fp + fn:
                f1s.append(2 * tp / (2 * tp + fp + fn))
        out["macro_f1"] = float(np.mean(f1s)) if f1s else float("nan")
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenizedData, *, batch_size: int = 64, max_length: int = 64,
             pad_id: int | None = None, bf16: str = "auto", num_workers: int = 2) -> dict[str, float]:
    """Accuracy (and macro-F1 for multi-class) of a sequence classifier on ``data``; every process
    evaluates the whole split, so the figure is the same everywhere. ``pad_id``: the model
    config's pad_token_id (0 without one) when None."""
    if len(data) == 0:
        raise ValueError("evaluate: data holds no examples")
    check_labels(data, model, "evaluate: data")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = make_loader(data, batch_size=batch_size, max_length=max_length,
                         pad_id=pad_id_of(None, model) if pad_id is None else pad_id,
                         shuffle=False, seed=0, num_workers=num_workers)
    preds = np.zeros(len(data), dtype=np.int64)
    losses = []
    for batch in loader:
        with _autocast(device, bf16):
            out = model(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device))
        preds[batch["index"].numpy()] = out.logits.float().argmax(-1).cpu().numpy()
        losses.append((float(out.loss), len(batch["index"])))
    model.train(was_training)
    num_labels = getattr(getattr(model, "config", None), "num_labels", int(data.labels.max()) + 1)
    metrics = classification_metrics(preds, data.labels, num_labels)
    metrics["loss"] = sum(l * n for l, n in losses) / max(1, sum(n for _, n in losses))
    return metrics


# ---- the result ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What ``train`` returns (JSON-serialisable through ``to_dict``)."""

    metrics: dict[str, Any]
    eval_history: list[dict[str, Any]]
    loss_history: list[dict[str, float]]
    rank_history: list[dict[str, Any]]
    final_ranks: dict[str, int]
    optimizer_steps: int
    reallocations: int
    skipped_steps: int  # optimizer steps skipped because their gradients held NaN/inf
    wall_time_s: float
    params: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the loop -----------------------------------------------------------------------------------
def train(
    model: nn.Module,
    train_data,
    eval_data=None,
    config: TsqLoRAConfig | None = None,
    args: TrainArgs | None = None,
    *,
    tokenizer=None,
    allocator=None,
    calibrate: bool = True,
    resume: str | os.PathLike | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Fine-tune a wrapped model (``tsqlora_ext.wrap``; wrapped here when it is not yet) with
    variable-rank LoRA and dynamic rank reallocation.

    Args:
        model: a transformers model taking input_ids / attention_mask / labels and returning
            ``.loss`` (and ``.logits`` for evaluation).
        train_data / eval_data: TokenizedData, ``(texts, labels)`` or ``{'text', 'label'}``
            (raw texts need ``tokenizer``).
        config: the method (ranks, schedule, orthogonality weight, ...). ``total_steps`` is filled
            in from the data when it is None.
        args: TrainArgs (learning rate, epochs, batch, accumulation, checkpoints, ...).
        allocator: a RankAllocator to use (one is built from ``config`` when None and
            ``config.dynamic`` or ``config.sensitivity_init`` asks for it).
        calibrate: measure layer sensitivity on ``config.calibration_batches`` batches and set
            the initial ranks from it (when ``config.sensitivity_init``; skipped on resume).
        resume: a checkpoint directory to continue from (its newest good checkpoint).
        on_step: called as ``on_step(step, record)`` after each optimizer step.

    Returns:
        TrainResult: final and per-epoch evaluation metrics, the loss and rank history, the
        final rank of every layer, step and reallocation counts, wall time and parameter counts.
    """
    from .wrap import _uncompiled, wrap

    config = config or getattr(model, "tsqlora_config", None) or TsqLoRAConfig()
    args = args or TrainArgs()
    seed = config.seed
    # Under torchrun the environment names the process group; without joining it, every process
    # would train alone on all the data and write to the same folders.
    init_distributed_from_env()
    rank, world = dist_info()
    device = next(model.parameters()).device
    t_start = time.perf_counter()

    if not lora_layers(model):
        model = wrap(model, config, verbose=rank == 0)
    # The bookkeeping (layer names, allocator, calibration, checkpoints) works on the model inside
    # a torch.compile'd one: its own names, without "_orig_mod.", and calibration's hooked forward,
    # which a compiled transformers model returned without its loss. The steps run `model`.
    bare = _uncompiled(model)
    # Also without an allocator (dynamic and sensitivity_init off), which checks it too.
    check_layer_fields(bare, config, "train")
    refuse_merged(bare, "train")
    layers = lora_layers(bare)
    pad_id = pad_id_of(tokenizer, model)
    model_config = getattr(model, "config", None)
    if model_config is not None and getattr(model_config, "pad_token_id", 0) is None:
        # A decoder classifies from each row's last token that is not padding and refuses batches
        # without a pad id (LLaMA, Mistral and Qwen2 ship without one): it is what the loader pads
        # with.
        model_config.pad_token_id = pad_id
    train_tok = as_tokenized(train_data, tokenizer, args.max_length, "train_data")
    eval_tok = None if eval_data is None else as_tokenized(eval_data, tokenizer, args.max_length, "eval_data")
    for tok, what in ((train_tok, "train_data"), (eval_tok, "eval_data")):
        if tok is not None:
            check_labels(tok, model, what)
    if eval_tok is not None and len(eval_tok) == 0:
        raise ValueError("eval_data: holds no examples (pass None to train without evaluation)")

    loader = make_loader(train_tok, batch_size=args.batch_size, max_length=args.max_length,
                         pad_id=pad_id, shuffle=True, seed=seed, rank=rank, world_size=world,
                         num_workers=args.num_workers)
    micro_per_epoch = len(loader)
    if micro_per_epoch == 0:
        raise ValueError(f"train_data: {len(train_tok)} examples make no batch of {args.batch_size} "
                         f"on each of {world} process(es)")
    config, total_steps = scheduled(config, args, micro_per_epoch)

    torch.manual_seed(seed)
    model.train()
    ddp = world > 1

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    guard = protect_inactive(optimizer, bare)
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = linear_schedule(optimizer, warmup, total_steps)
    if allocator is None and (config.dynamic or config.sensitivity_init):
        from .allocator import RankAllocator
        allocator = RankAllocator(bare, config)
    if allocator is not None and allocator.config.total_steps is None:
        allocator.set_total_steps(total_steps)
    schedule = allocator.config if allocator is not None else None
    if schedule is not None and schedule.dynamic and schedule.total_steps != total_steps:
        end = schedule.total_steps - schedule.t_final
        warnings.warn(f"train: the rank schedule spans total_steps={schedule.total_steps} optimizer "
                      f"steps but this run makes {total_steps}: " + (
                          f"the budget would reach target_r at step {end}, so the ranks end above it"
                          if end > total_steps else f"the ranks freeze at step {end}") +
                      "; leave config.total_steps None to have it filled in", stacklevel=2)

    ckpt = CheckpointManager(args.checkpoint_dir, args.checkpoint_every, args.keep_checkpoints) \
        if args.checkpoint_dir else None
    if ckpt is not None and ckpt.every and (
            resume is None or Path(resume).resolve() != ckpt.directory.resolve()):
        ckpt.refuse_earlier_run(f"continue that run with resume={str(ckpt.directory)!r} (tsqlora "
                                "train --resume OUT), or give this run another checkpoint_dir "
                                "(tsqlora train: another --out)", label="checkpoint_dir ")
    step, epoch, position = 0, 0, 0
    loss_history: list[dict[str, float]] = []
    eval_history: list[dict[str, Any]] = []
    reallocations, skipped, nonfinite_run = 0, 0, 0
    elapsed_before = 0.0

    if resume is not None:
        manager = CheckpointManager(resume)
        found = manager.latest()
        if found is None and manager.checkpoints():
            raise ValueError(f"resume: none of the {len(manager.checkpoints())} checkpoint(s) in "
                             f"{resume} can be read (the warnings above say why)")
        if found is None:
            raise FileNotFoundError(f"resume: no checkpoint in {resume}")
        path, state = found
        if state["world_size"] != world:
            raise ValueError(f"resume: {path} was written by {state['world_size']} process(es), "
                             f"this run has {world}")
        changed = _changed_settings(state, config, args)
        if changed:
            raise ValueError(f"resume: {path} was written with other settings: {'; '.join(changed)}. "
                             "Resume with the interrupted run's settings, or start a new run in "
                             "another checkpoint_dir")
        load_trainable_state(bare, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if allocator is not None and state["allocator"] is not None:
            allocator.load_state_dict(state["allocator"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        loss_history, eval_history = state["loss_history"], state["eval_history"]
        reallocations, elapsed_before = state["reallocations"], state["elapsed_s"]
        # Both absent from checkpoints written before them.
        skipped, nonfinite_run = state.get("skipped_steps", 0), state.get("nonfinite_run", 0)
        set_rng_state(state["rng"][rank])
    elif allocator is not None and config.sensitivity_init and calibrate and config.calibration_batches:
        calib = make_loader(train_tok, batch_size=args.batch_size, max_length=args.max_length,
                            pad_id=pad_id, shuffle=True, seed=seed + 1, rank=rank, world_size=world,
                            num_workers=args.num_workers)
        # K batches in all: each of the N processes measures K / N of them and the allocator
        # averages over processes, so N processes calibrate on what one process would.
        per_rank = max(1, math.ceil(config.calibration_batches / world))
        batches = [_to_device(b, device) for _, b in zip(range(per_rank), calib)]
        allocator.calibrate(batches, model=bare)
    # DDP wraps the model only now: calibration runs its own backward passes on the bare model.
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model

    def save_checkpoint() -> None:
        rngs = [None] * world
        if ddp:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank == 0:
            ckpt.save(step, {
                "step": step, "epoch": epoch, "position": position, "world_size": world,
                "model": trainable_state(bare), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "allocator": allocator.state_dict() if allocator is not None else None,
                "loss_history": loss_history, "eval_history": eval_history,
                "reallocations": reallocations, "skipped_steps": skipped,
                "nonfinite_run": nonfinite_run, "rng": rngs,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                "config": config.to_dict(), "args": args.to_dict(),
            })
        if ddp:
            torch.distributed.barrier()

    bar = _progress(total_steps, step, args.progress and rank == 0)
    t_window, n_window = time.perf_counter(), 0
    try:
        while step < total_steps:
            done_epoch = False
            loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "position": position})
            batches = iter(loader)
            while step < total_steps and not done_epoch:
                n_micro = min(args.grad_accum, micro_per_epoch - position)
                # Summed on the device: reading each micro-batch's loss would stop the host until
                # its backward has run, before it could queue the next micro-batch.
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for i in range(n_micro):
                    batch = _to_device(next(batches), device)
                    sync = contextlib.nullcontext() if (not ddp or i == n_micro - 1) else net.no_sync()
                    with sync:
                        with _autocast(device, args.bf16):
                            out = net(**batch)
                            loss = out.loss.float()
                            if config.orth_reg_weight > 0:
                                loss = loss + orthogonality_penalty(layers, config.orth_reg_weight)
                        (loss / n_micro).backward()
                    loss_sum += loss.detach()
                    n_window += int(batch["input_ids"].shape[0]) * world
                position += n_micro
                if step == 0:
                    _warn_unused(layers)
                if ddp:  # log the global mean loss, as one process at the same global batch would
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world
                # The global gradient norm (clipped to, when clipping) says whether the step's
                # gradients are finite: a step with NaN/inf is skipped whole, so parameters, AdamW
                # moments, LR and scores keep their values, and the allocator need not scan the
                # gradients itself. The step's one host sync; the loss is ready by then.
                step_norm = grad_norm(params, args.max_grad_norm)
                step_loss = float(loss_sum) / n_micro
                finite = math.isfinite(step_norm)
                lr = scheduler.get_last_lr()[0]  # this step's (scheduler.step moves to the next)
                if finite:
                    optimizer.step()
                    scheduler.step()
                    nonfinite_run = 0
                else:
                    skipped += 1
                    nonfinite_run += 1
                    if nonfinite_run >= args.max_nonfinite_steps:
                        raise FloatingPointError(
                            f"train: optimizer steps {step + 2 - nonfinite_run} to {step + 1} all had "
                            f"NaN/inf gradients (last loss {step_loss:.4g}) and were skipped: "
                            f"the model holds step {step + 1 - nonfinite_run}'s parameters and every "
                            f"checkpoint written is intact. Lower TrainArgs.lr ({args.lr:g}), check "
                            f"the data, or raise max_nonfinite_steps ({args.max_nonfinite_steps}).")
                if allocator is not None and config.dynamic:
                    if allocator.step(grads_finite=finite) is not None:
                        reallocations += 1
                optimizer.zero_grad(set_to_none=True)
                step += 1
                record = {"step": step, "loss": step_loss, "grad_norm": step_norm,
                          "lr": lr,
                          # the layers found once: a walk of every module costs ~1 ms per step
                          "total_rank": sum(m.rank for _, m in layers)}
                loss_history.append(record)
                if position >= micro_per_epoch:
                    done_epoch = True
                    epoch, position = epoch + 1, 0
                    if eval_tok is not None:
                        eval_history.append({"epoch": epoch, "step": step, **evaluate(
                            model, eval_tok, batch_size=args.eval_batch_size,
                            max_length=args.max_length, pad_id=pad_id, bf16=args.bf16,
                            num_workers=args.num_workers)})
                        model.train()
                if bar is not None:
                    now = time.perf_counter()
                    bar.set_postfix(loss=f"{record['loss']:.4f}",
                                    ex_s=f"{n_window / max(now - t_window, 1e-9):.0f}",
                                    rank=record["total_rank"], refresh=False)
                    bar.update(1)
                if on_step is not None:
                    on_step(step, record)
                if ckpt is not None and ckpt.due(step):
                    save_checkpoint()
    finally:
        if bar is not None:
            bar.close()
        guard.remove()

    # A run stopped mid-epoch (max_steps, fractional epochs) is still evaluated once at the end.
    if eval_tok is not None and (not eval_history or eval_history[-1]["step"] != step):
        eval_history.append({"epoch": epoch + position / micro_per_epoch, "step": step, **evaluate(
            model, eval_tok, batch_size=args.eval_batch_size, max_length=args.max_length,
            pad_id=pad_id, bf16=args.bf16, num_workers=args.num_workers)})
    model.train()
    metrics = {k: v for k, v in eval_history[-1].items() if k not in ("epoch", "step")} if eval_history else {}
    metrics["train_loss"] = loss_history[-1]["loss"] if loss_history else float("nan")
    return TrainResult(
        metrics=metrics,
        eval_history=eval_history,
        loss_history=loss_history,
        rank_history=list(allocator.history) if allocator is not None else [],
        final_ranks={n: m.rank for n, m in layers},
        optimizer_steps=step,
        reallocations=reallocations,
        skipped_steps=skipped,
        wall_time_s=elapsed_before + time.perf_counter() - t_start,
        params=count_trainable(bare),
    )


# TrainArgs a resumed run may change, since none alters what the remaining steps compute: where
# and how often checkpoints go, loader threads, the progress bar, and the stop rule for non-finite
# steps (whose error suggests raising it).
RESUME_MAY_CHANGE = frozenset({"checkpoint_dir", "checkpoint_every", "keep_checkpoints",
                                "num_workers", "progress", "max_nonfinite_steps"})


def _changed_settings(state: dict[str, Any], config: TsqLoRAConfig, args: TrainArgs) -> list[str]:
    """'Class.field <checkpoint's> then, <this run's> now' for each setting that differs."""
    changed = []
    # The saved config through to_dict again: a checkpoint of an earlier version holds an infinite
    # field as the float, today's to_dict writes "inf".
    saved_config = {k: (config_value(v) if isinstance(v, float) else v) for k, v in state["config"].items()}
    for cls, saved, now in ((TrainArgs, state["args"], args.to_dict()),
                            (TsqLoRAConfig, saved_config, config.to_dict())):
        # Only fields both know: a field added since the checkpoint was written has no old value.
        for name in saved.keys() & now.keys():
            if saved[name] != now[name] and not (cls is TrainArgs and name in RESUME_MAY_CHANGE):
                changed.append(f"{cls.__name__}.{name} {saved[name]!r} then, {now[name]!r} now")
    return sorted(changed)


def _warn_unused(layers: list[tuple[str, VarRankLoRALinear]]) -> None:
    """Warn of adapted layers the first step's backward gave no gradient: the model never called
    them (it reads their weight directly, as Mamba's x_proj and dt_proj), so their adapters train
    nothing."""
    unused = [name for name, m in layers if m.lora_B.grad is None]
    if unused:
        warnings.warn(f"train: {len(unused)} adapted layer(s) took no part in the forward pass, so "
                      f"their adapters get no gradient (the model reads their weight directly?): "
                      f"{', '.join(unused[:5])}; leave them out of target_modules", stacklevel=3)


def orthogonality_penalty(layers: list[tuple[str, VarRankLoRALinear]], weight: float) -> torch.Tensor:
    from .allocator import orthogonality_penalty as penalty
    return penalty([m for _, m in layers], weight)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="tsqlora train", unit="step", dynamic_ncols=True)


def save_result(result: TrainResult, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n"))
