"""Forward+backward of one adapted linear layer: VarRankLoRALinear against PEFT, in one process.

    python python/bench/bench_lora_op.py [--device cpu|cuda] [--quick] [--out DIR]

Per layer shape and token count, every implementation gets its own copy of one frozen nn.Linear
and runs y = layer(x); y.backward(g) with x requiring grad (as inside a model):

- ours      VarRankLoRALinear(r_max, active components = a prefix of `active`)
- lora      PEFT LoRA ``peft.tuners.lora.layer.Linear`` at r = our active rank
- adalora   PEFT AdaLoRA ``SVDLinear`` at r = r_max with the inactive components masked (E = 0),
            which is how AdaLoRA prunes: its compute stays at r_max whatever the mask. Its time does
            not depend on the mask, so one AdaLoRA timing per r_max serves every row of that r_max.
- base      the frozen nn.Linear alone: the floor every adapter adds to.

One more row times a 16x16 layer on 8 tokens (r 8), where the compute is negligible: the host time
(Python, dispatch, autograd, launches) each adapter adds per layer, which is what bounds training
steps of small models on a GPU.

Timings are interleaved round-robin (one call of each implementation per round), so machine noise
hits all of them alike; figures are medians. "overhead" = time - base time: the adapter's own cost,
which is what the goals on rank scaling and on AdaLoRA are about (on large layers the frozen GEMMs
are >95% of the time and equal for everyone). Memory: on CUDA the peak allocated during one
fwd+bwd; on CPU (no allocator statistics) the bytes each layer saves for backward beyond x and the
parameters, which is what an adapter adds to training memory.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from tsqlora_ext.layers import VarRankLoRALinear  # noqa: E402

CPU_SHAPES = [(384, 384), (384, 1536), (1536, 384), (2048, 2048), (2048, 5632)]
CPU_TOKENS = [512, 4096]
# (r_max, active): the AdaLoRA goal's point, the rank sweep at r_max 64, and r_max 4 for its goal.
CONFIGS = [(12, 8), (64, 4), (64, 16), (64, 64), (4, 4)]


def peft_lora(base: nn.Linear, r: int, alpha: float):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear
    layer = Linear(base, "default", LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    with torch.no_grad():  # PEFT starts B at 0; any values time the same, nonzero ones are honest
        layer.lora_B["default"].weight.normal_(std=0.02)
    return layer


def peft_adalora(base: nn.Linear, r_max: int, active: int, alpha: float):
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import SVDLinear
    layer = SVDLinear(base, "default", AdaLoraConfig(total_step=1000, init_r=r_max), r=r_max,
                      lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_E["default"][active:] = 0.0  # AdaLoRA's masking of pruned components
    return layer


def ours(base: nn.Linear, r_max: int, active: int, alpha: float):
    layer = VarRankLoRALinear(base, r_max=r_max, r_init=active, alpha=alpha, init="adalora")
    with torch.no_grad():
        layer.lora_E.normal_()
    return layer


def copy_of(base: nn.Linear) -> nn.Linear:
    new = nn.Linear(base.in_features, base.out_features, device=base.weight.device,
                    dtype=base.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(base.weight)
        new.bias.copy_(base.bias)
    new.requires_grad_(False)
    return new


def step_fn(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]

    def fn():
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(g)
    return fn


def saved_mb(layer: nn.Module, x: torch.Tensor) -> float:
    """MiB saved for backward beyond x and the layer's own parameters/buffers."""
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    own.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values()) / 2**20


def layer_inputs(n_in, n_out, tokens, device, dtype=torch.float32):
    """A frozen nn.Linear, an input x that requires grad (as inside a model) and an output
    gradient g, seeded so every implementation timed against them sees the same numbers."""
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, n_out, device=device, dtype=dtype)
    return base, x, g


