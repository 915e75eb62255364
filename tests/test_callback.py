"""TsqLoRACallback inside a real transformers.Trainer with gradient accumulation."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tsqlora_ext.callback import ALLOCATOR_FILE, TsqLoRACallback  # noqa: E402
from tsqlora_ext.wrap import wrap  # noqa: E402

import train_worker as tw  # noqa: E402


def _collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([r["labels"] for r in rows])}


def _trainer(tmp_path, config, callback, max_steps, save_steps=0):
    data, _ = tw.tiny_task(n=128)
    rows = [{"input_ids": t, "labels": int(y)} for t, y in zip(data.token_ids, data.labels)]
    model = wrap(tw.tiny_bert(), config, verbose=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_steps=max_steps, learning_rate=5e-3, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, seed=0)
    return model, transformers.Trainer(model=model, args=args, train_dataset=rows,
                                       data_collator=_collate, callbacks=[callback])


def test_reallocation_runs_once_per_optimizer_step(tmp_path):
    torch.set_num_threads(1)
    config = tw.tiny_config(t_init=0, t_final=0, delta_t=1)
    cb = TsqLoRACallback()
    model, trainer = _trainer(tmp_path, config, cb, max_steps=8)
    substeps = []

    class Count(transformers.TrainerCallback):
        def on_substep_end(self, *a, **k):
            substeps.append(1)

    trainer.add_callback(Count())
    initial = {n: m.rank for n, m in model.named_modules() if hasattr(m, "lora_E")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a silent-no-reallocation warning would fail
        trainer.train()
    assert trainer.state.global_step == 8
    assert len(substeps) == 8  # gradient accumulation 2: one micro-step between optimizer steps
    # every optimizer step updated the sensitivity and (delta_t = 1) reallocated; no micro-step did
    assert cb.allocator_steps == 8 == cb.allocator.global_step
    assert cb.reallocations == trainer.state.global_step
    final = cb.allocator.ranks()
    b0, bT = cb.allocator.b0, cb.allocator.b_t
    assert sum(initial.values()) == b0 and sum(final.values()) == bT
    assert final != initial


def test_the_same_callback_registered_twice_is_named(tmp_path):
    # It updated the sensitivities twice per step, then blamed the transformers version for a
    # missing on_optimizer_step event.
    torch.set_num_threads(1)
    cb = TsqLoRACallback()
    _, trainer = _trainer(tmp_path, tw.tiny_config(t_init=0, t_final=0, delta_t=1), cb, max_steps=2)
    trainer.add_callback(cb)
    with pytest.raises(RuntimeError, match="the same callback is registered twice"):
        trainer.train()
    assert cb.allocator.global_step == 1  # stopped before the second update of the first step


def test_warns_when_schedule_leaves_no_reallocation(tmp_path):
    torch.set_num_threads(1)
    config = tw.tiny_config(t_init=3, t_final=0, delta_t=50)
    cb = TsqLoRACallback()
    _, trainer = _trainer(tmp_path, config, cb, max_steps=4)
    with pytest.warns(UserWarning, match="no periodic reallocation falls in the budget phase"):
        trainer.train()
    assert cb.reallocations == 1  # only the forced one at the end of the budget phase


def test_resume_from_a_checkpoint_continues_the_rank_schedule(tmp_path):
    torch.set_num_threads(1)
    config = tw.tiny_config(t_init=1, t_final=1, delta_t=2)
    full = TsqLoRACallback()
    _trainer(tmp_path, config, full, max_steps=8, save_steps=4)[1].train()
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / ALLOCATOR_FILE).is_file()

    resumed = TsqLoRACallback()
    _trainer(tmp_path, config, resumed, max_steps=8, save_steps=4)[1].train(
        resume_from_checkpoint=str(checkpoint))
    assert resumed.allocator.global_step == 8
    assert resumed.allocator.history == full.allocator.history
    assert resumed.allocator.ranks() == full.allocator.ranks()
    assert resumed.reallocations == full.reallocations

    # A checkpoint without the allocator's file (one written by an older version): the schedule
    # still continues from the checkpoint's step, with a warning that the scores start afresh.
    (checkpoint / ALLOCATOR_FILE).unlink()
    fresh = TsqLoRACallback()
    with pytest.warns(UserWarning, match=f"no {ALLOCATOR_FILE}"):
        _trainer(tmp_path, config, fresh, max_steps=8, save_steps=4)[1].train(
            resume_from_checkpoint=str(checkpoint))
    assert fresh.allocator.global_step == 8
    assert [h["step"] for h in fresh.allocator.history[1:]] == [6, 7]
    assert sum(fresh.allocator.ranks().values()) == sum(full.allocator.ranks().values())


def test_resume_refuses_an_allocator_of_another_run_or_schedule(tmp_path):
    # Trainer.train(resume_from_checkpoint=PATH) does not tell callbacks PATH, so the callback
    # reads output_dir/checkpoint-<step>: when that holds another run's allocator (its active sets
    # differ from the ones the Trainer restored with the model), or the resumed run follows
    # another schedule (max_steps changed), loading it would splice in a foreign state silently.
    from tsqlora_ext.checkpoint import atomic_save, load_checkpoint

    torch.set_num_threads(1)
    config = tw.tiny_config(t_init=1, t_final=1, delta_t=2)
    _trainer(tmp_path, config, TsqLoRACallback(), max_steps=8, save_steps=4)[1].train()
    checkpoint = tmp_path / "checkpoint-4"
    with pytest.raises(ValueError, match="another rank schedule: total_steps 8 .saved. vs 16"):
        _trainer(tmp_path, config, TsqLoRACallback(), max_steps=16, save_steps=4)[1].train(
            resume_from_checkpoint=str(checkpoint))

    saved = load_checkpoint(checkpoint / ALLOCATOR_FILE)
    name, ids = next(iter(saved["allocator"]["active"].items()))
    r_max = config.r_max
    saved["allocator"]["active"][name] = torch.tensor(
        [i for i in range(r_max) if i not in set(ids.tolist())][:max(1, len(ids))])
    atomic_save(saved, checkpoint / ALLOCATOR_FILE)
    with pytest.raises(ValueError, match="belongs to another run"):
        _trainer(tmp_path, config, TsqLoRACallback(), max_steps=8, save_steps=4)[1].train(
            resume_from_checkpoint=str(checkpoint))


def test_a_reused_callback_drives_the_new_model(tmp_path):
    # hyperparameter_search(model_init=...) and a second Trainer hand the same callback a new
    # model: the allocator of the first must not keep driving the first model's layers.
    torch.set_num_threads(1)
    config = tw.tiny_config(t_init=1, t_final=1, delta_t=2)
    callback = TsqLoRACallback()
    _trainer(tmp_path / "a", config, callback, max_steps=8)[1].train()
    first = callback.allocator
    model, trainer = _trainer(tmp_path / "b", config, callback, max_steps=8)
    trainer.train()
    assert callback.allocator is not first
    assert callback.allocator.global_step == 8 and callback.reallocations > 0
    layers = [m for m in model.modules() if m.__class__.__name__ == "VarRankLoRALinear"]
    assert sorted(id(m) for m in callback.allocator.layers.values()) == sorted(map(id, layers))
    assert len({m.rank for m in layers}) > 1  # this model's ranks moved


def test_checkpoint_folder_of_a_hyperparameter_search_trial(tmp_path):
    # In a hyperparameter search the Trainer writes checkpoints into output_dir/<run>/; the
    # callback, told neither, takes the newest checkpoint folder of the step.
    import os
    import types

    from tsqlora_ext.callback import _checkpoint_folder

    args, state = types.SimpleNamespace(output_dir=str(tmp_path)), types.SimpleNamespace(global_step=4)
    assert _checkpoint_folder(args, state) == str(tmp_path / "checkpoint-4")  # none written yet
    (tmp_path / "checkpoint-4").mkdir()
    assert _checkpoint_folder(args, state) == str(tmp_path / "checkpoint-4")
    os.utime(tmp_path / "checkpoint-4", (1_000_000, 1_000_000))
    (tmp_path / "run-1" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run-0" / "checkpoint-8").mkdir(parents=True)
    assert _checkpoint_folder(args, state) == str(tmp_path / "run-1" / "checkpoint-4")


def test_unwrapped_model_is_refused(tmp_path):
    data, _ = tw.tiny_task(n=16)
    rows = [{"input_ids": t, "labels": int(y)} for t, y in zip(data.token_ids, data.labels)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                                          use_cpu=True, save_strategy="no", disable_tqdm=True,
                                          remove_unused_columns=False)
    trainer = transformers.Trainer(model=tw.tiny_bert(), args=args, train_dataset=rows,
                                   data_collator=_collate, callbacks=[TsqLoRACallback()])
    with pytest.raises(ValueError, match="wrap it"):
        trainer.train()


def test_a_second_train_from_step_0_runs_a_new_schedule(tmp_path):
    # The finished allocator was kept: its schedule ran on past total_steps, ranks never moved
    # again, and the callback warned that no reallocation had happened.
    torch.set_num_threads(1)
    config = tw.tiny_config(t_init=1, t_final=1, delta_t=2)
    callback = TsqLoRACallback()
    _, trainer = _trainer(tmp_path, config, callback, max_steps=8)
    trainer.train()
    first = callback.allocator
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert callback.allocator is not first
    assert callback.allocator.global_step == 8 and callback.reallocations > 0
    # An allocator the user gave is not replaced behind their back.
    given = TsqLoRACallback(allocator=callback.allocator)
    trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                          if c is not callback] + [given]
    with pytest.raises(ValueError, match="the allocator it was given has run 8 optimizer steps, "
                                         "but the Trainer starts at step 0"):
        trainer.train()


def test_the_orthogonality_regularizer_is_added_to_the_loss_the_trainer_minimises(tmp_path):
    # It was ignored under the Trainer: orth_reg_weight 0 and 10 trained identically.
    from tsqlora_ext.allocator import orthogonality_penalty

    torch.set_num_threads(1)
    losses = {}
    for weight in (0.0, 0.5):
        # Fixed ranks: one step leaves no room for a rank schedule, and the test needs none.
        config = tw.tiny_config(orth_reg_weight=weight, dynamic=False)
        model, trainer = _trainer(tmp_path / str(weight), config, TsqLoRACallback(), max_steps=1)
        layers = [m for m in model.modules() if m.__class__.__name__ == "VarRankLoRALinear"]
        penalty = orthogonality_penalty(layers, 0.5).item()
        with pytest.warns(UserWarning, match="config.dynamic is False"):
            losses[weight] = trainer.train().training_loss
    # One optimizer step: both micro-batches see the initial adapters, so each forward's loss
    # carries the same penalty. The Trainer sums the 2 micro-batch losses and divides by 2 unless
    # the model takes num_items_in_batch (then it leaves the scaling to the model, as it does for
    # the model's own loss).
    assert penalty > 0.1
    micro = 2 if trainer.model_accepts_loss_kwargs else 1
    assert losses[0.5] - losses[0.0] == pytest.approx(micro * penalty, rel=1e-4)
    # Label smoothing makes the Trainer compute the loss outside the model: refused, not ignored.
    _, trainer = _trainer(tmp_path / "smooth", config, TsqLoRACallback(), max_steps=1)
    trainer.args.label_smoothing_factor = 0.1
    trainer.label_smoother = transformers.trainer_pt_utils.LabelSmoother(epsilon=0.1)
    with pytest.raises(RuntimeError, match="orth_reg_weight is 0.5 but the model's output holds no loss"), \
            pytest.warns(UserWarning, match="config.dynamic is False"):
        trainer.train()
