"""One full training step of a real model: TsqLoRA against PEFT LoRA and PEFT AdaLoRA, in one process.

    python python/bench/bench_step.py [--device cpu|cuda] [--quick] [--out DIR]

A step is what a training loop pays per optimizer step: forward, backward, AdamW, the method's
own rank bookkeeping, zero_grad. Every method adapts the same linears of its own copy of one model
and sees the same batches:

- ours 12/12     tsqlora_ext.wrap, r_init = r_max = 12, all components active; RankAllocator.step()
                 each step (fused sensitivity update, reallocation every delta_t = 10 steps at a
                 constant budget) and protect_inactive on the optimizer. Against:
- lora 12        PEFT LoRA r = 12 (the issue's goal: ours <= PEFT LoRA at the same r_init).
- ours 12->8     r_max 12 with 8 active per layer (where AdaLoRA's budget ends), same bookkeeping.
- adalora 12->8  PEFT AdaLoRA init_r 12, target_r 8, update_and_allocate(step) each step inside its
                 budget phase (PEFT computes at r = 12 whatever it masks). Its default orthogonality
                 regulariser (weight 0.5) is on, as users run it; ours has none by default.
- lora 8         PEFT LoRA r = 8: the compute floor at the final budget.

Models: on CPU the bundled all-MiniLM-L6-v2 (sequence classification, 2 labels; batch 32 x 64
tokens, float32); on CUDA SmolLM2-135M's architecture (LlamaConfig with its shapes, random
initialisation: weights do not change the time; causal LM, batch 16 x 512 tokens, bf16 autocast
over float32 weights). Timed steps are interleaved round-robin across methods (machine noise hits
all alike); figures are medians, with the peak CUDA memory of one step. Every method uses AdamW
with foreach=True (CUDA's default, set explicitly so that a CPU run dispatches what a GPU step does).

Host-bound rows (CPU only, a "setting" column): SmolLM2-135M's layout (30 blocks, 210 adapted
linears) at width 16 on 2 x 8 tokens, in float32 and under bf16 autocast. Its arithmetic is
negligible, so its step time is what the host pays per op and in Python, the cost that bounds a
GPU step of a small model; this measures that cost, ours against PEFT, without a GPU.

ops_per_step: the dispatcher ops (aten:: and tsqlora_ext::) that torch.profiler records per step,
averaged over delta_t steps so that ours include their share of a reallocation: all of them
(ops_per_step), and the top-level ones alone (ops_per_step_top: an op run inside another op not
counted). At these model sizes a GPU step is bound by the host, which pays for every op it
dispatches, nested or not (our C++ op dispatches its GEMMs and kernels through the dispatcher as
PEFT's Python does), so the count of all ops is the device-independent proxy for that overhead;
the top-level count alone would credit an op written in C++ with the ops it hides. The counts are
exact and repeatable, unlike the times. On CPU they are also counted under bf16 autocast over one
step without a reallocation (ops_per_step_bf16), the GPU training setting, where the adapters'
casts appear.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import tsqlora_ext  # noqa: E402
from tsqlora_ext.bundled import minilm_dir  # noqa: E402
from tsqlora_ext.layers import protect_inactive  # noqa: E402
from tsqlora_ext.wrap import adapted_layers  # noqa: E402

ALPHA = 16.0
DELTA_T = 10


def smollm2_135m_config():
    """SmolLM2-135M's shapes (the bundled GGUF's architecture) as a transformers LlamaConfig."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, tie_word_embeddings=True)


def load_model(device: str, quick: bool):
    """(model, batch, task_type, dtype for autocast or None)."""
    gen = torch.Generator().manual_seed(0)
    if device == "cpu":
        from transformers import AutoModelForSequenceClassification
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_dir(), num_labels=2)
        batch, seq = (8, 32) if quick else (32, 64)
        ids = torch.randint(1000, model.config.vocab_size, (batch, seq), generator=gen)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (batch,), generator=gen)}
        return model, data, "SEQ_CLS", None
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_135m_config())
    batch, seq = (4, 256) if quick else (16, 512)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, data, "CAUSAL_LM", torch.bfloat16


