"""TsqLoRACallback: dynamic rank reallocation inside a ``transformers.Trainer``.

PEFT's AdaLoRA asks the user to call ``update_and_allocate`` by hand inside a custom training
loop; with a stock Trainer it is easy to forget, and then ranks silently never move. This
callback does the work at the one correct moment and refuses to be silent about it:

- ``on_optimizer_step`` (after ``optimizer.step()``, before the gradients are zeroed, once per
  optimizer step and never on a gradient-accumulation micro-step) runs ``allocator.step()``:
  the sensitivity update from the current gradients and, every delta_t steps, reallocation;
- ``on_train_begin`` builds the allocator when none was given (``total_steps`` from the
  Trainer's ``max_steps``), checks that the model is wrapped and that the schedule leaves room
  for at least one reallocation, and holds inactive components still in the Trainer's optimizer
  (``protect_inactive``);
- ``on_save`` writes the allocator's state (EMAs, scores, step, history) into the checkpoint
  folder the Trainer has just written, and ``on_train_begin`` of a run resumed from that
  checkpoint loads it back, so the rank schedule continues where it stopped instead of
  restarting at step 0;
- with ``orth_reg_weight`` > 0, a forward hook adds the orthogonality regularizer to the loss
  the model returns in training, as PEFT's ``AdaLoraModel.forward`` does;
- ``on_step_end`` checks that ``on_optimizer_step`` really ran for that step (a Trainer too old to
  emit the event fails loudly instead of training at fixed rank), and when the budget phase has
  ended without a single reallocation it warns once, saying why.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint import atomic_save, load_checkpoint
from .config import TsqLoRAConfig
from .layers import protect_inactive
from .train import lora_layers

# The allocator's state in each Trainer checkpoint folder (written by on_save, read on resume).
ALLOCATOR_FILE = "tsqlora_allocator.pt"


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DistributedDataParallel / accelerate wrappers
    return model


def _checkpoint_folder(args, state) -> str:
    """The folder of the current step's checkpoint: output_dir/checkpoint-<step>, or in a
    hyperparameter search the same name inside the trial's run folder (output_dir/<run>/), which
    callbacks are not told. The Trainer has just written it, so the newest such folder is it."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    found = [path for path in (os.path.join(args.output_dir, name),
                               *glob.glob(os.path.join(glob.escape(args.output_dir), "*", name)))
             if os.path.isdir(path)]
    return max(found, key=os.path.getmtime) if found else os.path.join(args.output_dir, name)


