"""The training loop on a tiny seeded task: ranks really move, the budget schedule holds at every
reallocation, rank work happens once per optimizer step, metrics are right."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from tsqlora_ext.allocator import RankAllocator, budget_schedule  # noqa: E402
from tsqlora_ext.checkpoint import CheckpointManager  # noqa: E402
from tsqlora_ext.train import (TokenizedData, TrainArgs, classification_metrics,  # noqa: E402
                               evaluate, lora_layers, train)
from tsqlora_ext.wrap import wrap  # noqa: E402

import train_worker as tw  # noqa: E402


def _args(**kw):
    base = dict(lr=5e-3, batch_size=16, progress=False, num_workers=1)
    base.update(kw)
    return TrainArgs(**base)


def test_ranks_move_and_budget_schedule_holds(device):
    torch.set_num_threads(1)
    train_data, eval_data = tw.tiny_task()
    config = tw.tiny_config()
    model = wrap(tw.tiny_bert(), config, verbose=False).to(device)
    steps = 16
    config = config.replace(total_steps=steps)
    alloc = RankAllocator(model, config)
    seen = []
    result = train(model, train_data, eval_data, config, _args(max_steps=steps), allocator=alloc,
                   on_step=lambda step, rec: seen.append((step, rec["total_rank"])))
    b0, bT = alloc.b0, alloc.b_t
    end = steps - config.t_final
    expected = [t for t in range(1, steps + 1)
                if t <= end and (t == end or (t > config.t_init and t % config.delta_t == 0))]
    # one allocator step per optimizer step; reallocation exactly on the schedule's steps
    assert result.optimizer_steps == steps == alloc.global_step
    assert result.reallocations == len(expected)
    realloc_steps = [h["step"] for h in result.rank_history[1:]]
    assert realloc_steps == expected
    for h in result.rank_history[1:]:
        want = budget_schedule(h["step"], b0, bT, config.t_init, config.t_final, steps)
        assert sum(h["ranks"].values()) == h["budget"] == want
    # between reallocations the total rank stays put, and it ends at the final budget
    ranks_at = dict(seen)
    assert ranks_at[steps] == bT
    assert all(ranks_at[t] == b0 for t in range(1, config.t_init + 1))
    # ranks really moved between layers, not only shrank uniformly
    initial = result.rank_history[0]["ranks"]
    assert len({result.final_ranks[n] - initial[n] for n in initial}) > 1
    assert result.metrics["n"] == len(eval_data) and 0 <= result.metrics["accuracy"] <= 1


def test_grad_accumulation_counts_optimizer_steps():
    torch.set_num_threads(1)
    train_data, _ = tw.tiny_task(n=128)
    config = tw.tiny_config()
    forwards, steps = {}, {}
    for accum in (1, 2):
        model = wrap(tw.tiny_bert(), config, verbose=False)
        calls = []
        model.register_forward_pre_hook(lambda m, a: calls.append(1))
        result = train(model, train_data, None, config,
                       _args(max_steps=6, grad_accum=accum, batch_size=8),
                       on_step=lambda s, r: steps.setdefault(accum, []).append(s))
        forwards[accum] = len(calls)
        assert result.optimizer_steps == 6 and steps[accum] == [1, 2, 3, 4, 5, 6]
        assert result.rank_history[-1]["step"] <= 6 and len(result.loss_history) == 6
    # 6 optimizer steps are 6 micro-batches without accumulation and 12 with 2 per step (whatever
    # else runs the model, e.g. the sensitivity calibration, runs it as often in both).
    assert forwards[2] - forwards[1] == 6


def test_training_learns_the_tiny_task(device):
    torch.set_num_threads(1)
    train_data, eval_data = tw.tiny_task(n=512)
    config = tw.tiny_config(dynamic=False, sensitivity_init=False)
    model = wrap(tw.tiny_bert(), config, verbose=False).to(device)
    before = classification_metrics(np.zeros(len(eval_data), dtype=np.int64), eval_data.labels, 2)
    result = train(model, train_data, eval_data, config, _args(epochs=3, lr=1e-2))
    losses = [h["loss"] for h in result.loss_history]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert result.metrics["accuracy"] > before["accuracy"]
    assert len(result.eval_history) == 3  # one evaluation per epoch


class _PoisonLoss:
    """A forward hook on the classifier that makes the logits NaN on the chosen forward calls."""

    def __init__(self, calls):
        self.calls, self.n = set(calls), 0

    def __call__(self, module, inputs, output):
        self.n += 1
        return output * float("nan") if self.n in self.calls else output


def test_a_step_with_nan_gradients_is_skipped_whole():
    torch.set_num_threads(1)
    train_data, _ = tw.tiny_task(n=128)
    config = tw.tiny_config()
    model = wrap(tw.tiny_bert(), config, verbose=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    seen = {}

    def snapshot(step, rec):
        seen[step] = {n: p.detach().clone() for n, p in trainable.items()}
    # Forward calls 1-2 are the sensitivity calibration; step k's forward is call k + 2.
    model.classifier.register_forward_hook(_PoisonLoss({2 + 4}))
    result = train(model, train_data, None, config, _args(max_steps=6, batch_size=16), on_step=snapshot)
    assert result.optimizer_steps == 6 and result.skipped_steps == 1
    assert all(torch.equal(seen[4][n], seen[3][n]) for n in trainable)  # step 4 changed nothing
    assert not all(torch.equal(seen[5][n], seen[4][n]) for n in trainable)  # step 5 trained again
    assert all(torch.isfinite(p).all() for p in trainable.values())
    assert not np.isfinite(result.loss_history[3]["grad_norm"])
    assert np.isfinite([h["grad_norm"] for h in result.loss_history if h["step"] != 4]).all()


def test_persistent_nan_gradients_stop_with_an_error_and_keep_the_checkpoints(tmp_path):
    torch.set_num_threads(1)
    train_data, _ = tw.tiny_task(n=128)
    config = tw.tiny_config()
    model = wrap(tw.tiny_bert(), config, verbose=False)
    model.classifier.register_forward_hook(_PoisonLoss(range(2 + 3, 100)))  # from step 3 on
    ckpt = tmp_path / "ckpt"
    args = _args(max_steps=8, max_nonfinite_steps=3, checkpoint_dir=str(ckpt), checkpoint_every=1)
    active = {}

    def keep_step_2(step, _):
        if step == 2:
            active.update({n: m.active_indices() for n, m in lora_layers(model)})
    with pytest.raises(FloatingPointError, match=r"optimizer steps 3 to 5 all had NaN/inf gradients"
                                                 r".*holds step 2's parameters.*max_nonfinite_steps \(3\)"):
        train(model, train_data, None, config, args, on_step=keep_step_2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Its active sets too: the reallocation due at step 4 (a skipped step) did not run.
    assert all(torch.equal(m.active_indices(), active[n]) for n, m in lora_layers(model))
    _, state = CheckpointManager(ckpt).latest()
    assert state["step"] == 4 and state["skipped_steps"] == 2

    # Resumed after those two NaN steps in a row, the run stops at the same step with the same
    # message: the count of steps in a row is part of the checkpoint.
    model = wrap(tw.tiny_bert(), config, verbose=False)
    model.classifier.register_forward_hook(_PoisonLoss(range(1, 100)))  # every step NaN
    with pytest.raises(FloatingPointError, match=r"optimizer steps 3 to 5 all had NaN/inf gradients"
                                                 r".*holds step 2's parameters"):
        train(model, train_data, None, config, args, resume=ckpt)


def test_checkpoints_of_another_run_are_refused(tmp_path):
    torch.set_num_threads(1)
    train_data, _ = tw.tiny_task(n=64)
    config = tw.tiny_config(t_init=0, t_final=0, delta_t=1)
    ckpt = tmp_path / "ckpt"

    def run(cfg=config, resume=None, **kw):
        args = _args(max_steps=2, checkpoint_dir=str(ckpt), checkpoint_every=1, **kw)
        return train(wrap(tw.tiny_bert(), cfg, verbose=False), train_data, None, cfg, args,
                     resume=resume)

    run()
    before = sorted(p.name for p in ckpt.iterdir())
    # A new run into that folder would prune its own checkpoints and leave the old run's newer
    # ones for a resume to pick up.
    with pytest.raises(ValueError, match=rf"checkpoint_dir {ckpt} already holds checkpoints .*"
                                         r"up to step 2.*resume=.*another checkpoint_dir"):
        run()
    assert sorted(p.name for p in ckpt.iterdir()) == before
    with pytest.raises(ValueError, match=r"other settings: TrainArgs.lr 0.005 then, 0.0001 now; "
                                         r"TsqLoRAConfig.delta_t 1 then, 2 now"):
        run(config.replace(delta_t=2), resume=ckpt, lr=1e-4)
    # What does not change the remaining steps may differ (max_nonfinite_steps: the stop rule).
    assert run(resume=ckpt, max_nonfinite_steps=4, progress=True).optimizer_steps == 2
    # Every checkpoint cut short: said so, not "no checkpoint".
    for p in ckpt.glob("step-*.ckpt"):
        p.write_bytes(p.read_bytes()[:20])
    with pytest.warns(UserWarning, match="could not be read"), pytest.raises(
            ValueError, match=rf"resume: none of the 2 checkpoint\(s\) in {ckpt} can be read"):
        run(resume=ckpt)


def test_pretokenized_data_pads_with_the_models_pad_id():
    """Without a tokenizer, batches are padded with model.config.pad_token_id: a decoder
    classifier reads each row at its last token before that id, so padding with 0 made it
    classify short rows from a padding position."""
    import transformers as tf

    torch.set_num_threads(1)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=60)
    torch.manual_seed(0)
    config = tw.tiny_config(t_init=0, t_final=0, delta_t=1, calibration_batches=1)
    model = wrap(tf.LlamaForSequenceClassification(cfg), config, verbose=False)
    short = TokenizedData([[5, 7, 9]], np.array([1]))
    train_data = TokenizedData([[5, 7, 9], list(range(1, 20))] * 4, np.array([1, 0] * 4))
    result = train(model, train_data, short, config, _args(max_steps=1, batch_size=4))
    with torch.no_grad():
        alone = float(model(input_ids=torch.tensor([[5, 7, 9]]), labels=torch.tensor([1])).loss)
    assert result.metrics["loss"] == pytest.approx(alone, rel=1e-5)
    assert evaluate(model, short, num_workers=1)["loss"] == pytest.approx(alone, rel=1e-5)


def test_a_checkpoint_of_an_earlier_version_with_an_infinite_setting_resumes():
    # Its config holds mislabel_max_spread as the float inf, today's to_dict writes "inf": resume
    # refused it as another setting ("inf then, 'inf' now").
    from tsqlora_ext.train import _changed_settings
    config, args = tw.tiny_config(mislabel_max_spread=float("inf")), _args()
    state = {"args": args.to_dict(), "config": {**config.to_dict(), "mislabel_max_spread": float("inf")}}
    assert _changed_settings(state, config, args) == []
    state["config"]["mislabel_max_spread"] = 0.5
    assert _changed_settings(state, config, args) == ["TsqLoRAConfig.mislabel_max_spread 0.5 then, 'inf' now"]


def test_classification_metrics_macro_f1():
    preds = np.array([0, 1, 2, 2, 1, 0])
    labels = np.array([0, 1, 2, 1, 1, 2])
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: c0 2/3 (tp1 fp1 fn0), c1 0.8 (tp2 fp0 fn1), c2 0.5 (tp1 fp1 fn1)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.5) / 3)
    assert "macro_f1" not in classification_metrics(preds % 2, labels % 2, 2)
    # A class in neither the labels nor the predictions has no F1 (it counted as 0: 2 of 3).
    assert classification_metrics(np.array([0, 1]), np.array([0, 1]), 3)["macro_f1"] == 1.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        TrainArgs(lr=0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainArgs(checkpoint_every=5)
    # Built directly, not from a dict: these passed (2.5 failed deep inside the loader, NaN
    # turned clipping off).
    for kw, message in [({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
                        ({"max_steps": True}, "max_steps must be an integer, got True"),
                        ({"num_workers": -1}, "num_workers must be >= 0"),
                        ({"max_grad_norm": float("nan")}, "max_grad_norm must be a number >= 0"),
                        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=f"TrainArgs: {message}"):
            TrainArgs(**kw)
    with pytest.raises(ValueError, match="TsqLoRAConfig: r_init must be an integer, got 12.5"):
        tw.tiny_config(r_init=12.5)
    assert type(TrainArgs(max_steps=np.int64(3)).max_steps) is int
    model = wrap(tw.tiny_bert(), tw.tiny_config(), verbose=False)
    with pytest.raises(TypeError, match="train_data"):
        train(model, "not data", None, tw.tiny_config(), _args(max_steps=1))
    with pytest.raises(ValueError, match="tokenizer"):
        train(model, (["a b c"], [0]), None, tw.tiny_config(), _args(max_steps=1))
    train_data, _ = tw.tiny_task(n=32)
    with pytest.raises(ValueError, match="eval_data: no examples to tokenize"):
        train(model, train_data, ([], []), tw.tiny_config(), _args(max_steps=1), tokenizer=object())
    with pytest.raises(ValueError, match="evaluate: data holds no examples"):
        evaluate(model, TokenizedData([], np.zeros(0, dtype=np.int64)))
    # Refused before training, not at the first evaluation after an epoch of it.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="eval_data: holds no examples"):
        train(model, train_data, TokenizedData([], []), tw.tiny_config(), _args(max_steps=1))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="3 token rows but 4 labels"):
        TokenizedData(train_data.token_ids[:3], [0, 1, 0, 1])


def test_a_model_with_merged_adapters_is_refused_before_any_work():
    # A merged layer's forward is the base GEMM alone: scoring silently left the adapters out of
    # G, and training failed only at calibration, from set_active.
    from tsqlora_ext.quality import score_pool, warmup

    config = tw.tiny_config()
    model = wrap(tw.tiny_bert(), config, verbose=False)
    first = next(m for m in model.modules() if hasattr(m, "merge"))
    first.merge()
    train_data, _ = tw.tiny_task(n=16)
    pool = {"input_ids": torch.ones(4, 5, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long)}
    for who, call in [("train", lambda: train(model, train_data, None, config, TrainArgs(max_steps=1, progress=False))),
                      ("RankAllocator", lambda: RankAllocator(model, config)),
                      ("quality score", lambda: score_pool(model, [{**pool, "index": torch.arange(4)}], progress=False)),
                      ("warmup", lambda: warmup(model, torch.optim.SGD(model.parameters(), lr=0.1), pool, 1,
                                                progress=False))]:
        with pytest.raises(ValueError, match=rf"{who}: 1 adapted layer\(s\) are merged .* unmerge\(\) them first"):
            call()
    first.unmerge()
    RankAllocator(model, config)


def test_labels_given_as_a_list_bools_or_a_tensor_train_and_evaluate():
    # They passed the label check and the loader, and evaluation then failed after an epoch.
    model = wrap(tw.tiny_bert(), tw.tiny_config(), verbose=False)
    train_data, eval_data = tw.tiny_task(n=32)
    ids = eval_data.token_ids
    for labels in (list(map(int, eval_data.labels)), [bool(y) for y in eval_data.labels],
                   torch.as_tensor(eval_data.labels)):
        data = TokenizedData(ids, labels)
        np.testing.assert_array_equal(data.labels, eval_data.labels)
        assert data.labels.dtype == np.int64
        assert evaluate(model, data) == evaluate(model, eval_data)


def test_labels_outside_the_head_are_refused_before_training():
    # An eval label out of range failed inside the loss at the first evaluation, after an epoch
    # of training; -100 was ignored by the loss and counted wrong by accuracy; 0.7 became 0.
    model = wrap(tw.tiny_bert(), tw.tiny_config(), verbose=False)
    train_data, eval_data = tw.tiny_task(n=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cases = [
        ("eval_data", [0, 1, 7], r"eval_data row 2: label 7 is not a class of the model \(1 such "
                                 r"row\(s\)\); its head has config.num_labels = 2"),
        ("train_data", [-100, 1, 0], r"train_data row 0: label -100 is not a class"),
    ]
    for which, labels, message in cases:
        bad = TokenizedData(train_data.token_ids[:3], np.asarray(labels))
        data = {"train_data": bad if which == "train_data" else train_data,
                "eval_data": bad if which == "eval_data" else eval_data}
        with pytest.raises(ValueError, match=message):
            train(model, data["train_data"], data["eval_data"], tw.tiny_config(), _args(max_steps=1))
    with pytest.raises(ValueError, match=r"evaluate: data row 2: label 7"):
        evaluate(model, TokenizedData(train_data.token_ids[:3], np.array([0, 1, 7])))
    # What is no class id at all is refused where the data is built, or named by train.
    for labels, message in (([0.0, 0.7, 1.0], r"label of row 1 is 0.7, not an integer class id"),
                            (["neg", "pos", "neg"], r"labels must be integer class ids, got 'neg' in row 0"),
                            ([0, 1, "pos"], r"labels must be integer class ids, got 'pos' in row 2")):
        with pytest.raises(ValueError, match=message):
            TokenizedData(train_data.token_ids[:3], np.asarray(labels))
        with pytest.raises(ValueError, match="train_data: " + message):
            train(model, (["a", "b", "c"], labels), None, tw.tiny_config(), _args(max_steps=1),
                  tokenizer=lambda *a, **k: {"input_ids": [[1], [2], [3]]})
    with pytest.raises(ValueError, match=r"train_data: labels must be one class id per example, got "
                                         r"an array of shape \(2, 1\)"):
        train(model, (["a b", "c d"], [[0], [1]]), None, tw.tiny_config(), _args(max_steps=1),
              tokenizer=lambda *a, **k: {"input_ids": [[1, 2], [3, 4]]})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_schedule_longer_or_shorter_than_the_run_warns_and_another_wrap_config_is_refused():
    torch.set_num_threads(1)
    train_data, _ = tw.tiny_task(n=64)
    config = tw.tiny_config()
    with pytest.warns(UserWarning, match=r"the rank schedule spans total_steps=100 optimizer steps "
                                         r"but this run makes 4: the budget would reach target_r "
                                         r"at step 98, so the ranks end above it"):
        result = train(wrap(tw.tiny_bert(), config, verbose=False), train_data, None,
                       config.replace(total_steps=100), _args(max_steps=4))
    assert sum(result.final_ranks.values()) > config.target_r * len(result.final_ranks)
    # The layers were built from r_init 4 (scaling 8 / 4): a budget of r_init 2 would not fit them.
    model = wrap(tw.tiny_bert(), config, verbose=False)
    with pytest.raises(ValueError, match=r"train: the config differs from the one the model "
                                         r"was wrapped with .*: r_init 4 there, 2 here"):
        train(model, train_data, None, config.replace(r_init=2, target_r=1), _args(max_steps=6))
    # Also when no allocator is built, which used to be the only place that checked.
    fixed = config.replace(dynamic=False, sensitivity_init=False)
    with pytest.raises(ValueError, match=r"train: .*: r_max 6 there, 16 here; lora_alpha 8.0 there, 64"):
        train(model, train_data, None, fixed.replace(r_max=16, lora_alpha=64.0), _args(max_steps=6))
    # Fields that do not shape the layers may differ.
    train(model, train_data, None, config.replace(target_r=1, delta_t=1), _args(max_steps=6))


def test_the_loss_history_records_the_rate_each_step_used():
    train_data, _ = tw.tiny_task(n=64)
    rates = []
    model = wrap(tw.tiny_bert(), tw.tiny_config(), verbose=False)
    optimizer_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return optimizer_step(self, *a, **k)
    torch.optim.AdamW.step = spy
    try:
        result = train(model, train_data, None, tw.tiny_config(), _args(max_steps=6, warmup_ratio=0.5))
    finally:
        torch.optim.AdamW.step = optimizer_step
    assert [h["lr"] for h in result.loss_history] == rates and len(set(rates)) == len(rates)


# ---- bf16 autocast ------------------------------------------------------------------------------
def test_varrank_lora_under_cpu_autocast_matches_float32():
    from tsqlora_ext.layers import VarRankLoRALinear

    torch.manual_seed(0)
    layer = VarRankLoRALinear(torch.nn.Linear(24, 20), r_max=6, r_init=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide the adapter path
    layer.set_active(torch.tensor([0, 2, 3, 5]))
    x = torch.randn(3, 7, 24)
    grads = {}
    for mode in ("fp32", "bf16"):
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            y = layer(x)
        assert y.dtype == (torch.bfloat16 if mode == "bf16" else torch.float32)
        (y.float() ** 2).mean().backward()
        grads[mode] = (y.detach().float(), {n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    (y32, g32), (y16, g16) = grads["fp32"], grads["bf16"]
    torch.testing.assert_close(y16, y32, rtol=3e-2, atol=3e-2)
    for name, g in g16.items():
        assert g.dtype == torch.float32, name  # float32 parameters keep float32 gradients
        torch.testing.assert_close(g, g32[name], rtol=5e-2, atol=5e-2, msg=name)


def test_bf16_training_on_cpu_learns_and_moves_ranks():
    torch.set_num_threads(1)
    train_data, eval_data = tw.tiny_task(n=512)
    config = tw.tiny_config(t_init=4, t_final=4, delta_t=4)
    model = wrap(tw.tiny_bert(), config, verbose=False)
    result = train(model, train_data, eval_data, config, _args(epochs=2, lr=1e-2, bf16="on"))
    losses = np.array([h["loss"] for h in result.loss_history])
    assert np.isfinite(losses).all() and np.isfinite(result.metrics["loss"])
    assert losses[-10:].mean() < losses[:10].mean() - 0.02
    assert result.reallocations > 0
    initial = result.rank_history[0]["ranks"]
    assert len({result.final_ranks[n] - initial[n] for n in initial}) > 1
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_compiled_model_trains_with_calibration_and_keeps_its_names():
    # Calibration's hooked forward of a compiled transformers model returned no loss
    # (AttributeError), and the result's layer names carried "_orig_mod.". And every reallocation
    # recompiled the model (7 frames after 7 reallocations; now the 2 of the first step).
    from torch._dynamo.testing import CompileCounter
    torch.set_num_threads(1)
    torch._dynamo.reset()
    train_data, _ = tw.tiny_task(n=64)
    counter = CompileCounter()
    model = torch.compile(wrap(tw.tiny_bert(), tw.tiny_config(), verbose=False), backend=counter)
    result = train(model, train_data, None, tw.tiny_config(), _args(max_steps=18, batch_size=16))
    assert result.optimizer_steps == 18 and result.reallocations >= 5
    assert counter.frame_count < result.reallocations
    assert not any(n.startswith("_orig_mod") for n in result.final_ranks)
    assert set(result.rank_history[-1]["ranks"]) == set(result.final_ranks)


def test_a_decoder_without_a_pad_token_trains_padded_batches():
    # LLaMA, Mistral and Qwen2 ship without one: transformers refused batches larger than 1.
    import transformers as tf
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, max_position_embeddings=32, num_labels=2,
        pad_token_id=None, eos_token_id=2))
    train_data, _ = tw.tiny_task(n=32)
    config = tw.tiny_config(sensitivity_init=False)
    result = train(wrap(model, config, verbose=False), train_data, None, config,
                   _args(max_steps=6, batch_size=8))
    assert result.optimizer_steps == 6 and model.config.pad_token_id == 2


def test_a_layer_the_model_never_calls_is_named():
    # A model that reads an adapted layer's weight directly (Mamba's x_proj) bypasses its adapter.
    import types
    torch.set_num_threads(1)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.used, self.read = nn.Embedding(64, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.classifier = nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask, labels):
            x = self.emb(input_ids).mean(1)
            logits = self.classifier(self.used(x) + x @ self.read.weight.T)
            return types.SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))

    config = tw.tiny_config(target_modules=["used", "read"], sensitivity_init=False)
    model = wrap(Odd(), config, verbose=False)
    with pytest.warns(UserWarning, match=r"1 adapted layer\(s\) took no part in the forward pass.*: read;"):
        train(model, tw.tiny_task(n=32)[0], None, config, _args(max_steps=6, batch_size=8))


def test_a_fraction_of_an_epoch_ends_at_the_first_step_that_covers_it():
    # round() made 0.5 epoch of 8 micro-batches in steps of 3 run 0.75, and rounded halves to even
    # (2.5 epochs of one step each ran 2, 3.5 ran 4).
    from tsqlora_ext.train import optimizer_steps

    assert [optimizer_steps(e, 8, 1) for e in (0.5, 1, 1.5, 2.5)] == [4, 8, 12, 20]
    assert [optimizer_steps(e, 8, 3) for e in (0.5, 1, 2.5)] == [2, 3, 8]  # epochs of 3+3+2
    assert [optimizer_steps(e, 8, 8) for e in (0.4, 1.5, 2.5, 3.5)] == [1, 2, 3, 4]
    assert optimizer_steps(0.1, 10, 1) == 1 and optimizer_steps(0.01, 10, 1) == 1
    train_data, _ = tw.tiny_task(n=64)  # 8 micro-batches of 8
    config = tw.tiny_config(t_init=1, t_final=1, delta_t=1)
    result = train(wrap(tw.tiny_bert(), config, verbose=False), train_data, None, config,
                   TrainArgs(epochs=0.5, batch_size=8, lr=1e-3, progress=False))
    assert result.optimizer_steps == 4
