"""A tiny, fully seeded training run shared by the training tests, also runnable as a script so
tests can run it in a subprocess (to kill it, or under torch.distributed).

    python tests/train_worker.py --out DIR [--steps N] [--grad-accum K] [--batch B]
        [--checkpoint-every N] [--resume] [--step-delay S]

The task: random token sequences, label 1 when most tokens come from the upper half of the
vocabulary; a 2-layer BERT with random weights and no dropout, so runs are deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

VOCAB = 61


def tiny_task(n: int = 256, seed: int = 0):
    """(train TokenizedData, eval TokenizedData) of the majority-half task."""
    from tsqlora_ext.train import TokenizedData

    rng = np.random.default_rng(seed)

    def make(count):
        ids, labels = [], []
        for _ in range(count):
            length = int(rng.integers(4, 13))
            toks = rng.integers(1, VOCAB, size=length)
            ids.append([int(t) for t in toks])
            labels.append(int((toks > VOCAB // 2).sum() * 2 > length))
        return TokenizedData(ids, np.asarray(labels, dtype=np.int64))

    return make(n), make(n // 4)


def tiny_bert(seed: int = 0):
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, num_labels=2, pad_token_id=0, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(cfg)


WORDS = [f"w{i}" for i in range(VOCAB - 5)]  # with [PAD] [UNK] [CLS] [SEP] [MASK]: VOCAB entries


def tiny_model_dir(path, seed: int = 0):
    """Save ``tiny_bert`` and a word-level BertTokenizerFast over ``WORDS`` to ``path`` (a model
    folder ``tsqlora train --model`` accepts; built offline from a vocab file)."""
    import transformers as tf

    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tf.BertTokenizerFast(vocab_file=vocab, do_lower_case=True).save_pretrained(path)
    tiny_bert(seed).save_pretrained(path)
    return path


def tiny_texts(n: int, seed: int = 0):
    """(texts, labels) of the majority-half task in words: 'pos' when most words come from the
    upper half of WORDS, else 'neg'. Texts have 5-12 words, so the gate keeps them."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        idx = rng.integers(0, len(WORDS), size=int(rng.integers(5, 13)))
        texts.append(" ".join(WORDS[i] for i in idx))
        labels.append("pos" if (idx >= len(WORDS) // 2).sum() * 2 > len(idx) else "neg")
    return texts, labels


def adapter_tensors(directory) -> dict:
    """Every tensor of the safetensors files in an adapter folder."""
    from pathlib import Path

    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(f).items()}


def tiny_config(**overrides):
    from tsqlora_ext.config import TsqLoRAConfig

    kw = dict(r_init=4, target_r=2, r_max=6, r_min=0, t_init=2, t_final=2, delta_t=2,
              calibration_batches=2, lora_alpha=8.0, seed=0)
    kw.update(overrides)
    return TsqLoRAConfig(**kw)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--accelerator", action="store_true",
                   help="let accelerate.Accelerator set up torch.distributed (under accelerate launch)")
    a = p.parse_args(argv)

    from tsqlora_ext.adapter_io import save_adapter
    from tsqlora_ext.train import TrainArgs, dist_info, lora_layers, train
    from tsqlora_ext.wrap import wrap

    torch.set_num_threads(1)
    if a.accelerator:
        import accelerate

        accelerate.Accelerator(cpu=True)
    # Under plain torchrun nothing sets up torch.distributed here: train() must join the group.
    train_data, eval_data = tiny_task()
    config = tiny_config()
    model = wrap(tiny_bert(), config, verbose=False)
    ckpt_dir = os.path.join(a.out, "checkpoints")
    args = TrainArgs(lr=5e-3, max_steps=a.steps, batch_size=a.batch, grad_accum=a.grad_accum,
                     progress=False, num_workers=1, checkpoint_dir=ckpt_dir if a.checkpoint_every else None,
                     checkpoint_every=a.checkpoint_every, keep_checkpoints=2)

    def on_step(step, record):
        if a.step_delay:
            print(f"step {step}", flush=True)
            time.sleep(a.step_delay)

    result = train(model, train_data, eval_data, config, args, resume=ckpt_dir if a.resume else None,
                   on_step=on_step)
    tag = f"rank{dist_info()[0]}"
    save_adapter(model, os.path.join(a.out, f"adapter-{tag}"))
    out = result.to_dict()
    out["active"] = {n: m.active.tolist() for n, m in lora_layers(model)}
    with open(os.path.join(a.out, f"result-{tag}.json"), "w") as f:
        json.dump(out, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