def ours(base, r_active: int, r_max: int, total_steps: int, device: str):
    """TsqLoRA with `r_active` of `r_max` components active per layer and its allocator running."""
    cfg = tsqlora_ext.TsqLoRAConfig(r_init=r_active, target_r=r_active, r_max=r_max, r_min=0,
                                    lora_alpha=ALPHA, delta_t=DELTA_T, total_steps=total_steps,
                                    sensitivity_init=False)
    model = tsqlora_ext.wrap(copy.deepcopy(base), cfg, verbose=False).to(device)
    allocator = tsqlora_ext.RankAllocator(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    protect_inactive(opt, model)
    return model, opt, allocator.step


def peft_model(base, target_modules, task_type: str, adalora: bool, r: int, total_steps: int,
               device: str):
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    if adalora:
        cfg = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=ALPHA, tinit=0, tfinal=0, deltaT=DELTA_T,
                            total_step=total_steps, target_modules=target_modules, task_type=task_type)
    else:
        cfg = LoraConfig(r=r, lora_alpha=ALPHA, target_modules=target_modules, task_type=task_type)
    model = get_peft_model(copy.deepcopy(base), cfg).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    if not adalora:
        return model, opt, lambda: None
    steps = iter(range(total_steps))
    return model, opt, lambda: model.base_model.update_and_allocate(next(steps))


def step_fn(model, opt, after_step, data, amp_dtype, device: str):
    def step():
        with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(**data).loss
        loss.backward()
        opt.step()
        after_step()
        opt.zero_grad(set_to_none=True)
    return step


