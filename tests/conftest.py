"""Shared fixtures. Nothing here downloads: models and data come from bundled packages, and tests
that need one skip with the install command when it is absent."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch

# Never reach for a model hub, and keep any HF cache out of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="tsq-hf-"))

from tsqlora_ext import bundled  # noqa: E402

# tests/train_worker.py is both the script the DDP and resume tests launch and a module of tiny
# training helpers the tests import by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bundled(fn):
    try:
        return fn()
    except bundled.BundledDataMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm_dir():
    return _bundled(bundled.minilm_dir)


@pytest.fixture(scope="session")
def rotten_tomatoes():
    return _bundled(bundled.rotten_tomatoes)


@pytest.fixture(scope="session")
def bbc_news():
    return _bundled(bundled.bbc_news)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# ---- tiny randomly initialised transformers models (issue 6: wrap / adapter files) ---------------
TINY_FAMILIES = ["bert", "roberta", "deberta-v2", "gpt2", "llama"]


def make_tiny_model(family: str, hidden: int = 32, seed: int = 0):
    """A 2-layer sequence-classification model of ``family`` (random weights, nothing downloaded)
    in eval mode, and a batch of inputs for it."""
    import transformers as tf

    common = dict(vocab_size=61, num_labels=3, pad_token_id=0)
    if family == "bert":
        cls, cfg = tf.BertForSequenceClassification, tf.BertConfig(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **common)
    elif family == "roberta":
        cls, cfg = tf.RobertaForSequenceClassification, tf.RobertaConfig(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=40, **common)
    elif family == "deberta-v2":
        cls, cfg = tf.DebertaV2ForSequenceClassification, tf.DebertaV2Config(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=40, **common)
    elif family == "gpt2":
        cls, cfg = tf.GPT2ForSequenceClassification, tf.GPT2Config(
            n_embd=hidden, n_layer=2, n_head=2, n_positions=40, **common)
    elif family == "llama":
        cls, cfg = tf.LlamaForSequenceClassification, tf.LlamaConfig(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=45, max_position_embeddings=40, **common)
    else:
        raise ValueError(f"unknown tiny family {family!r}; known: {TINY_FAMILIES}")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(1, cfg.vocab_size, (2, 9), generator=g)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture
def tiny_model():
    """``tiny_model(family, hidden=32, seed=0) -> (model, inputs)``; see make_tiny_model."""
    return make_tiny_model


@pytest.fixture(scope="session")
def smollm2_gguf():
    return _bundled(bundled.smollm2_gguf)
