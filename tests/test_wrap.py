"""wrap / unwrap on tiny random BERT, RoBERTa, DeBERTa-v2, GPT-2 and LLaMA models and the bundled MiniLM."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import tsqlora_ext
from tsqlora_ext import TsqLoRAConfig, VarRankLoRALinear

FAMILIES = ["bert", "roberta", "deberta-v2", "gpt2", "llama"]

# What each family's default must adapt in each of its 2 blocks (layer index stripped), and the
# head that must train: written out here, independently of wrap.py's tables.
EXPECTED_TARGETS = {
    "bert": {"attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"},
    "deberta-v2": {"attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                   "attention.output.dense", "intermediate.dense", "output.dense"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
}
EXPECTED_TARGETS["roberta"] = EXPECTED_TARGETS["bert"]
EXPECTED_HEAD = {"bert": ["classifier"], "roberta": ["classifier"], "deberta-v2": ["pooler", "classifier"],
                 "gpt2": ["score"], "llama": ["score"]}

CFG = TsqLoRAConfig(r_init=4, r_max=8, target_r=3, lora_alpha=8.0)


def _after_index(name: str) -> str:
    parts = name.split(".")
    i = max(k for k, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[i + 1:])


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tsqlora_ext.adapted_layers(model):
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_targets_replaced_and_base_kept(family, tiny_model):
    model, _ = tiny_model(family)
    original = copy.deepcopy(model)
    tsqlora_ext.wrap(model, CFG, verbose=False)

    adapted = dict(tsqlora_ext.adapted_layers(model))
    assert {_after_index(n) for n in adapted} == EXPECTED_TARGETS[family]
    assert len(adapted) == 2 * len(EXPECTED_TARGETS[family])
    orig_modules = dict(original.named_modules())
    for name, layer in adapted.items():
        src = orig_modules[name]
        w = src.weight.t() if isinstance(src, Conv1D) else src.weight
        assert isinstance(src, Conv1D) == (family == "gpt2")
        assert torch.equal(layer.base_layer.weight, w)
        assert torch.equal(layer.base_layer.bias, src.bias) if src.bias is not None else layer.base_layer.bias is None
        assert (layer.rank, layer.r_max, layer.scaling) == (4, 8, 2.0)
    # Every module outside the targets is the same type as before (nothing else was touched).
    for name, module in model.named_modules():
        if name in adapted or any(name.startswith(a + ".") for a in adapted):
            continue
        assert type(module) is type(orig_modules[name]), name
    assert model.tsqlora_config is CFG
    assert model.tsqlora_state.modules_to_save == EXPECTED_HEAD[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapter_and_head_trainable(family, tiny_model):
    model, _ = tiny_model(family)
    tsqlora_ext.wrap(model, CFG, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{p}" for n, _ in tsqlora_ext.adapted_layers(model)
                for p in ("lora_A", "lora_E", "lora_B")}
    expected |= {f"{h}.{pn}" for h in EXPECTED_HEAD[family]
                 for pn, _ in model.get_submodule(h).named_parameters()}
    assert trainable == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_output_unchanged_at_init(family, tiny_model):
    model, inputs = tiny_model(family)
    before = _logits(model, inputs)
    tsqlora_ext.wrap(model, CFG, verbose=False)
    torch.testing.assert_close(_logits(model, inputs), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_and_unwrap_round_trip(family, tiny_model):
    model, inputs = tiny_model(family)
    original = copy.deepcopy(model)
    objects = {**dict(model.named_modules()), **dict(model.named_parameters())}
    base_out = _logits(model, inputs)
    tsqlora_ext.wrap(model, CFG, verbose=False)
    _randomize_adapters(model)
    layers = dict(tsqlora_ext.adapted_layers(model))
    next(iter(layers.values())).set_active([1, 5, 6])  # scattered, not the first r
    adapted_out = _logits(model, inputs)
    assert (adapted_out - base_out).abs().max() > 1e-3  # the adapter really changes the output

    base_weights = {n: layer.base_layer.weight.clone() for n, layer in layers.items()}
    for layer in layers.values():
        layer.merge()
    torch.testing.assert_close(_logits(model, inputs), adapted_out, rtol=1e-4, atol=1e-5)
    for n, layer in layers.items():
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, base_weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, inputs), adapted_out, rtol=1e-5, atol=1e-6)

    merged = tsqlora_ext.unwrap(copy.deepcopy(model), merge=True)
    dropped = tsqlora_ext.unwrap(model, merge=False)
    for plain in (merged, dropped):
        assert not any(isinstance(m, VarRankLoRALinear) for m in plain.modules())
        assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
        assert not hasattr(plain, "tsqlora_state") and not hasattr(plain, "tsqlora_config")
        assert all(p.requires_grad for p in plain.parameters())  # as before wrap
    torch.testing.assert_close(_logits(merged, inputs), adapted_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(dropped, inputs), base_out, rtol=1e-5, atol=1e-6)
    assert set(merged.state_dict()) == set(original.state_dict())
    # The model's own modules and Parameters come back (GPT-2's Conv1D were rebuilt: hooks on them
    # stopped firing, and an optimizer made before the wrap held weights no longer in the model).
    now = {**dict(dropped.named_modules()), **dict(dropped.named_parameters())}
    assert now.keys() == objects.keys() and all(now[k] is objects[k] for k in now)


def test_summary_printed_and_returned(tiny_model, capsys):
    model, _ = tiny_model("bert")
    tsqlora_ext.wrap(model, CFG)
    line = capsys.readouterr().out.strip()
    assert line == tsqlora_ext.trainable_summary(model)
    assert "\n" not in line
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert "12 layers adapted (rank 4, r_max 8)" in line
    assert f"trainable params: {trainable:,}" in line and f"all params: {total:,}" in line


def test_suffix_list_regex_and_exclude(tiny_model):
    model, _ = tiny_model("bert")
    cfg = CFG.replace(target_modules=["query", "value"], exclude_modules=["layer.1.attention.self.value"])
    tsqlora_ext.wrap(model, cfg, verbose=False)
    names = sorted(n for n, _ in tsqlora_ext.adapted_layers(model))
    assert names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
                     "bert.encoder.layer.1.attention.self.query"]

    model, _ = tiny_model("bert")
    cfg = CFG.replace(target_modules=r".*layer\.0\..*(query|dense)", exclude_modules=r".*output\.dense")
    tsqlora_ext.wrap(model, cfg, verbose=False)
    names = sorted(n for n, _ in tsqlora_ext.adapted_layers(model))
    assert names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.intermediate.dense"]


def test_head_never_adapted_even_when_targeted(tiny_model):
    model, _ = tiny_model("roberta")  # its head has classifier.dense and classifier.out_proj
    tsqlora_ext.wrap(model, CFG.replace(target_modules=["dense", "out_proj"]), verbose=False)
    names = [n for n, _ in tsqlora_ext.adapted_layers(model)]
    assert names and not any(n.startswith("classifier") for n in names)
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_no_match_lists_candidates(tiny_model):
    model, _ = tiny_model("bert")
    with pytest.raises(ValueError, match=r"matched no module") as e:
        tsqlora_ext.wrap(model, CFG.replace(target_modules=["q_proj"]), verbose=False)
    assert "attention.self.query" in str(e.value) and "intermediate.dense" in str(e.value)
    assert not any(isinstance(m, VarRankLoRALinear) for m in model.modules())  # left untouched


def test_unsupported_type_named(tiny_model):
    model, _ = tiny_model("bert")
    with pytest.raises(TypeError, match=r"word_embeddings \(Embedding\)"):
        tsqlora_ext.wrap(model, CFG.replace(target_modules=["word_embeddings"]), verbose=False)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen on failure


def test_unknown_family_and_bad_head_and_double_wrap(tiny_model):
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no default target_modules.*Set TsqLoRAConfig.target_modules"):
        tsqlora_ext.wrap(plain, CFG, verbose=False)
    tsqlora_ext.wrap(plain, CFG.replace(target_modules=["0"]), verbose=False)
    assert isinstance(plain[0], VarRankLoRALinear) and isinstance(plain[2], nn.Linear)
    with pytest.raises(ValueError, match="already wrapped"):
        tsqlora_ext.wrap(plain, CFG.replace(target_modules=["2"]), verbose=False)

    model, _ = tiny_model("bert")
    with pytest.raises(ValueError, match=re.escape("modules_to_save ['head']")):
        tsqlora_ext.wrap(model, CFG.replace(modules_to_save=["head"]), verbose=False)


def test_init_seeded_without_touching_global_rng(tiny_model):
    a, _ = tiny_model("llama")
    b, _ = tiny_model("llama")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    tsqlora_ext.wrap(a, CFG.replace(seed=7), verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    tsqlora_ext.wrap(b, CFG.replace(seed=7), verbose=False)
    c, _ = tiny_model("llama")
    tsqlora_ext.wrap(c, CFG.replace(seed=8), verbose=False)
    for (_, la), (_, lb), (_, lc) in zip(tsqlora_ext.adapted_layers(a), tsqlora_ext.adapted_layers(b),
                                         tsqlora_ext.adapted_layers(c)):
        assert torch.equal(la.lora_A, lb.lora_A)  # the same seed, the same init
        assert not torch.equal(la.lora_A, lc.lora_A)  # the init follows the seed


@pytest.mark.slow
def test_bundled_minilm_forward_backward(minilm_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    tsqlora_ext.wrap(model, TsqLoRAConfig(), verbose=False)
    layers = dict(tsqlora_ext.adapted_layers(model))
    assert len(layers) == 36  # 6 blocks x (q, k, v, attention out, intermediate, out)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 20000, (2, 12), generator=g)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())
    assert model.classifier.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_bundled_smollm2_gguf_classifies_padded_batches(smollm2_gguf, tmp_path):
    """The decoder case on real weights: the bundled SmolLM2-135M loads from its .gguf file, wraps
    with the LLaMA defaults, and a right-padded batch gives each text the logits it gets alone
    (a decoder reads its class from the last non-padding token, so the padding id must be right)."""
    import transformers as tf

    from tsqlora_ext.pipeline import _load_model

    model, tok = _load_model(smollm2_gguf, ["neg", "pos"], seed=0)
    tsqlora_ext.wrap(model, TsqLoRAConfig(), verbose=False)
    layers = dict(tsqlora_ext.adapted_layers(model))
    assert len(layers) == 7 * model.config.num_hidden_layers
    model.eval()
    texts = ["a quietly moving film", "the plot is a mess of clichés, and the ending drags on"]
    ids = [tok(t)["input_ids"] for t in texts]
    n = max(map(len, ids))
    batch = torch.tensor([x + [tok.pad_token_id] * (n - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone = torch.cat([model(input_ids=torch.tensor([x])).logits for x in ids])
    assert torch.allclose(together, alone, atol=1e-4), (together, alone)
    model.train()
    loss = model(input_ids=batch, attention_mask=mask, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())

    # A decoder checkpoint without a padding token gets end-of-sequence as its padding id.
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    tiny = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                          pad_token_id=None, eos_token_id=tok.eos_token_id)
    tf.LlamaForCausalLM(tiny).save_pretrained(tmp_path)
    model, tok = _load_model(tmp_path, ["neg", "pos"], seed=0)
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id


def test_adapters_take_the_replaced_modules_training_mode(tiny_model, tmp_path):
    # from_pretrained returns a model in eval mode: adapter dropout must not run in it.
    base, inputs = tiny_model("bert")
    cfg = CFG.replace(lora_dropout=0.5)
    model = tsqlora_ext.wrap(copy.deepcopy(base), cfg, verbose=False)
    _randomize_adapters(model)
    assert not any(layer.training for _, layer in tsqlora_ext.adapted_layers(model))
    assert torch.equal(_logits(model, inputs), _logits(model, inputs))
    tsqlora_ext.save_adapter(model, tmp_path / "a")
    loaded = tsqlora_ext.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert not any(layer.training for _, layer in tsqlora_ext.adapted_layers(loaded))
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))

    training = tsqlora_ext.wrap(copy.deepcopy(base).train(), cfg, verbose=False)
    assert all(layer.training for _, layer in tsqlora_ext.adapted_layers(training))


def test_tied_and_multihead_attention_targets_refused():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37, tie_word_embeddings=True,
                         pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Merging into a tied lm_head would add ΔW to the input embeddings too.
    with pytest.raises(ValueError, match=r"lm_head: its weight is tied to model\.embed_tokens\.weight.*"
                                         r"leave them out of target_modules"):
        tsqlora_ext.wrap(model, CFG.replace(target_modules=["q_proj", "lm_head"]), verbose=False)
    assert not any(isinstance(m, VarRankLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    tsqlora_ext.wrap(model, CFG.replace(target_modules=["q_proj", "lm_head"],
                                        exclude_modules=["lm_head"]), verbose=False)

    # nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj.
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    with pytest.raises(ValueError, match=r"self_attn\.out_proj: nn\.MultiheadAttention reads its weight"):
        tsqlora_ext.wrap(layer, CFG.replace(target_modules=["out_proj", "linear1"]), verbose=False)
    assert not any(isinstance(m, VarRankLoRALinear) for m in layer.modules())


def test_a_layer_whose_weight_accelerate_offloads_is_refused(tiny_model):
    # Its weight waits on the meta device for a hook around each call, which the adapted layer
    # (reading the weight itself) never ran: the forward failed with "weight is on meta".
    accelerate = pytest.importorskip("accelerate")
    model, _ = tiny_model("bert")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"attention\.self\.query: accelerate offloads its weight"):
        tsqlora_ext.wrap(model, CFG, verbose=False)
    assert not any(isinstance(m, VarRankLoRALinear) for m in model.modules())


def test_unwrap_leaves_the_global_rng_alone(tiny_model):
    # transformers' Conv1D draws its initial weight in __init__, and unwrap once rebuilt GPT-2's.
    model, inputs = tiny_model("gpt2")
    tsqlora_ext.wrap(model, CFG, verbose=False)
    _randomize_adapters(model)
    adapted = _logits(model, inputs)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    tsqlora_ext.unwrap(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(not m.training for m in model.modules())  # as the model was (eval)
    torch.testing.assert_close(_logits(model, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_failed_wrap_leaves_the_model_as_it_was(tiny_model, monkeypatch):
    model, _ = tiny_model("gpt2")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    # A config changed after construction is checked again.
    cfg = CFG.replace()
    cfg.r_max = 2
    # (The layer constructor would refuse it too, but later and with its own message.)
    with pytest.raises(ValueError, match=r"TsqLoRAConfig: r_init must be in \[1, r_max=2\]"):
        tsqlora_ext.wrap(model, cfg, verbose=False)
    assert all(p.requires_grad for p in model.parameters())

    # A failure while building the layers puts back the modules already replaced.
    real, built = VarRankLoRALinear.__init__, []

    def fail_third(self, *args, **kwargs):
        if len(built) == 2:
            raise MemoryError("out of memory")
        built.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(VarRankLoRALinear, "__init__", fail_third)
    with pytest.raises(MemoryError):
        tsqlora_ext.wrap(model, CFG, verbose=False)
    assert dict(model.named_modules()) == modules
    assert all(p is params[n] and p.requires_grad for n, p in model.named_parameters())
    assert not hasattr(model, "tsqlora_state")


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(family, use_reentrant, tiny_model):
    # Fine-tuning larger models, users turn on transformers' gradient checkpointing: each block's
    # forward runs again inside the backward. The adapters, their dropout included (checkpoint
    # restores the RNG for the rerun), must get the gradients they get without it.
    base, inputs = tiny_model(family)
    labels = torch.tensor([0, 2])
    cfg = TsqLoRAConfig(r_init=4, target_r=2, r_max=6, lora_alpha=8, lora_dropout=0.2)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tsqlora_ext.wrap(copy.deepcopy(base), cfg, verbose=False)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # B = 0 at init would leave dA and dE exactly zero
            for _, layer in tsqlora_ext.adapted_layers(model):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(3)  # the same dropout masks in both runs
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name, grad in plain.items():
        assert grad is not None and ckpt[name] is not None, name
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert all(plain[n].abs().sum() > 0 for n in plain if n.endswith(("lora_A", "lora_E")))


def test_heads_of_other_families_train_by_default():
    # BART's and T5's classification_head and DistilBERT's pre_classifier start random too; they
    # stayed frozen (BART's loss did not move), and DeBERTa-v2's QA head lost qa_outputs.
    import transformers as tf
    torch.manual_seed(0)
    cases = [
        (tf.BartForSequenceClassification(tf.BartConfig(
            vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
            max_position_embeddings=32)), ["q_proj", "v_proj"], {"classification_head"}),
        (tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=32)),
         ["q_lin", "v_lin"], {"pre_classifier", "classifier"}),
        (tf.DebertaV2ForQuestionAnswering(tf.DebertaV2Config(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=32)), None, {"qa_outputs"}),
    ]
    for model, targets, heads in cases:
        model = tsqlora_ext.wrap(model, TsqLoRAConfig(target_modules=targets, r_init=2, r_max=4,
                                                      target_r=2), verbose=False)
        assert set(model.tsqlora_state.modules_to_save) >= heads, type(model).__name__
        for head in heads:
            assert all(p.requires_grad for p in model.get_submodule(head).parameters())


def test_an_adapted_layer_shows_its_base_weight_and_bias():
    # T5's feed-forward reads self.wo.weight.dtype: AttributeError at the first forward.
    layer = VarRankLoRALinear(nn.Linear(6, 4), r_max=3, r_init=2, alpha=4.0)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    import transformers as tf
    t5 = tf.T5ForSequenceClassification(tf.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, decoder_start_token_id=0))
    t5 = tsqlora_ext.wrap(t5, TsqLoRAConfig(target_modules=["q", "v", "wi", "wo"], r_init=2, r_max=4,
                                            target_r=2), verbose=False)
    ids = torch.randint(2, 50, (2, 5))
    ids[:, -1] = t5.config.eos_token_id  # (it classifies from the end-of-sequence token)
    assert t5(input_ids=ids, labels=torch.tensor([0, 1])).loss.isfinite()