class TsqLoRACallback(TrainerCallback):
    """Pass to ``Trainer(callbacks=[TsqLoRACallback()])`` with a ``tsqlora_ext.wrap``-ed model.

    Args:
        allocator: a RankAllocator (one is built on train begin when None).
        config: the TsqLoRAConfig for that allocator; the model's own (``model.tsqlora_config``)
            when None.

    After training, ``allocator_steps`` (sensitivity updates, one per optimizer step of this
    ``train()`` call), ``reallocations`` (including those before a resumed checkpoint) and
    ``allocator.history`` say what happened.
    """

    def __init__(self, allocator=None, config: TsqLoRAConfig | None = None) -> None:
        self.allocator = allocator
        self.config = config
        # What the user gave: a callback reused for another model (hyperparameter_search's
        # model_init, a second Trainer) builds its allocator anew from these.
        self._given_allocator, self._given_config = allocator, config
        self.allocator_steps = 0
        self.reallocations = 0
        self._guard = None
        self._penalty_hook = None
        self._warned = False

    # ---- helpers -------------------------------------------------------------------------------
    def _budget_end(self) -> int:
        return self.config.total_steps - self.config.t_final

    def _restore(self, args, state) -> None:
        """Load the allocator state saved with the checkpoint this run resumes from."""
        # Trainer.train(resume_from_checkpoint=...) does not tell callbacks which folder it
        # loaded; its folders are named after the step, which the loaded state carries.
        folder = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) \
            else _checkpoint_folder(args, state)
        path = os.path.join(folder, ALLOCATOR_FILE)
        elsewhere = ("; Trainer.train(resume_from_checkpoint=PATH) does not tell callbacks PATH, "
                     "so for a checkpoint outside output_dir set TrainingArguments("
                     "resume_from_checkpoint=PATH) too")
        if not os.path.isfile(path):
            warnings.warn(f"TsqLoRACallback: resuming at step {state.global_step} but there is no "
                          f"{ALLOCATOR_FILE} in {folder} (a checkpoint written without it, or one "
                          "elsewhere): the rank schedule continues from that step, but the "
                          "sensitivity scores start afresh and the rank history before it is lost"
                          + elsewhere, stacklevel=3)
            self.allocator.global_step = state.global_step
            return
        saved = load_checkpoint(path)
        if saved["step"] != state.global_step:
            raise ValueError(f"TsqLoRACallback: {path} holds the allocator of step {saved['step']} "
                             f"but the Trainer resumes at step {state.global_step}: resume from "
                             "the checkpoint folder it belongs to" + elsewhere)
        # The Trainer has restored the model from the checkpoint it resumes, active sets
        # included; an allocator saved with another run's checkpoint would replace them.
        differ = [name for name, m in self.allocator.layers.items()
                  if not torch.equal(saved["allocator"]["active"].get(name, torch.empty(0)).cpu(),
                                     m.active.cpu())]
        if differ:
            raise ValueError(f"TsqLoRACallback: {path} belongs to another run: its active sets "
                             f"differ from those of the checkpoint the Trainer resumed ({differ[0]} "
                             f"and {len(differ) - 1} other layer(s))" + elsewhere)
        self.allocator.load_state_dict(saved["allocator"])
        self.reallocations = saved["reallocations"]

    # ---- events --------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from .allocator import RankAllocator

        model = _unwrap(model)
        layers = {id(m) for _, m in lora_layers(model)}
        if not layers:
            raise ValueError("TsqLoRACallback: the model has no VarRankLoRALinear layer; wrap it "
                             "first with tsqlora_ext.wrap(model, config)")
        if self.allocator is not None and {id(m) for m in self.allocator.layers.values()} != layers:
            if self._given_allocator is not None:
                raise ValueError("TsqLoRACallback: the allocator it was given drives another "
                                 "model's layers than the Trainer's model")
            # This callback trained another model before (a second Trainer, or
            # hyperparameter_search's model_init): that model's allocator must not drive this one.
            self.allocator, self.config = None, self._given_config
        if self.allocator is not None and state.global_step == 0 and self.allocator.global_step > 0:
            # A second trainer.train() from step 0: the finished schedule would not restart.
            if self._given_allocator is not None:
                raise ValueError(f"TsqLoRACallback: the allocator it was given has run "
                                 f"{self.allocator.global_step} optimizer steps, but the Trainer "
                                 "starts at step 0: give it a new RankAllocator, or resume the "
                                 "Trainer from its checkpoint")
            self.allocator, self.config = None, self._given_config
        if self.allocator is None:
            config = self.config or getattr(model, "tsqlora_config", None) or TsqLoRAConfig()
            if config.total_steps is None:
                config = config.replace(total_steps=state.max_steps)
            self.config = config
            self.allocator = RankAllocator(model, config)
        else:
            if self.allocator.config.total_steps is None:
                self.allocator.set_total_steps(state.max_steps)
            self.config = self.allocator.config
        cfg = self.config
        if not cfg.dynamic:
            warnings.warn("TsqLoRACallback: config.dynamic is False, so ranks stay fixed; drop "
                          "the callback or set dynamic=True", stacklevel=2)
        elif cfg.total_steps != state.max_steps:
            warnings.warn(f"TsqLoRACallback: the rank schedule spans total_steps={cfg.total_steps} "
                          f"optimizer steps but the Trainer will run {state.max_steps}", stacklevel=2)
        first = cfg.t_init + cfg.delta_t
        if cfg.dynamic and first > min(state.max_steps, cfg.total_steps - cfg.t_final):
            warnings.warn(f"TsqLoRACallback: no periodic reallocation falls in the budget phase "
                          f"(the first would come at step {first} = t_init {cfg.t_init} + delta_t "
                          f"{cfg.delta_t}; the phase ends at step {cfg.total_steps - cfg.t_final} of "
                          f"{state.max_steps}): ranks jump once to the final budget and never follow "
                          "sensitivity; lower t_init / delta_t / t_final", stacklevel=2)
        self.allocator_steps = 0
        self.reallocations = 0
        if state.global_step > 0:
            self._restore(args, state)
        if optimizer is not None:
            # accelerate wraps the optimizer; its step() calls the inner one, where hooks live.
            while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
                optimizer = optimizer.optimizer
            self._guard = protect_inactive(optimizer, model)
        if cfg.orth_reg_weight > 0:
            self._penalty_hook = model.register_forward_hook(self._add_penalty)
        self._seen_step = state.global_step

    def _add_penalty(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return None
        loss = output.get("loss") if isinstance(output, dict) else None
        if not isinstance(loss, torch.Tensor):
            raise RuntimeError(
                f"TsqLoRACallback: orth_reg_weight is {self.config.orth_reg_weight} but the "
                "model's output holds no loss (the Trainer computes it outside the model: label "
                "smoothing, compute_loss_func, or a batch without labels), so the orthogonality "
                "regularizer cannot be added to it; add callback.allocator.orthogonality_penalty() "
                "to that loss, or set orth_reg_weight=0")
        output["loss"] = loss + self.allocator.orthogonality_penalty().to(loss.device)
        return output

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.config.dynamic:
            return
        # (The Trainer counts the step in state.global_step after this event.)
        if self.allocator_steps > state.global_step - self._seen_step:
            raise RuntimeError(
                "TsqLoRACallback: on_optimizer_step came twice for one optimizer step: the same "
                "callback is registered twice (Trainer(callbacks=[cb]) and trainer.add_callback(cb)?), "
                "which would update the sensitivities twice per step")
        if self.allocator.step() is not None:
            self.reallocations += 1
        self.allocator_steps += 1

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = _checkpoint_folder(args, state)
            atomic_save({"step": state.global_step, "allocator": self.allocator.state_dict(),
                         "reallocations": self.reallocations}, os.path.join(folder, ALLOCATOR_FILE))

    def on_step_end(self, args, state, control, **kwargs):
        if self.config.dynamic and self.allocator_steps < state.global_step - self._seen_step:
            raise RuntimeError(
                f"TsqLoRACallback: {state.global_step - self._seen_step} optimizer steps but "
                f"{self.allocator_steps} sensitivity updates; this Trainer does not emit "
                "on_optimizer_step (transformers >= 4.41 does), so ranks would never move")
        if (self.config.dynamic and not self._warned and self.reallocations == 0
                and state.global_step >= self._budget_end()):
            self._warned = True
            warnings.warn(
                f"TsqLoRACallback: the budget phase ended at step {state.global_step} without a "
                f"single reallocation (t_init={self.config.t_init}, delta_t={self.config.delta_t}, "
                f"t_final={self.config.t_final}, total_steps={self.config.total_steps}); ranks "
                "stayed at their initial values", stacklevel=2)

    def on_train_end(self, args, state, control, **kwargs):
        if self.config.dynamic and not self._warned and self.reallocations == 0:
            self._warned = True
            warnings.warn(f"TsqLoRACallback: training ended after {state.global_step} steps "
                          "without a single reallocation; ranks never moved", stacklevel=2)
        for handle in (self._guard, self._penalty_hook):
            if handle is not None:
                handle.remove()
        self._guard = self._penalty_hook = None