def bench_shape(n_in, n_out, tokens, configs, device, dtype, repeats, alpha=16.0):
    base, x, g = layer_inputs(n_in, n_out, tokens, device, dtype)
    layers = {"base": copy_of(base)}
    for r_max, act in configs:
        layers[f"ours {r_max}/{act}"] = ours(copy_of(base), r_max, act, alpha)
        layers.setdefault(f"lora {act}", peft_lora(copy_of(base), act, alpha))
        layers.setdefault(f"adalora {r_max}", peft_adalora(copy_of(base), r_max, act, alpha))
    layers = {k: v.to(device=device, dtype=dtype) for k, v in layers.items()}
    fns = {k: step_fn(layer, x, g) for k, layer in layers.items()}
    ms = common.round_robin_ms(fns, device, repeats)
    if device == "cuda":
        mem = {k: common.peak_memory_mb(fn, device) for k, fn in fns.items()}
    else:
        mem = {k: saved_mb(layer, x) for k, layer in layers.items()}
    rows = []
    for r_max, act in configs:
        o, lo, ad, b = ms[f"ours {r_max}/{act}"], ms[f"lora {act}"], ms[f"adalora {r_max}"], ms["base"]
        rows.append({
            "shape": f"{n_in}x{n_out}", "tokens": tokens, "r_max": r_max, "active": act,
            "base_ms": round(b, 3), "ours_ms": round(o, 3), "lora_ms": round(lo, 3),
            "adalora_ms": round(ad, 3),
            "ours/lora": round(o / lo, 3), "adalora/ours": round(ad / o, 3),
            "ours_overhead_ms": round(o - b, 3), "lora_overhead_ms": round(lo - b, 3),
            "adalora_overhead_ms": round(ad - b, 3),
            ("peak_mb" if device == "cuda" else "saved_mb") + " ours/lora/adalora":
                f"{mem[f'ours {r_max}/{act}']:.2f}/{mem[f'lora {act}']:.2f}/{mem[f'adalora {r_max}']:.2f}",
        })
        print(rows[-1], flush=True)
    return rows


def host_latency(device: str, repeats: int) -> dict:
    """fwd+bwd of a 16x16 layer on 8 tokens at r 8: the compute is negligible, so the time is the
    host's (Python, dispatch, autograd, kernel launches). Where steps are launch-bound (small
    models on a GPU), this is what an adapter adds per layer."""
    base, x, g = layer_inputs(16, 16, 8, device)
    layers = {"base": copy_of(base), "ours": ours(copy_of(base), 8, 8, 16.0),
              "lora": peft_lora(copy_of(base), 8, 16.0)}
    layers = {k: v.to(device) for k, v in layers.items()}
    us = {k: 1e3 * v for k, v in common.round_robin_ms(
        {k: step_fn(layer, x, g) for k, layer in layers.items()}, device, repeats, warmup=50).items()}
    return {"set": "host latency: 16x16, 8 tokens, r 8", "base_us": round(us["base"], 1),
            "ours_us": round(us["ours"], 1), "lora_us": round(us["lora"], 1),
            "ours/lora": round(us["ours"] / us["lora"], 3),
            "ours_over_base_us": round(us["ours"] - us["base"], 1),
            "lora_over_base_us": round(us["lora"] - us["base"], 1)}


def kernel_rows(device: str, dtype: torch.dtype, n: int = 4096, tokens: int = 8192,
                r: int = 16) -> list[dict]:
    """Where one fwd+bwd of the GPU goal's layer spends device time, kernel by kernel: ours at
    r 16, PEFT LoRA at r 16 and the frozen base (the gap to the 10% goal is in these tables)."""
    base, x, g = layer_inputs(n, n, tokens, device, dtype)
    layers = {f"kernels: ours r {r}": ours(copy_of(base), r, r, 16.0),
              f"kernels: PEFT LoRA r {r}": peft_lora(copy_of(base), r, 16.0),
              "kernels: frozen base": copy_of(base)}
    rows = []
    for label, layer in layers.items():
        rows += common.kernel_table(step_fn(layer.to(device=device, dtype=dtype), x, g), device,
                                    label)
    return rows


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def overhead_ratio(num: float, den: float) -> float:
    # Overheads are differences of medians: a non-positive one is lost in noise and not a ratio.
    return num / den if num > 0 and den > 0 else float("nan")


def overhead_goal(name: str, ratios: list[float], target: float, higher_is_better: bool) -> dict:
    """A goal on the geomean of the rows' overhead ratios, naming how many rows had one (a row
    whose overhead is lost in noise has none); with none at all it stays in the list, unmet and
    unmeasured, instead of vanishing."""
    kept = [v for v in ratios if not math.isnan(v)]
    g = common.goal(f"{name} (geomean of the {len(kept)} of {len(ratios)} rows with overheads "
                    "above noise)", geomean(kept) if kept else target, target, higher_is_better, "x")
    return g if kept else {**g, "measured": None, "met": False}