def ops_per_step(fn, steps: int) -> tuple[float, float]:
    """(all, top-level) dispatcher ops per call of fn(), from torch.profiler over `steps` calls."""
    from torch.profiler import ProfilerActivity, profile

    def is_op(e) -> bool:
        return e.name.startswith(("aten::", "tsqlora_ext::"))

    def nested(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if is_op(parent):
                return True
            parent = parent.cpu_parent
        return False

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    ops = [e for e in prof.events() if is_op(e)]
    return len(ops) / steps, sum(1 for e in ops if not nested(e)) / steps


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def host_bound_model():
    """SmolLM2-135M's layout (30 blocks, 210 adapted linears) at width 16 on 2 x 8 tokens (model,
    batch). Its arithmetic is negligible, so a step costs what the host pays per op and in
    Python: what a GPU step of a small model is bound by, measured on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    return LlamaForCausalLM(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                   "labels": ids.clone()}


def build_methods(base, task_type: str, total_steps: int, device: str) -> tuple[dict, int]:
    """{method: (model, optimizer, after_step)} over copies of `base`, and the adapted linears'
    count. PEFT adapts exactly the linears our wrap adapts (full module names match as targets)."""
    base.requires_grad_(False)
    probe = tsqlora_ext.wrap(copy.deepcopy(base), tsqlora_ext.TsqLoRAConfig(), verbose=False)
    targets = [name for name, _ in adapted_layers(probe)]
    del probe
    methods = {
        "ours 12/12": ours(base, 12, 12, total_steps, device),
        "lora 12": peft_model(base, targets, task_type, False, 12, total_steps, device),
        "ours 12->8": ours(base, 8, 12, total_steps, device),
        "adalora 12->8": peft_model(base, targets, task_type, True, 12, total_steps, device),
        "lora 8": peft_model(base, targets, task_type, False, 8, total_steps, device),
    }
    for model, _, _ in methods.values():
        model.train()
    return methods, len(targets)


def step_fns(methods: dict, data: dict, amp_dtype, device: str) -> dict:
    return {k: step_fn(model, opt, after, data, amp_dtype, device)
            for k, (model, opt, after) in methods.items()}


def ratios(ms: dict[str, float], k: str) -> dict:
    return {"vs lora 12": round(ms[k] / ms["lora 12"], 3),
            "vs adalora": round(ms[k] / ms["adalora 12->8"], 3)}


def host_bound_rows(repeats: int, total_steps: int) -> tuple[list[dict], list[dict]]:
    """Rows and goals of the host-bound model, in float32 and under bf16 autocast (the GPU
    training setting, where the adapters' casts come in)."""
    base, data = host_bound_model()
    methods, _ = build_methods(base, "CAUSAL_LM", total_steps, "cpu")
    rows, goals = [], []
    for label, amp_dtype in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        fns = step_fns(methods, data, amp_dtype, "cpu")
        ms = common.round_robin_ms(fns, "cpu", repeats, warmup=2)
        for k in fns:
            # No op count here: profiling one step of ~12k ops takes seconds; the MiniLM rows
            # give the counts.
            rows.append({"setting": f"host-bound, {label}", "method": k, "step_ms": round(ms[k], 2),
                         **ratios(ms, k)})
            print(rows[-1], flush=True)
        for ours_k in ("ours 12/12", "ours 12->8"):
            goals.append(common.goal(
                f"host-bound step ({label}): {ours_k} / PEFT LoRA r 12 (what a GPU step of a "
                "small model pays)", ms[ours_k] / ms["lora 12"], 1.0, higher_is_better=False,
                unit="x"))
    return rows, goals


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device = args.device
    repeats = 3 if args.quick else (10 if device == "cpu" else 20)
    total_steps = 10_000  # far beyond the timed steps: every method stays in its budget phase
    base, data, task_type, amp_dtype = load_model(device, args.quick)
    data = {k: v.to(device) for k, v in data.items()}
    methods, n_targets = build_methods(base, task_type, total_steps, device)
    fns = step_fns(methods, data, amp_dtype, device)
    params = {k: trainable(model) for k, (model, _, _) in methods.items()}
    ms = common.round_robin_ms(fns, device, repeats, warmup=2)  # warm-up also creates AdamW state
    mem = {k: common.peak_memory_mb(fn, device) for k, fn in fns.items()} if device == "cuda" else {}
    n_ops = {k: ops_per_step(fn, DELTA_T) for k, fn in fns.items()}
    n_ops_bf16 = {}
    if device == "cpu":
        # One step (CPU bf16 is slow); the timed steps stop short of a reallocation step.
        n_ops_bf16 = {k: ops_per_step(fn, 1)[0]
                      for k, fn in step_fns(methods, data, torch.bfloat16, device).items()}

    tokens = data["input_ids"].numel()
    rows = []
    for k in fns:
        row = {"method": k, "step_ms": round(ms[k], 2), "tokens_per_s": round(tokens / ms[k] * 1e3),
               "trainable_params": params[k], **ratios(ms, k), "ops_per_step": n_ops[k][0],
               "ops_per_step_top": n_ops[k][1]}
        if n_ops_bf16:
            row["ops_per_step_bf16"] = n_ops_bf16[k]
        if mem:
            row["peak_mb"] = round(mem[k], 1)
        rows.append(row)
        print(row, flush=True)
    goals = [
        common.goal("ours 12/12 step / PEFT LoRA r 12 step (same r_init)",
                    ms["ours 12/12"] / ms["lora 12"], 1.0, higher_is_better=False, unit="x"),
        common.goal("ours 12->8 dispatched ops per step / PEFT LoRA r 12's (all ops, nested ones "
                    "included: the host-overhead proxy)",
                    n_ops["ours 12->8"][0] / n_ops["lora 12"][0], 1.0, higher_is_better=False, unit="x"),
        common.goal("PEFT AdaLoRA 12->8 step / ours 12->8 step", ms["adalora 12->8"] / ms["ours 12->8"],
                    1.0, higher_is_better=True, unit="x"),
    ]
    model_name = "all-MiniLM-L6-v2 (bundled), fp32" if device == "cpu" else \
        "SmolLM2-135M architecture (random init), bf16 autocast"
    notes = (f"{model_name}; batch {tuple(data['input_ids'].shape)}; {n_targets} adapted linears; "
             f"median of {repeats} round-robin steps after 2 warm-up steps each; "
             f"{torch.get_num_threads()} CPU thread(s)." + (" --quick" if args.quick else ""))
    if device == "cpu":
        hb_rows, hb_goals = host_bound_rows(repeats * 3, total_steps)
        rows += hb_rows
        goals += hb_goals
        notes += (" Rows with a setting: SmolLM2-135M's layout (30 blocks, 210 adapted linears) "
                  "at width 16 on 2 x 8 tokens, random init, where a step is host time only "
                  f"(median of {repeats * 3} round-robin steps).")
    common.write_results("bench_step", device, args.out, rows, goals, notes)
    for gl in goals:
        print(gl)


if __name__ == "__main__":
    main()
