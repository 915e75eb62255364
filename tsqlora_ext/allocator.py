"""RankAllocator: moves rank budget between the VarRankLoRALinear layers of a model.

It drives three native ops:
- ``layer_sensitivity`` on calibration batches gives each layer's S_l, and the starting budget
  B_0 is shared in proportion to S_l (``calibrate``);
- ``sensitivity_update`` after every optimizer step refreshes the EMAs of |p ⊙ ∇p| and the
  component scores of all layers in one call, with no host sync;
- ``topk_realloc`` every ``delta_t`` steps of the budget phase keeps the b(t) best components.

Typical loop::

    alloc = RankAllocator(model, config)
    alloc.calibrate(calibration_batches)      # optional: sensitivity-proportional initial ranks
    for batch in data:
        loss = model(**batch).loss + alloc.orthogonality_penalty()
        loss.backward()
        optimizer.step()
        alloc.step()                          # after optimizer.step(), before zero_grad()
        optimizer.zero_grad()

It counts optimizer steps: call ``step()`` once per optimizer step, never per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .config import TsqLoRAConfig, check_layer_fields
from .layers import VarRankLoRALinear, refuse_merged


def budget_schedule(step: int, b0: int, b_t: int, t_init: int, t_final: int, total_steps: int) -> int:
    """b(t): B_0 up to t_init, then b_T + (B_0 − b_T)(1 − (t − t_init)/(T − t_final − t_init))³
    (rounded down, as PEFT), and b_T from T − t_final on."""
    if step <= t_init:
        return b0
    span = total_steps - t_final - t_init
    if step >= total_steps - t_final or span <= 0:
        return b_t
    frac = 1.0 - (step - t_init) / span
    return int(b_t + (b0 - b_t) * frac**3)


def proportional_ranks(weights: list[float], total: int, r_min: int, r_max: int) -> list[int]:
    """Share ``total`` among layers in proportion to ``weights``, each within [r_min, r_max].

    Layers whose share falls outside the bounds are clipped and the rest is re-shared among the
    others (water-filling, one side of the bounds per round); the real-valued shares are then
    rounded by largest remainder (ties to the lower layer index), so the ranks add up to total
    clamped to [n r_min, n r_max]. All-zero weights share equally.
    """
    n = len(weights)
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"proportional_ranks: weights must be finite and >= 0, got {weights}")
    total = min(max(total, n * r_min), n * r_max)
    w = list(weights) if sum(weights) > 0 else [1.0] * n
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        left = total - sum(fixed.values())
        wsum = sum(w[i] for i in free)
        share = {i: (left * w[i] / wsum if wsum > 0 else left / len(free)) for i in free}
        low = [i for i in free if share[i] < r_min]
        high = [i for i in free if share[i] > r_max]
        if not low and not high:
            break
        # Pin only the side that overshoots more: re-sharing then moves every free share towards
        # that side, so its layers stay out of bounds. Pinning both at once is wrong when the
        # re-shared rest pushes the other side's layers back inside (the sum misses the budget).
        if sum(share[i] - r_max for i in high) >= sum(r_min - share[i] for i in low):
            fixed.update((i, r_max) for i in high)
        else:
            fixed.update((i, r_min) for i in low)
    ranks = [fixed.get(i, 0) for i in range(n)]
    for i, s in share.items():
        ranks[i] = int(math.floor(s))
    rest = total - sum(ranks)
    by_remainder = sorted(share, key=lambda i: (-(share[i] - math.floor(share[i])), i))
    for i in by_remainder[:rest]:
        ranks[i] += 1
    return ranks


def orthogonality_penalty(layers: Iterable[VarRankLoRALinear], weight: float) -> torch.Tensor:
    """weight · Σ_l (‖A_act A_actᵀ − I‖_F + ‖B_actᵀ B_act − I‖_F) over each layer's active
    components (differentiable; 0 for an empty set of layers or weight 0)."""
    total = None
    for layer in layers:
        # Over all r_max components with the inactive ones selected out (not multiplied by 0,
        # which makes an inactive inf NaN): the same norms as over the active rows alone, in
        # shapes that do not change with the rank (under torch.compile the rank is unknown, and
        # autograd cannot trace an r x r product of unknown r).
        slots = torch.arange(layer.r_max, device=layer.lora_A.device)
        keep = (layer.compute_ids()[:, None] == slots).any(0)
        a = torch.where(keep[:, None], layer.lora_A, 0.0)
        b = torch.where(keep, layer.lora_B, 0.0)
        eye = torch.diag(keep.to(a.dtype))
        term = torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)
        total = term if total is None else total + term
    if total is None or weight == 0:
        return torch.zeros(())
    return weight * total


@torch.no_grad()
def _initial_components(layer: VarRankLoRALinear, rank: int) -> torch.Tensor:
    """The ``rank`` component ids a layer starts training with. An adapter the warm-up trained
    carries on: a layer cut below its current rank keeps the components that carry most of its
    ΔW, |E_k|·‖A_k‖·‖B_k‖ (the others wait inactive, their values kept, for a reallocation to bring
    them back), and a layer raised above it keeps all of them and adds the lowest free ids.
    Untrained components all measure 0 (E or B starts at 0), so they go by id: the first ``rank``."""
    active = layer.active.cpu()
    if rank >= active.numel():
        free = layer.inactive.cpu()
        return torch.cat([active, free[:rank - active.numel()]])
    strength = (layer.lora_E.abs() * layer.lora_A.norm(dim=1) * layer.lora_B.norm(dim=0)).float().cpu()
    order = torch.sort(strength[active], descending=True, stable=True).indices  # ties: lower id
    return active[order[:rank]]


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over processes (in place) so every rank makes the same decision."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


class RankAllocator:
    """Sensitivity-driven rank allocation over every ``VarRankLoRALinear`` in ``model``.

    Args:
        model: the adapted model (its ``VarRankLoRALinear`` modules are found by name).
        config: ``TsqLoRAConfig``; uses r_init, target_r, r_min, r_max, t_init, t_final, delta_t,
            total_steps, beta1, beta2, orth_reg_weight, allow_growth, sensitivity_init, dynamic,
            calibration_batches.

    Attributes:
        history: one entry per allocation decision, ``{"step", "budget", "ranks": {name: rank}}``
            (the initial one at step 0), ready for a rank heatmap. ``budget`` is what the
            schedule asked for, in config.budget_unit (ranks: raised to Σ r_min; the ranks sum to
            less when fewer components could be kept: Σ r_max, or allow_growth=False with fewer
            active).
        layer_sensitivity: {name: S_l} after ``calibrate``.
    """

    def __init__(self, model: nn.Module, config: TsqLoRAConfig) -> None:
        self.config = config
        self.layers: dict[str, VarRankLoRALinear] = {
            name: m for name, m in model.named_modules() if isinstance(m, VarRankLoRALinear)
        }
        if not self.layers:
            raise ValueError("RankAllocator: the model holds no VarRankLoRALinear layer to allocate")
        check_layer_fields(model, config, "RankAllocator")
        refuse_merged(model, "RankAllocator")
        self.names = list(self.layers)
        mods = list(self.layers.values())
        # A, E, B of every layer in order, and zero stand-ins for missing gradients (update_scores).
        self._params = [p for m in mods for p in (m.lora_A, m.lora_E, m.lora_B)]
        self._zeros: dict[torch.Tensor, torch.Tensor] = {}
        self.sizes = [m.r_max for m in mods]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(mods))]
        # Parameters of one component of each layer: its A row, B column and E entry.
        self.costs = [m.lora_A.shape[1] + m.lora_B.shape[0] + 1 for m in mods]
        self.b0, self.b_t = config.budget(self.costs)
        device = mods[0].lora_A.device
        # EMA state, one flat float32 buffer per layer holding A's, E's, B's elements in order.
        self.ipt_avg = [torch.zeros(m.lora_A.numel() + m.lora_E.numel() + m.lora_B.numel(),
                                    device=device, dtype=torch.float32) for m in mods]
        self.unc_avg = [torch.zeros_like(t) for t in self.ipt_avg]
        self.scores = torch.zeros(sum(self.sizes), device=device, dtype=torch.float32)
        # [updates applied, steps skipped for non-finite gradients]; read on demand only.
        self.counters = torch.zeros(2, device=device, dtype=torch.long)
        self.global_step = 0
        # A reallocation due on a skipped step (grads_finite=False), made at the next good one.
        self.deferred = False
        self.history: list[dict[str, Any]] = []
        self.layer_sensitivity: dict[str, float] = {}
        self._refresh_mask()
        self._record(budget=self._spent([m.rank for m in mods]))

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _refresh_mask(self) -> None:
        """active_mask from the layers' active ids, built where the scores live (no host sync)."""
        device = self.scores.device
        self._remember_ids()
        ids = torch.cat([a.to(device) + off for off, a in zip(self.offsets, self._mask_of)])
        self.active_mask = torch.zeros(sum(self.sizes), dtype=torch.bool,
                                       device=device).index_fill_(0, ids, True)

    def _remember_ids(self) -> None:
        """Note which active ids active_mask now stands for (``ids_key`` of every layer)."""
        mods = list(self.layers.values())
        self._mask_of = [m.active for m in mods]  # held, so the keys' ids stay theirs
        self._mask_keys = [m.ids_key() for m in mods]

    def _follow_active_sets(self) -> None:
        """Rebuild active_mask when a layer's active ids changed since it was built from them:
        set_active, load_state_dict, an assignment or a copy into the buffer outside the
        allocator (a model checkpoint loaded after the allocator was made). A stale mask had the
        update score the components now inactive, and allow_growth=False bring back pruned ones."""
        if [m.ids_key() for m in self.layers.values()] != self._mask_keys:
            self._refresh_mask()

    def _record(self, budget: int) -> None:
        self.history.append({"step": self.global_step, "budget": int(budget), "ranks": self.ranks()})

    def _follow_model(self) -> None:
        """Before each use: the state follows the adapters' device and active sets. (The allocator
        may be built before the model is moved, wrap, RankAllocator, model.cuda(), and a same-device
        check of the fused op would fail.)"""
        device = next(iter(self.layers.values())).lora_A.device
        if self.scores.device != device:
            self.ipt_avg = [t.to(device) for t in self.ipt_avg]
            self.unc_avg = [t.to(device) for t in self.unc_avg]
            self.scores, self.counters = self.scores.to(device), self.counters.to(device)
            self.active_mask = self.active_mask.to(device)
        self._follow_active_sets()

    def _spent(self, ranks: list[int]) -> int:
        """What per-layer ranks cost in config.budget_unit."""
        if self.config.budget_unit == "params":
            return sum(r * c for r, c in zip(ranks, self.costs))
        return sum(ranks)

    def ranks(self) -> dict[str, int]:
        """{layer name: current rank}."""
        return {name: m.rank for name, m in self.layers.items()}

    def set_total_steps(self, total_steps: int) -> None:
        """Fill in T (the trainer knows it once the data is known)."""
        self.config = self.config.replace(total_steps=int(total_steps))

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps whose gradients held NaN/inf and left the scores untouched (syncs)."""
        return int(self.counters[1])

    def orthogonality_penalty(self) -> torch.Tensor:
        """config.orth_reg_weight · Σ (‖A_act A_actᵀ − I‖_F + ‖B_actᵀ B_act − I‖_F)."""
        return orthogonality_penalty(self.layers.values(), self.config.orth_reg_weight)

    # ---- initial allocation --------------------------------------------------------------------
    def calibrate(
        self,
        batches: Iterable[Any],
        model: nn.Module | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> dict[str, int]:
        """Measure S_l = mean over K batches of Σ|W_l ⊙ δᵀX| and share B_0 in proportion.

        ``batches`` yields model inputs (a dict is passed as ``model(**batch)``, anything else as
        ``model(batch)``); the loss is ``loss_fn(output, batch)``, or ``output.loss``. At most
        ``config.calibration_batches`` batches are used. Parameters' gradients are left as they
        were before the call (calibration's own are discarded). With ``sensitivity_init=False``
        every layer gets r_init and no batch is run. Which components a layer keeps: see
        ``_initial_components``. Returns the new ranks.
        """
        cfg = self.config
        self._follow_model()  # the sensitivity totals live with the scores
        mods = list(self.layers.values())
        if not cfg.sensitivity_init:
            ranks = [cfg.r_init] * len(mods)
        else:
            if model is None:
                raise ValueError("RankAllocator.calibrate: pass the model to run the batches through")
            sens = self._measure_sensitivity(model, batches, loss_fn)
            self.layer_sensitivity = dict(zip(self.names, sens))
            ranks = self._initial_ranks(sens)
        for m, r in zip(mods, ranks):
            m.set_active(_initial_components(m, r))
        self._refresh_mask()
        self.history = [h for h in self.history if h["step"] != self.global_step]
        self._record(budget=self._spent(ranks))
        return self.ranks()

    def _initial_ranks(self, sens: list[float]) -> list[int]:
        """B_0 shared in proportion to S_l. A parameter budget gives layer l parameters in
        proportion to S_l, i.e. rank in proportion to S_l / cost_l, over the total rank that B_0
        buys at those shares (the rounding and the [r_min, r_max] clipping can move the parameter
        total off B_0 by a few components; every reallocation fits the schedule's budget)."""
        cfg = self.config
        if cfg.budget_unit == "rank":
            return proportional_ranks(sens, self.b0, cfg.r_min, cfg.r_max)
        total = sum(sens)
        if total == 0:  # (no signal: equal parameters, as equal ranks share a rank budget)
            sens, total = [1.0] * len(sens), float(len(sens))
        weights = [s / c for s, c in zip(sens, self.costs)]
        rank_total = self.b0 * sum(weights) / total
        return proportional_ranks(weights, round(rank_total), cfg.r_min, cfg.r_max)

    def _measure_sensitivity(self, model, batches, loss_fn) -> list[float]:
        mods = list(self.layers.values())
        totals = torch.zeros(len(mods), dtype=torch.float64, device=self.scores.device)
        # Calibration's backward must not add into gradients the caller holds (a step under way):
        # they are set aside and put back as they were.
        held = {p: p.grad for p in model.parameters()}
        for p in held:
            p.grad = None
        handles = []

        def hook(i: int, layer: VarRankLoRALinear):
            def forward_hook(module, args, output):
                x = args[0].detach()

                def grad_hook(g: torch.Tensor) -> None:
                    # y = base(x) + adapter(x): the gradient of the base output is that of y.
                    s = ops.layer_sensitivity(layer.base_layer.weight.detach(), x, g.detach())
                    totals[i] += s.to(totals.dtype)

                if output.requires_grad:
                    output.register_hook(grad_hook)
            return forward_hook

        for i, m in enumerate(mods):
            handles.append(m.register_forward_hook(hook(i, m)))
        n = 0
        was_training = model.training
        try:
            model.eval()  # no dropout: the sensitivity of the model itself
            for batch in batches:
                if n >= self.config.calibration_batches:
                    break
                with torch.enable_grad():
                    out = model(**batch) if isinstance(batch, dict) else model(batch)
                    loss = loss_fn(out, batch) if loss_fn is not None else out.loss
                    loss.backward()
                n += 1
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
            for p, g in held.items():
                p.grad = g
        if n == 0:
            raise ValueError("RankAllocator.calibrate: no calibration batch was given")
        totals /= n
        _all_reduce_mean(totals)
        return totals.tolist()

    # ---- per-step work -------------------------------------------------------------------------
    def budget(self, step: int | None = None) -> int:
        """b(t) at ``step`` (default: the current optimizer step)."""
        cfg = self.config
        if cfg.total_steps is None:
            raise ValueError("RankAllocator: config.total_steps is unset; call set_total_steps(T)")
        t = self.global_step if step is None else step
        return budget_schedule(t, self.b0, self.b_t, cfg.t_init, cfg.t_final, cfg.total_steps)

    @torch.no_grad()
    def update_scores(self, grads_finite: bool | None = None) -> None:
        """One fused sensitivity update from the current gradients (no host sync).

        ``grads_finite``: what the caller already knows of the gradients. None: the op scans them
        and skips the update if one is NaN/inf. True: it skips that scan (one read of every
        adapter gradient less). False: no update, counted as a skipped step.

        The per-step host work is kept to building one list of gradients: the parameters go to
        the op as they are (no ``detach`` views: grad mode is off and the op only reads them), and
        a parameter without a gradient contributes a zero buffer made once, not a fresh
        ``zeros_like`` every step.
        """
        self._follow_model()
        if grads_finite is False:
            self.counters[1] += 1
            return
        grads = [p.grad if p.grad is not None else self._zero_grad(p) for p in self._params]
        ops.sensitivity_update(
            self._params[0::3], self._params[1::3], self._params[2::3],
            grads[0::3], grads[1::3], grads[2::3],
            self.ipt_avg, self.unc_avg, self.active_mask, self.scores, self.counters,
            self.config.beta1, self.config.beta2, check_finite=grads_finite is None)

    def _zero_grad(self, p: torch.Tensor) -> torch.Tensor:
        """A zero tensor standing for p's missing gradient (read-only for the op; kept across
        steps, remade when p changes shape, dtype or device)."""
        z = self._zeros.get(p)
        if z is None or z.shape != p.shape or z.dtype != p.dtype or z.device != p.device:
            z = self._zeros[p] = torch.zeros_like(p)
        return z

    def step(self, grads_finite: bool | None = None) -> dict[str, int] | None:
        """Call once after each optimizer step (a skipped one included, with grads_finite=False,
        so the schedule keeps counting optimizer steps). Updates the scores (see update_scores
        for ``grads_finite``) and, every delta_t steps of the budget phase (and once when it
        ends), reallocates. A reallocation due on a skipped step waits for the next good one,
        at that step's budget: the active sets change only with the parameters, so a run that
        stops after skipped steps holds its last good step's model. Returns the new ranks when
        it reallocated, else None."""
        cfg = self.config
        self.global_step += 1
        if not cfg.dynamic:
            return None
        if cfg.total_steps is None:
            raise ValueError("RankAllocator.step: config.total_steps is unset; call set_total_steps(T)")
        t, end = self.global_step, cfg.total_steps - cfg.t_final
        due = t == end or (t > cfg.t_init and t % cfg.delta_t == 0)
        if grads_finite is False and t <= end:
            self.update_scores(False)
            self.deferred |= due
            return None
        if t > end and not (self.deferred and grads_finite is not False):
            if grads_finite is False:
                self.counters[1] += 1  # no update is due after the budget phase, but it is skipped
            return None  # ranks frozen for the final t_final steps
        if t <= end:
            skipped = self.counters[1].clone() if due and grads_finite is None else None
            self.update_scores(grads_finite)
            # The op found a NaN/inf gradient and skipped the update: the reallocation waits, as
            # on a step the caller reports skipped. Only a due step asks (one host sync; the
            # reallocation syncs anyway).
            if skipped is not None and bool(self.counters[1] != skipped):
                self.deferred = True
                return None
        if due or self.deferred:
            self.deferred = False
            return self.reallocate(self.budget(t))
        return None

    @torch.no_grad()
    def reallocate(self, budget: int) -> dict[str, int]:
        """Keep the ``budget`` best components over all layers (within [r_min, r_max] each) and
        apply them as the new active sets. One host sync. With budget_unit='params' the budget
        counts parameters: the largest number of best components whose parameters fit (see
        _within_params)."""
        cfg = self.config
        self._follow_model()
        mods = list(self.layers.values())
        scores = _all_reduce_mean(self.scores.clone())
        r_min = [min(cfg.r_min, s) for s in self.sizes]
        r_max = [min(cfg.r_max, s) for s in self.sizes]
        if not cfg.allow_growth:
            # Only ever prune: a layer may keep at most its current components, and no inactive
            # one can outrank an active one.
            r_max = [min(h, m.rank) for h, m in zip(r_max, mods)]
            r_min = [min(lo, h) for lo, h in zip(r_min, r_max)]
            # An active component's NaN score (the op ranks NaN as -inf) must still beat them.
            lowest = torch.finfo(scores.dtype).min
            scores = torch.where(self.active_mask, scores.nan_to_num(nan=lowest, posinf=float("inf")),
                                 float("-inf"))
        bounds = ops.realloc_bounds(self.sizes, r_min, r_max)
        if cfg.budget_unit == "params":
            keep = self._within_params(scores, bounds, int(budget), sum(r_min),
                                       sum(min(h, s) for h, s in zip(r_max, self.sizes)))
        else:
            budget = max(int(budget), sum(r_min))
            keep = ops.topk_realloc(scores, bounds, budget)
        keep_cpu = keep.cpu()
        for off, size, m in zip(self.offsets, self.sizes, mods):
            m.set_active(torch.nonzero(keep_cpu[off:off + size]).flatten())
        self.active_mask = keep
        self._remember_ids()
        self._record(budget=budget)
        return self.ranks()

    def _within_params(self, scores: torch.Tensor, bounds: torch.Tensor, budget: int, lo: int,
                       hi: int) -> torch.Tensor:
        """The keep-mask of the largest number of best components whose parameters fit ``budget``
        (never fewer than Σ r_min). topk_realloc's choice for k components holds its choice for
        k − 1 (one global order), so their cost grows with k and a binary search over k finds the
        largest that fits: ~log2(n) calls of the op, each one host sync (every delta_t steps)."""
        cost = torch.repeat_interleave(torch.tensor(self.costs, device=scores.device),
                                       torch.tensor(self.sizes, device=scores.device))

        def choose(k: int) -> torch.Tensor:
            return ops.topk_realloc(scores, bounds, k)

        keep = choose(lo)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = choose(mid)
            if int(cost[trial].sum()) <= budget:
                lo, keep = mid, trial
            else:
                hi = mid - 1
        return keep

    # ---- checkpointing ---------------------------------------------------------------------------
    def _schedule(self) -> dict[str, int | None]:
        """What the budget at each step follows: a resumed run must follow the same."""
        cfg = self.config
        return {"total_steps": cfg.total_steps, "t_init": cfg.t_init, "t_final": cfg.t_final,
                "delta_t": cfg.delta_t, "b0": self.b0, "b_t": self.b_t, "budget_unit": cfg.budget_unit}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: EMAs, scores, counters, step, active sets, history,
        and the schedule they belong to."""
        return {
            "schedule": self._schedule(),
            "global_step": self.global_step,
            "ipt_avg": [t.clone() for t in self.ipt_avg],
            "unc_avg": [t.clone() for t in self.unc_avg],
            "scores": self.scores.clone(),
            "counters": self.counters.clone(),
            "active": {name: m.active.clone() for name, m in self.layers.items()},
            "history": [dict(h, ranks=dict(h["ranks"])) for h in self.history],
            "layer_sensitivity": dict(self.layer_sensitivity),
            "deferred": self.deferred,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``. Everything is checked before anything changes, so a
        rejected state leaves the allocator and the model's active sets as they were."""
        where = "RankAllocator.load_state_dict"
        missing = [k for k in ("global_step", "ipt_avg", "unc_avg", "scores", "counters", "active",
                               "history", "layer_sensitivity") if k not in state]
        if missing:
            raise ValueError(f"{where}: the state lacks {missing}; is it a RankAllocator.state_dict()?")
        if set(state["active"]) != set(self.names):
            raise ValueError(f"{where}: the checkpoint's layers "
                             f"{sorted(set(state['active']) ^ set(self.names))} do not match this "
                             "model's")
        # (States written before the schedule was saved carry none to compare.)
        saved = state.get("schedule", self._schedule())
        saved = {"budget_unit": "rank", **saved}  # (states written before it counted rank)
        changed = [f"{k} {saved.get(k)} (saved) vs {v} (now)" for k, v in self._schedule().items()
                   if saved.get(k) != v]
        if changed:
            raise ValueError(f"{where}: the checkpoint follows another rank schedule: "
                             f"{'; '.join(changed)}. Resume with the settings it was trained with")
        for name, tgt in (("ipt_avg", self.ipt_avg), ("unc_avg", self.unc_avg)):
            src = state[name]
            if len(src) != len(tgt):
                raise ValueError(f"{where}: {name} holds {len(src)} layers' tensors, expected "
                                 f"{len(tgt)}")
            for i, (t, s) in enumerate(zip(tgt, src)):
                if t.shape != s.shape:
                    raise ValueError(f"{where}: {name}[{i}] has shape {tuple(s.shape)}, expected "
                                     f"{tuple(t.shape)}")
        for name, tgt in (("scores", self.scores), ("counters", self.counters)):
            if not torch.is_tensor(state[name]) or state[name].shape != tgt.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(torch.as_tensor(state[name]).shape)}, "
                                 f"expected {tuple(tgt.shape)}")
        for name, m in self.layers.items():
            ids = torch.as_tensor(state["active"][name])
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or (
                    ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m.r_max)):
                raise ValueError(f"{where}: the active ids of {name} ({ids.tolist()}) are not "
                                 f"component ids in [0, r_max={m.r_max})")
        try:  # (copies, made before anything changes)
            history = [dict(h, ranks=dict(h["ranks"])) for h in state["history"]]
            sensitivity = dict(state["layer_sensitivity"])
            global_step = int(state["global_step"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{where}: malformed history, layer_sensitivity or global_step "
                             f"({type(e).__name__}: {e})") from None
        for tgt, src in ((self.ipt_avg, state["ipt_avg"]), (self.unc_avg, state["unc_avg"])):
            for t, s in zip(tgt, src):
                t.copy_(s)
        self.scores.copy_(state["scores"])
        self.counters.copy_(state["counters"])
        self.global_step = global_step
        self.deferred = bool(state.get("deferred", False))  # (absent from older states)
        for name, m in self.layers.items():
            m.set_active(state["active"][name])
        self._refresh_mask()
        self.history = history
        self.layer_sensitivity = sensitivity