def cpu_goals(rows) -> list[dict]:
    at = {(r["shape"], r["tokens"], r["r_max"], r["active"]): r for r in rows}
    goals = [
        common.goal("ours / PEFT LoRA time at the same active rank (geomean of all rows)",
                    geomean(r["ours/lora"] for r in rows), 1.0, higher_is_better=False, unit="x"),
        common.goal("ours / PEFT LoRA time at the same active rank (worst row)",
                    max(r["ours/lora"] for r in rows), 1.0, higher_is_better=False, unit="x"),
    ]
    ada = [r for r in rows if (r["r_max"], r["active"]) == (12, 8)]
    goals.append(common.goal("AdaLoRA(r_max 12) / ours(12, active 8), whole layer fwd+bwd (geomean)",
                             geomean(r["adalora/ours"] for r in ada), 1.3, higher_is_better=True,
                             unit="x"))
    ada_over = [overhead_ratio(r["adalora_overhead_ms"], r["ours_overhead_ms"]) for r in ada]
    goals.append(overhead_goal("AdaLoRA(r_max 12) / ours(12, active 8), adapter overhead above the "
                               "frozen base", ada_over, 1.3, higher_is_better=True))
    whole, over = [], []
    for (shape, tokens, r_max, act), r in at.items():
        if (r_max, act) == (64, 4):
            r4 = at[(shape, tokens, 4, 4)]
            whole.append(r["ours_ms"] / r4["ours_ms"])
            over.append(overhead_ratio(r["ours_overhead_ms"], r4["ours_overhead_ms"]))
    goals.append(common.goal("ours: active 4 of r_max 64 / r_max 4, whole layer (worst row)",
                             max(whole), 1.15, higher_is_better=False, unit="x"))
    goals.append(overhead_goal("ours: active 4 of r_max 64 / r_max 4, adapter overhead", over, 1.15,
                               higher_is_better=False))
    return goals


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--threads", type=int, default=0,
        help="CPU threads for torch (default: torch's own choice). On a shared, oversubscribed "
             "machine 1 thread gives far steadier ratios: a descheduled BLAS thread stalls its peer"))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import peft  # noqa: F401
    except ImportError:
        raise SystemExit("bench_lora_op needs peft (pip install peft) for the peer layers")
    rows = []
    if args.device == "cpu":
        shapes = CPU_SHAPES if not args.quick else [CPU_SHAPES[0], CPU_SHAPES[3]]
        for n_in, n_out in shapes:
            for tokens in CPU_TOKENS if not args.quick else [512]:
                work = tokens * n_in * n_out  # the frozen GEMMs dominate: size repeats by them
                repeats = 3 if work > 1e10 else 5 if work > 2e9 else 15
                rows += bench_shape(n_in, n_out, tokens, CONFIGS, "cpu", torch.float32,
                                    3 if args.quick else repeats)
        goals = cpu_goals(rows)
        # The whole-layer AdaLoRA ratio is capped by the frozen GEMMs both layers run: an adapter
        # that cost nothing would reach adalora_ms / base_ms and no more.
        free = geomean(r["adalora_ms"] / r["base_ms"] for r in rows
                       if (r["r_max"], r["active"]) == (12, 8))
        notes = (f"float32, {torch.get_num_threads()} thread(s), fwd+bwd with dx, medians of "
                 "round-robin repeats (3-15 by size). "
                 "adalora_ms at a given r_max is one timing shared by the rows of that r_max. "
                 f"An adapter costing nothing would reach AdaLoRA/ours = {free:.3g}x whole layer "
                 "(geomean of adalora_ms / base_ms over the r_max 12 rows).")
    else:
        # The GPU goal: d = 4096, r = 16, 8192 tokens, bf16: adapter adds <= 10% to the frozen base.
        configs = [(16, 16), (64, 4), (64, 16), (64, 64)]
        rows = bench_shape(4096, 4096, 8192, configs, "cuda", torch.bfloat16, 5 if args.quick else 30)
        head = rows[0]
        goals = [
            common.goal("ours (r 16) adds to the frozen base fwd+bwd, d 4096, 8192 tokens, bf16",
                        100 * (head["ours_ms"] / head["base_ms"] - 1), 10.0, higher_is_better=False,
                        unit="%"),
            common.goal("ours / PEFT LoRA at r 16", head["ours/lora"], 1.0, higher_is_better=False,
                        unit="x"),
        ]
        rows += kernel_rows("cuda", torch.bfloat16)
        notes = ("bf16 on CUDA, fwd+bwd with dx; peak_mb = peak allocated during one fwd+bwd. "
                 f"PEFT LoRA r 16 adds {100 * (head['lora_ms'] / head['base_ms'] - 1):.1f}% to the "
                 f"frozen base in the same run (ours: {100 * (head['ours_ms'] / head['base_ms'] - 1):.1f}%).")
    latency = host_latency(args.device, 200 if args.quick else 2000)
    print(latency)
    rows.append(latency)
    goals.append(common.goal("ours / PEFT LoRA fwd+bwd, launch-bound tiny layer (host time)",
                             latency["ours/lora"], 1.0, higher_is_better=False, unit="x"))
    common.write_results("bench_lora_op", args.device, args.out, rows, goals, notes)
    for gl in goals:
        print(gl)


if __name__ == "__main__":
    main()
