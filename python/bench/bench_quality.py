"""Scoring-pass throughput: the batched ghost-norm pass against the naive per-example loop.

MiniLM-L6 with all 36 encoder linears adapted (r_init 12, r_max 24) plus its classification head,
real Rotten Tomatoes reviews padded to 64 tokens, batch 32. For each mode ('full': adapters of
every layer + head; 'head': head + last block's adapters) it times
- ours: `score_pool` (G and first-order D, one forward + backward per batch; and with the exact
  look-ahead, one more forward),
- the peer: one forward + backward per example, gradient norm from the materialised gradients
  (what a per-example-gradient loop costs; the way G is computed without ghost norms),
and checks on the same examples that both give the same G. Beside them, a plain batched forward +
backward of the summed loss (no scores): the least any gradient-based pass does, so its speed over
the naive loop bounds what batching can gain here (on a CPU both are bound by the same FLOPs; a
GPU's per-example loop is bound by launches instead). Figures are examples per second.

    python python/bench/bench_quality.py [--quick] [--device cuda]
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import common  # noqa: E402

from tsqlora_ext import bundled  # noqa: E402
from tsqlora_ext.layers import VarRankLoRALinear  # noqa: E402
from tsqlora_ext.quality import (  # noqa: E402
    make_batches, score_pool, scored_modules, sequence_classification_loss,
)

TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def adapt(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        for cname, child in list(module.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in TARGETS):
                setattr(module, cname, VarRankLoRALinear(child, r_max=24, r_init=12, alpha=16.0))
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier") or ".lora_" in n)
    # B = 0 at a LoRA start would zero every dA term; give the adapters a trained-like state.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, VarRankLoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.01)
    return model


@contextmanager
def scored_gradients_only(model, mode):
    """The scored parameters (as score_pool scores them), with every other parameter's gradient
    off while inside, and the model in eval mode."""
    params = []
    for _, m in scored_modules(model, mode):
        params += ([m.lora_A, m.lora_E, m.lora_B] if isinstance(m, VarRankLoRALinear)
                   else [p for p in m.parameters(recurse=False) if p.requires_grad])
    ids = {id(p) for p in params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    for p in others:
        p.requires_grad_(False)
    model.eval()
    try:
        yield params
    finally:
        for p in others:
            p.requires_grad_(True)


def naive_G(model, batches, mode, device) -> np.ndarray:
    """One forward + backward per example; ‖g_i‖ from the materialised gradient."""
    out = []
    with scored_gradients_only(model, mode) as params:
        for b in batches:
            for i in range(b["labels"].shape[0]):
                one = {k: v[i:i + 1].to(device) for k, v in b.items() if k != "index"}
                loss = sequence_classification_loss(model, one).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                out.append(float(torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None))))
    return np.array(out)


def batched_backward(model, batches, mode, device) -> None:
    """One forward + backward per batch of the summed loss, nothing else: the work any scoring
    pass that needs gradients does at least, so its speed over the naive loop is the most such a
    pass can gain from batching on this machine."""
    with scored_gradients_only(model, mode) as params:
        for b in batches:
            batch = {k: v.to(device) for k, v in b.items() if k != "index"}
            torch.autograd.grad(sequence_classification_loss(model, batch).sum(), params,
                                allow_unused=True)


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    from transformers import AutoTokenizer, BertForSequenceClassification

    dev = args.device
    n_pool = 64 if args.quick else 256
    n_naive = 32 if args.quick else 64
    task = bundled.rotten_tomatoes()
    tok = AutoTokenizer.from_pretrained(bundled.minilm_dir())
    enc = tok(task.train_texts[:n_pool], padding="max_length", truncation=True, max_length=64,
              return_tensors="pt")
    labels = torch.as_tensor(task.train_labels[:n_pool])
    batches = make_batches(enc["input_ids"], enc["attention_mask"], labels, batch_size=32)
    torch.manual_seed(0)
    model = adapt(BertForSequenceClassification.from_pretrained(bundled.minilm_dir(), num_labels=2)).to(dev)
    n_naive_batches = n_naive // 32

    rows, goals = [], []
    for mode in ("full", "head"):
        def ours(lookahead):
            return score_pool(model, batches, mode=mode, lookahead=lookahead, weights=(0.5, 0.5, 0.0),
                              progress=False)
        # Each side warmed up once and timed round-robin, the median of the repeats.
        ms = common.round_robin_ms({
            "first_order": lambda: ours("first_order"), "exact": lambda: ours("exact"),
            "naive": lambda: naive_G(model, batches[:n_naive_batches], mode, dev),
            "batched_backward": lambda: batched_backward(model, batches, mode, dev),
        }, dev, repeats=1 if args.quick else 3, warmup=1)
        s = ours("first_order")
        G_naive = naive_G(model, batches[:n_naive_batches], mode, dev)
        rel = float(np.max(np.abs(s.G[:len(G_naive)] - G_naive) / G_naive))
        ours_eps, exact_eps, naive_eps = (n_pool * 1e3 / ms["first_order"], n_pool * 1e3 / ms["exact"],
                                          len(G_naive) * 1e3 / ms["naive"])
        ceiling_eps = n_pool * 1e3 / ms["batched_backward"]
        rows.append({"mode": mode, "pool": n_pool, "seq_len": 64, "batch": 32,
                     "ours_first_order_ex_per_s": round(ours_eps, 2),
                     "ours_exact_D_ex_per_s": round(exact_eps, 2),
                     "naive_loop_ex_per_s": round(naive_eps, 2),
                     "speedup_vs_naive": round(ours_eps / naive_eps, 2),
                     "batched_fwd_bwd_ex_per_s": round(ceiling_eps, 2),
                     "ceiling_vs_naive": round(ceiling_eps / naive_eps, 2),
                     "ours_of_ceiling": round(ours_eps / ceiling_eps, 3),
                     "max_rel_diff_G_vs_naive": rel,
                     "scored_parameters": s.meta["scored_parameters"]})
        print(rows[-1])
        goals.append(common.goal(f"{mode}: scoring pass vs naive per-example loop", ours_eps / naive_eps,
                                 5.0, True, "x"))
        goals.append(common.goal(f"{mode}: G equals the naive per-example G", rel, 1e-3, False, "rel"))
    full = next(r for r in rows if r["mode"] == "full")
    head = next(r for r in rows if r["mode"] == "head")
    goals.append(common.goal("head mode vs full mode (ours)", head["ours_first_order_ex_per_s"]
                             / full["ours_first_order_ex_per_s"], 1.5, True, "x"))
    common.write_results("bench_quality", dev, args.out, rows, goals,
                         notes=("quick run: 64-example pool, naive loop on 32" if args.quick else "")
                         + "; MiniLM-L6, 36 adapted linears (r 12 of 24), seq 64, batch 32")


if __name__ == "__main__":
    main()
