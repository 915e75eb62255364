"""The quality score against brute force: per-example gradients by one backward per example."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import tsqlora_ext
from tsqlora_ext.config import TsqLoRAConfig
from tsqlora_ext.layers import VarRankLoRALinear
from tsqlora_ext.mislabel import flag_mislabeled
from tsqlora_ext.quality import (
    SCORE_FIELDS, combine, make_batches, read_scores, robust_z, score_pool, scored_modules,
    sequence_classification_loss, warmup, write_scores,
)

transformers = pytest.importorskip("transformers")

@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: on a shared 2-core machine intra-op threads only add synchronisation cost.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def adapt(model: nn.Module, r_max: int = 6, r_init: int = 4, seed: int = 0, scatter: bool = True):
    """tsqlora_ext.wrap over the encoder linears (head trainable). With ``scatter`` the adapters get
    random non-zero B and E and scattered active sets, so every gradient term (dA, dE, dB) is
    non-zero and inactive components are exercised."""
    gen = torch.Generator().manual_seed(seed)
    config = TsqLoRAConfig(r_max=r_max, r_init=r_init, target_r=r_init, lora_alpha=8.0, seed=seed)
    tsqlora_ext.wrap(model, config, verbose=False)
    for m in model.modules():
        if isinstance(m, VarRankLoRALinear):
            if scatter:
                with torch.no_grad():
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
                    m.lora_E.copy_(torch.rand(m.lora_E.shape, generator=gen) + 0.5)
                k = int(torch.randint(1, r_max + 1, (1,), generator=gen))
                m.set_active(torch.randperm(r_max, generator=gen)[:k])
    return model


def tiny_bert(seed: int = 0, num_labels: int = 3, dropout: float = 0.1):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=num_labels,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return adapt(transformers.BertForSequenceClassification(cfg), seed=seed)


def tiny_pool(n: int = 10, T: int = 9, num_labels: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    for i, L in enumerate(lengths.tolist()):
        mask[i, L:] = 0
        ids[i, L:] = 0
    labels = torch.randint(num_labels, (n,), generator=g)
    return ids, mask, labels


def brute_force(model, batches, params, eta):
    """Per-example loss, gradient (flattened over params), and loss after θ − η g_i."""
    model.eval()
    losses, grads, after = [], [], []
    for b in batches:
        for i in range(b["labels"].shape[0]):
            one = {k: v[i:i + 1] for k, v in b.items() if k != "index"}
            loss = sequence_classification_loss(model, one).sum()
            g = torch.autograd.grad(loss, params, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.sub_(eta * gi)
                after.append(float(sequence_classification_loss(model, one).sum()))
                for p, gi in zip(params, g):
                    p.add_(eta * gi)
            losses.append(float(loss.detach()))
            grads.append(torch.cat([gi.flatten() for gi in g]).double())
    return np.array(losses), torch.stack(grads), np.array(after)


def scored_params(model, mode):
    out = []
    for _, m in scored_modules(model, mode):
        if isinstance(m, VarRankLoRALinear):
            out += [m.lora_A, m.lora_E, m.lora_B]
        else:
            out += [p for p in m.parameters(recurse=False) if p.requires_grad]
    return out


@pytest.mark.parametrize("mode", ["full", "head"])
def test_scores_equal_brute_force(mode):
    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_bert()
        model.train()  # the pass must switch dropout off itself
        ids, mask, labels = tiny_pool()
        batches = make_batches(ids, mask, labels, batch_size=4)
        eta = 0.5  # large enough that exact and first-order D differ clearly
        scores = score_pool(model, batches, mode=mode, lookahead="exact", eta=eta,
                            compute_alignment=True, progress=False)
        assert model.training, "the pass must restore the training flag"
        params = scored_params(model, mode)
        loss, grads, after = brute_force(model, batches, params, eta)
        G = grads.norm(dim=1).numpy()
        mean = grads.mean(0)
        C = (grads @ mean / (grads.norm(dim=1) * mean.norm())).numpy()
        np.testing.assert_allclose(scores.loss, loss, rtol=1e-10)
        np.testing.assert_allclose(scores.G, G, rtol=1e-9)
        np.testing.assert_allclose(scores.D, loss - after, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(scores.C, C, rtol=1e-8, atol=1e-10)
        assert np.all(scores.G > 0)
        # exact D is not the first-order value at this step size: the test can tell them apart
        assert np.max(np.abs(scores.D - eta * G ** 2)) > 1e-3 * np.max(np.abs(scores.D))
        fo = score_pool(model, batches, mode=mode, lookahead="first_order", eta=eta,
                        weights=(0.5, 0.5, 0.0), compute_alignment=False, progress=False)
        np.testing.assert_allclose(fo.D, eta * G ** 2, rtol=1e-9)
        assert np.all(np.isnan(fo.C))
        # C against a held-out reference set: ḡ is that set's mean gradient, no second pool pass
        ref_ids, ref_mask, ref_labels = tiny_pool(n=6, seed=7)
        ref_batches = make_batches(ref_ids, ref_mask, ref_labels, batch_size=4)
        held = score_pool(model, batches, mode=mode, alignment_reference=ref_batches, progress=False)
        ref_mean = brute_force(model, ref_batches, params, eta)[1].mean(0)
        np.testing.assert_allclose(held.C, (grads @ ref_mean / (grads.norm(dim=1) * ref_mean.norm())).numpy(),
                                   rtol=1e-8, atol=1e-10)
        assert held.meta["alignment"] == "held_out"
        if mode == "head":  # the head mode scores fewer parameters than the full one
            assert scores.meta["scored_parameters"] < sum(p.numel() for p in scored_params(model, "full"))
            assert all(".layer.1." in n or n == "classifier" for n in scores.meta["scored_layers"])
        # requires_grad is restored after the pass
        assert all(p.requires_grad for p in scored_params(model, "full"))
    finally:
        torch.set_default_dtype(torch.float32)


def test_an_index_of_the_wrong_length_is_refused():
    ids, mask, labels = tiny_pool(n=6)
    with pytest.raises(ValueError, match=r"make_batches: index has shape \(3,\), expected one id per example \(6,\)"):
        make_batches(ids, mask, labels, index=[0, 1, 2])
    batches = make_batches(ids, mask, labels, batch_size=4)
    batches[1]["index"] = torch.tensor([7])
    with pytest.raises(ValueError, match=r"a batch's 'index' has shape \(1,\) for its 2 examples"):
        score_pool(tiny_bert(), batches, weights=(0.5, 0.5, 0.0), progress=False)


def test_alignment_off_with_a_weight_on_c_is_refused():
    model = tiny_bert()
    batches = make_batches(*tiny_pool(), batch_size=4)
    with pytest.raises(ValueError, match=r"alpha3 = 0.3.*compute_alignment=False leaves C undefined"):
        score_pool(model, batches, weights=(0.3, 0.4, 0.3), compute_alignment=False, progress=False)


@pytest.mark.parametrize("lookahead", ["first_order", "exact"])
def test_half_precision_model_scores_like_float32(lookahead):
    # Gram matrices of ordinary activations overflow float16 (65504): the taps compute in float32.
    torch.manual_seed(0)
    lin = VarRankLoRALinear(nn.Linear(256, 256), r_max=4, r_init=4, alpha=8.0)
    with torch.no_grad():
        lin.lora_B.normal_()
    model = nn.Sequential(lin, nn.Linear(256, 3))
    x = torch.randn(6, 8, 256) * 30
    batches = [{"x": x, "labels": torch.tensor([0, 1, 2, 0, 1, 2])}]

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b["x"]).mean(1).float(), b["labels"], reduction="none")

    def score(dtype):
        m = copy.deepcopy(model).to(dtype)
        b = [{"x": x.to(dtype), "labels": batches[0]["labels"]}]
        return score_pool(m, b, mode="full", lookahead=lookahead, weights=(0.5, 0.5, 0.0),
                          loss_fn=loss_fn, progress=False)

    full, half = score(torch.float32), score(torch.float16)
    assert np.all(np.isfinite(half.G)) and np.all(np.isfinite(half.D))
    np.testing.assert_allclose(half.G, full.G, rtol=2e-2)


def test_ghost_and_direct_paths_agree():
    """Long sequences take the ghost (Gram) path for the head-like linear, short ones the direct
    outer product; both equal the materialised per-example gradient."""
    from tsqlora_ext.quality import _outer_sq_norms
    g = torch.Generator().manual_seed(0)
    for T, d, p in [(2, 16, 16), (40, 4, 5)]:
        x = torch.randn(3, T, d, generator=g, dtype=torch.float64)
        dl = torch.randn(3, T, p, generator=g, dtype=torch.float64)
        want = torch.einsum("btp,btd->bpd", dl, x).square().sum((1, 2))
        torch.testing.assert_close(_outer_sq_norms(x, dl), want)


def test_unsupported_trainable_parameter_is_named():
    model = tiny_bert()
    model.bert.encoder.layer[0].attention.output.LayerNorm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.output\.LayerNorm\.weight.*LayerNorm"):
        scored_modules(model, "full")
    model = tiny_bert()
    model.bert.encoder.layer[0].attention.self.query.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"query\.base_layer\.weight.*frozen base"):
        scored_modules(model, "full")


def test_robust_z():
    v = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    z = robust_z(v)
    mad = np.median(np.abs(v - 3.0))  # 1
    np.testing.assert_allclose(z, (v - 3.0) / (1.4826 * mad))
    assert z[2] == 0.0
    np.testing.assert_array_equal(robust_z(np.full(4, 2.5)), np.zeros(4))
    w = np.array([0.0, 0.0, 0.0, 1.0, 5.0])  # MAD = 0: falls back to the standard deviation
    np.testing.assert_allclose(robust_z(w), w / w.std())
    q = combine(v, 2 * v, np.full(5, np.nan), (0.5, 0.5, 0.0))
    np.testing.assert_allclose(q, z)  # z is scale-invariant; a zero weight drops the NaN term


def _random_scores(n=7, seed=0):
    from tsqlora_ext.quality import QualityScores
    r = np.random.default_rng(seed)
    return QualityScores(index=r.permutation(n * 3)[:n], loss=r.random(n), G=r.random(n), D=r.random(n),
                         C=np.where(np.arange(n) == 2, np.nan, r.random(n)), Q=r.normal(size=n),
                         score=r.normal(size=n), p_mislabeled=r.random(n), likely_mislabeled=np.zeros(n, bool))


def test_scores_file_round_trip(tmp_path):
    s = _random_scores()
    path = write_scores(tmp_path / "scores.jsonl", s)
    assert [p.name for p in tmp_path.iterdir()] == ["scores.jsonl"]  # no temporary file left
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == set(SCORE_FIELDS) | {"likely_mislabeled"}
    back = read_scores(path, mislabel_threshold=0.5)
    np.testing.assert_array_equal(back.index, s.index)
    for f in SCORE_FIELDS[1:]:
        np.testing.assert_array_equal(getattr(back, f), getattr(s, f))  # bit-exact, NaN kept
    # the guard's decision as written (it abstained here although many p exceed 0.5)
    assert (s.p_mislabeled > 0.5).any()
    np.testing.assert_array_equal(back.likely_mislabeled, s.likely_mislabeled)


def test_scores_file_saved_with_a_byte_order_mark(tmp_path):
    # Editors on Windows save UTF-8 with a BOM; json.loads would refuse the first line.
    s = _random_scores(n=5)
    path = write_scores(tmp_path / "bom.jsonl", s)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    np.testing.assert_array_equal(read_scores(path).index, s.index)
    from tsqlora_ext.selector import read_scores as select_read_scores
    assert np.isfinite(select_read_scores(path, n=15)["score"][s.index]).all()


def test_scores_file_without_the_guard_decision_refits_it(tmp_path):
    # Files written before the field existed: the guard is refitted on their loss column.
    s = _random_scores(n=40)
    s.loss[:] = np.r_[np.abs(np.random.default_rng(3).normal(0.1, 0.05, 36)), [3.0, 3.1, 2.9, 3.2]]
    path = write_scores(tmp_path / "old.jsonl", s)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "likely_mislabeled"}) + "\n"
                            for r in rows))
    back = read_scores(path)
    np.testing.assert_array_equal(back.likely_mislabeled, flag_mislabeled(s.loss)[1])
    assert back.likely_mislabeled[-4:].all() and not back.likely_mislabeled[:36].any()
    rows[1]["likely_mislabeled"] = "yes"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"old\.jsonl: line 2: field 'likely_mislabeled' must be true or false"):
        read_scores(path)


@pytest.mark.parametrize("bad, message", [
    ('{"index": 3, "loss": 1.0', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"index": 3, "loss": 1.0, "G": 1, "D": 1, "C": 1, "Q": 1}', r"\['score', 'p_mislabeled'\] missing"),
    ('{"index": -1, "loss": 1.0, "G": 1, "D": 1, "C": 1, "Q": 1, "score": 0, "p_mislabeled": 0}', "'index'"),
    ('{"index": 9, "loss": "x", "G": 1, "D": 1, "C": 1, "Q": 1, "score": 0, "p_mislabeled": 0}',
     "'loss' must be a number"),
])
def test_corrupted_scores_file_names_file_and_line(tmp_path, bad, message):
    path = write_scores(tmp_path / "s.jsonl", _random_scores(n=4))
    lines = path.read_text().splitlines()
    lines.insert(2, bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"s\.jsonl: line 3: .*{message}"):
        read_scores(path)


def test_non_finite_values_written_as_null_read_back_as_nan(tmp_path):
    # rows() writes null for any non-finite value; read_scores took null only for C and D.
    s = _random_scores(n=4)
    s.Q[1], s.score[1], s.loss[2] = np.nan, np.inf, -np.inf
    back = read_scores(write_scores(tmp_path / "s.jsonl", s))
    for field in ("Q", "score", "loss"):
        got, want = getattr(back, field), getattr(s, field)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(want)])


def test_empty_and_duplicate_scores_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"e\.jsonl: no scores"):
        read_scores(tmp_path / "e.jsonl")
    s = _random_scores(n=3)
    s.index[:] = [1, 1, 2]
    write_scores(tmp_path / "d.jsonl", s)
    with pytest.raises(ValueError, match=r"d\.jsonl: an 'index' appears more than once"):
        read_scores(tmp_path / "d.jsonl")


def test_warmup_steps_the_model_and_reports():
    model = tiny_bert(dropout=0.0)
    ids, mask, labels = tiny_pool(n=16)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    rec = warmup(model, opt, {"input_ids": ids, "attention_mask": mask, "labels": labels}, steps=5,
                 batch_size=4, seed=3, progress=False)
    assert rec["steps"] == 5 and rec["examples"] == 20 and rec["seed"] == 3
    assert all(p.grad is None for p in params)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    assert opt.state[params[0]]["step"] == 5  # the optimizer carries on into training
    # The first and last losses are two windows apart (they were the same 5 steps).
    rec = warmup(model, opt, {"input_ids": ids, "attention_mask": mask, "labels": labels}, steps=2,
                 batch_size=4, seed=4, progress=False)
    assert rec["first_loss"] != rec["last_loss"]


def test_scoring_and_warmup_give_every_module_its_own_mode_back():
    # A part of the model the caller had put in eval mode (its dropout) came back in train mode.
    model = tiny_bert()
    model.train()
    model.bert.embeddings.eval()
    ids, mask, labels = tiny_pool(n=8)
    pool = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    modes = {n: m.training for n, m in model.named_modules()}
    score_pool(model, make_batches(ids, mask, labels, batch_size=4), progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes
    warmup(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), pool, steps=1,
           batch_size=4, progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_head_mode_scores_the_whole_last_block_of_t5():
    # The block was cut at a name's last number, which in T5 is the sub-layer: head mode scored
    # the last block's feed-forward and dropped its self- and cross-attention adapters.
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                                decoder_start_token_id=0)
    model = transformers.T5ForSequenceClassification(cfg)
    tsqlora_ext.wrap(model, TsqLoRAConfig(r_max=4, r_init=2, target_r=2, target_modules=["q", "v", "wi", "wo"]),
                     verbose=False)
    adapters = [n for n, m in scored_modules(model, "head") if isinstance(m, VarRankLoRALinear)]
    assert adapters == [n for n, m in model.named_modules() if isinstance(m, VarRankLoRALinear)
                        and n.startswith("transformer.decoder.block.1.")]
    assert len(adapters) == 6


def test_warmup_keeps_inactive_components_and_skips_nan_steps():
    # The training loop's protections: weight decay must not move pruned components, and one
    # batch with NaN gradients must not poison every parameter before the scoring pass.
    model = tiny_bert(dropout=0.0)
    ids, mask, labels = tiny_pool(n=16)
    layers = [m for m in model.modules() if isinstance(m, VarRankLoRALinear)]
    inactive = [(m, m.inactive.clone(), m.lora_A.detach()[m.inactive].clone()) for m in layers]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    pool = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    calls = [0]

    def nan_on_second(m, batch):
        calls[0] += 1
        loss = sequence_classification_loss(m, batch)
        return loss * float("nan") if calls[0] == 2 else loss

    rec = warmup(model, opt, pool, steps=4, batch_size=4, loss_fn=nan_on_second,
                 max_grad_norm=1.0, progress=False)
    assert rec["skipped"] == 1 and opt.state[params[0]]["step"] == 3
    assert all(torch.isfinite(p).all() for p in params)
    assert any(idx.numel() for _, idx, _ in inactive)
    for m, idx, rows in inactive:
        assert torch.equal(m.lora_A.detach()[idx], rows)
    with pytest.raises(FloatingPointError, match="all 2 steps had NaN/inf gradients"):
        warmup(model, opt, pool, steps=2, batch_size=4, progress=False,
               loss_fn=lambda m, b: sequence_classification_loss(m, b) * float("nan"))


def _two_cluster_loss(wrong_ids):
    """A loss_fn whose per-example losses form a tight low cluster and, for the examples whose
    index is in ``wrong_ids``, a tight high one: what wrong labels look like to a warmed-up model,
    so the guard acts (an untrained tiny model's losses would make it abstain)."""
    def loss_fn(model, batch):
        wrong = torch.isin(batch["index"], wrong_ids)
        return sequence_classification_loss(model, batch) * torch.where(wrong, 4.0, 0.05)
    return loss_fn


def test_pool_index_kept_and_guard_switch():
    model = tiny_bert(dropout=0.0)
    ids, mask, labels = tiny_pool(n=12)
    batches = make_batches(ids, mask, labels, batch_size=5, index=torch.arange(100, 112))
    wrong = torch.tensor([100, 104, 108])
    runs = {guard: score_pool(model, iter(batches), mode="head", weights=(0.5, 0.5, 0.0),
                              progress=False, mislabel_guard=guard, loss_fn=_two_cluster_loss(wrong))
            for guard in (True, False)}
    on, off = runs[True], runs[False]
    np.testing.assert_array_equal(off.index, np.arange(100, 112))
    np.testing.assert_array_equal(on.likely_mislabeled, np.isin(on.index, wrong.numpy()))
    # Off: nothing flagged, while P(wrong label) is still reported, the same as with the guard on.
    assert not off.likely_mislabeled.any() and off.meta["n_likely_mislabeled"] == 0
    np.testing.assert_allclose(off.p_mislabeled, on.p_mislabeled)
    assert np.isfinite(off.Q).all() and off.meta["alignment"] is None


def test_score_pool_from_config_follows_the_config():
    from tsqlora_ext.config import TsqLoRAConfig
    from tsqlora_ext.quality import score_pool_from_config
    model = tiny_bert(dropout=0.0)
    ids, mask, labels = tiny_pool(n=8)
    batches = make_batches(ids, mask, labels, batch_size=4)
    cfg = TsqLoRAConfig(score_mode="full", lookahead="exact", quality_weights=(1.0, 0.0, 0.0),
                        mislabel_guard=False, mislabel_threshold=0.3, mislabel_max_spread=0.7,
                        quality_preference="high")
    s = score_pool_from_config(model, batches, cfg, progress=False)
    assert (s.meta["mode"], s.meta["lookahead"], s.meta["alignment"]) == ("full", "exact", None)
    # The guard settings reach score_pool (what the guard then does: test_pool_index_kept_and_guard_switch).
    assert (s.meta["mislabel_guard"], s.meta["mislabel_threshold"],
            s.meta["mislabel_max_spread"]) == (False, 0.3, 0.7)
    np.testing.assert_allclose(s.Q, robust_z(s.G))
    np.testing.assert_array_equal(s.score, s.Q)  # 'high': the selection samples by Q itself
    m = score_pool_from_config(model, batches, cfg.replace(quality_preference="moderate"),
                               progress=False)
    np.testing.assert_allclose(m.score, -np.abs(m.Q - np.median(m.Q)))


def test_row_scores_carry_the_selection_score_not_q():
    """Selection samples by the preference-adjusted score ('moderate' by default), never by raw Q,
    whose top holds the wrong labels; rows the gate dropped get 0 and are never flagged."""
    from tsqlora_ext.pipeline import row_scores
    from tsqlora_ext.quality import QualityScores, selection_score

    rng = np.random.default_rng(0)
    Q = rng.normal(size=5)
    score = selection_score(Q, "moderate")
    flagged = np.array([False, True, False, False, True])
    scores = QualityScores(index=np.array([7, 1, 4, 0, 9]), loss=rng.random(5), G=rng.random(5),
                           D=rng.random(5), C=rng.random(5), Q=Q, score=score,
                           p_mislabeled=flagged * 0.9, likely_mislabeled=flagged)
    by_row, flag_by_row = row_scores(scores, 10)
    np.testing.assert_array_equal(by_row[[7, 1, 4, 0, 9]], score)
    assert not np.allclose(by_row[[7, 1, 4, 0, 9]], Q)
    assert set(np.flatnonzero(flag_by_row)) == {1, 9}
    assert (by_row[[2, 3, 5, 6, 8]] == 0).all() and not flag_by_row[[2, 3, 5, 6, 8]].any()


def test_uniform_preference_is_the_random_sample_unless_the_guard_acts():
    """The default preference ignores Q: with nothing flagged it selects exactly the rows a random
    selection of the same seed selects; with flags it samples among the survivors only."""
    import pandas as pd

    from tsqlora_ext.quality import selection_score
    from tsqlora_ext.selector import select

    rng = np.random.default_rng(5)
    df = pd.DataFrame({"text": [f"review {i} of the pool" for i in range(400)],
                       "label": rng.integers(0, 3, 400)})
    score = selection_score(rng.normal(size=400) * 3, "uniform")
    kw = dict(text_field="text", label_field="label", count=120, seed=11, gate=False)
    random_rows = np.sort(select(df, **kw).indices)
    none_flagged = select(df, scores=score, drop={"likely_mislabeled": np.zeros(400, bool)}, **kw)
    np.testing.assert_array_equal(np.sort(none_flagged.indices), random_rows)
    flagged = rng.random(400) < 0.3
    guarded = np.asarray(select(df, scores=score, drop={"likely_mislabeled": flagged}, **kw).indices)
    assert guarded.size == 120 and not flagged[guarded].any()
