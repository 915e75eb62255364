"""Wrong-label guard: P(label is wrong) from each example's post-warm-up loss.

After a short warm-up a model has fitted the bulk of the (mostly clean) data but not the examples
whose label contradicts their text, so the losses form two populations: a large low-loss one (clean)
and a smaller high-loss one (mostly wrong labels). A two-component 1-D Gaussian mixture is fitted to
the losses by EM (DivideMix, Li et al. 2020, does the same on raw losses); an example's probability
of a wrong label is the posterior of the higher-mean component. The fit is deterministic: quantile
initialisation, no random restarts.

Gaussian tails can make that posterior fall again for very large losses (when the low component is
the wider one), which would spare the most extreme examples. The posterior is therefore made
non-decreasing in the loss (running maximum over the sorted losses): a larger loss is never judged
less likely to be wrong. The same tails bend it up again at the far *left* when the high component
is the wider one, so a clean example fitting better than the bulk would score near 1 and, through
the running maximum, lift every larger loss with it: below the low component's mean the probability
is 0 (such an example fits better than the typical clean one), and the maximum runs from there.
Nor is an example flagged whose loss is below ``MAX_CLEAN_LOSS``: it puts more than half of the
probability on its label, so the model agrees with that label.

Wrong labels are a minority by assumption. When the fitted high-loss component holds more than
``max_share`` of the pool (default one half), the losses did not split into "most fit, a few do
not" — typically the model has not learned enough yet — and the guard flags nothing rather than
drop a large, barely enriched share of the data; ``flag_mislabeled`` reports this.

Nor does it flag when the high-loss component is a *tail* rather than a *cluster*: its spread
(std / mean of the component's losses) above ``max_spread`` (default 0.55). On clean data the bulk
is fit confidently (a narrow low-loss peak) and the rest is the model's own long error tail, which
the mixture captures as one broad component (spread near 1, like an exponential tail); wrong labels
form a bump around the loss of confidently predicting the true label instead (spread well below 1).
Measured with MiniLM on 2,000 Rotten Tomatoes reviews (python/experiments/noisy_labels.py, seed 0,
lr 1e-3): spread 0.64 and 1.03 on clean labels after 40 and 120 warm-up steps, where the bare
mixture flagged 663 and 633 clean examples (a third of the pool); 0.39 and 0.45 with 20% of the
labels flipped. 0.55 lies between the two groups.

Nor does it flag before the model fits the bulk of the data: when the low-loss component's mean
loss exceeds ln 2 (``MAX_CLEAN_LOSS``: a typical clean example gets under half of the probability
on its label), the high-loss side is the model's ignorance, not the labels' fault. Measured with
MiniLM on BBC News (5 topics): after 27 warm-up steps (python/experiments/compare_methods.py caps
the warm-up at half an epoch) on clean labels the low component's mean was 0.77 and 0.79 at seeds 0
and 2, and the mixture, a narrow cluster, flagged 32 and 160 clean articles; after 120 steps with
20% / 40% of the labels flipped it was 0.18-0.20 / 0.45-0.52 (3 seeds), where the guard flagged
wrong labels at 74-91% precision.

Nor, last, when the two components' mean losses lie less than ``MIN_LOSS_GAP`` (ln 1.1, 0.095)
apart: the model gives the "suspect" labels over 90% of the probability it gives the clean ones,
so it does not tell them apart. A binary model at chance keeps its bulk just under ln 2, where the
'unfit' rule misses it. Measured with MiniLM on clean Rotten Tomatoes reviews (`tsqlora score`):
200 reviews after 0, 1 and 4 warm-up steps gave gaps of 0.014, 0.056 and 0.075 (low component
0.690, 0.666, 0.655), and the guard flagged 38, 89 and 87 of them, every one clean. With 20% of the
labels flipped the gap was 0.128 after a weak warm-up (tests/test_mislabel.py: 100 steps, head-mode
scores of 320 reviews; flagged reviews 31% flipped against 20% in the pool) and 0.55 after the
120-step one on 2,000 reviews. ln 1.1 lies between the two groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_CLEAN_LOSS = math.log(2)
# The least gap between the two components' mean losses for the high one to be wrong labels: under
# it the model gives the suspect labels over 90% of the probability it gives the clean ones.
MIN_LOSS_GAP = math.log(1.1)


@dataclass(frozen=True)
class LossMixture:
    """A fitted two-component mixture; component 1 is the high-loss (likely wrong-label) one."""

    weights: tuple[float, float]
    means: tuple[float, float]
    stds: tuple[float, float]
    iterations: int
    converged: bool


def _log_normal(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


def fit_loss_mixture(losses, max_iter: int = 200, tol: float = 1e-8) -> tuple[LossMixture, np.ndarray]:
    """Fit a two-component Gaussian mixture to 1-D losses by EM.

    Returns the mixture and each example's posterior of the high-mean component (not yet made
    monotone; see ``mislabel_probability``).
    """
    x = np.asarray(losses, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"fit_loss_mixture: need at least 2 losses, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"fit_loss_mixture: losses must be finite; {int((~np.isfinite(x)).sum())} are not")
    total_var = float(x.var())
    if total_var == 0.0:  # every loss equal: nothing to separate
        return LossMixture((1.0, 0.0), (float(x[0]),) * 2, (0.0, 0.0), 0, True), np.zeros_like(x)
    floor = 1e-6 * total_var
    mean = np.quantile(x, [0.25, 0.9])
    if mean[0] == mean[1]:  # >= 65% of the losses tie (e.g. exact zeros): EM would stay symmetric
        mean = np.array([x.min(), x.max()])
    var = np.full(2, total_var / 4)
    w = np.array([0.5, 0.5])
    prev = -np.inf
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        # E step in log space (losses far in a tail would underflow).
        logp = np.stack([np.log(w[k]) + _log_normal(x, mean[k], var[k]) for k in range(2)], axis=1)
        top = logp.max(axis=1, keepdims=True)
        log_norm = top + np.log(np.exp(logp - top).sum(axis=1, keepdims=True))
        resp = np.exp(logp - log_norm)
        ll = float(log_norm.sum())
        # M step.
        nk = resp.sum(axis=0) + 1e-12
        w = nk / nk.sum()  # (over x.size, the guard against an empty component made w sum above 1)
        mean = (resp * x[:, None]).sum(axis=0) / nk
        var = np.maximum((resp * (x[:, None] - mean) ** 2).sum(axis=0) / nk, floor)
        if abs(ll - prev) <= tol * max(1.0, abs(ll)):
            converged = True
            break
        prev = ll
    logp = np.stack([np.log(max(w[k], 1e-300)) + _log_normal(x, mean[k], var[k]) for k in range(2)], axis=1)
    logp -= logp.max(axis=1, keepdims=True)
    post = np.exp(logp)
    post /= post.sum(axis=1, keepdims=True)
    hi = int(np.argmax(mean))
    lo = 1 - hi
    mix = LossMixture((float(w[lo]), float(w[hi])), (float(mean[lo]), float(mean[hi])),
                      (float(np.sqrt(var[lo])), float(np.sqrt(var[hi]))), it, converged)
    return mix, post[:, hi]


def mislabel_probability(losses) -> tuple[np.ndarray, LossMixture]:
    """Each example's probability of a wrong label, non-decreasing in its loss, and the mixture."""
    x = np.asarray(losses, dtype=np.float64).ravel()
    mix, post = fit_loss_mixture(x)
    order = np.argsort(x, kind="stable")
    p = np.empty_like(post)
    p[order] = np.maximum.accumulate(np.where(x[order] <= mix.means[0], 0.0, post[order]))
    return p, mix


def high_loss_spread(mix: LossMixture) -> float:
    """std / mean of the high-loss component: about 1 for a tail, well below 1 for a cluster."""
    return mix.stds[1] / mix.means[1] if mix.means[1] > 0 else float("inf")


def guard_abstains(mix: LossMixture, max_share: float = 0.5, max_spread: float = 0.55) -> str | None:
    """Why the guard flags nothing for this mixture ('majority' / 'tail' / 'unfit' / 'no_gap'), or
    None when it may flag."""
    if mix.weights[1] > max_share:
        return "majority"
    if high_loss_spread(mix) > max_spread:
        return "tail"
    if mix.means[0] > MAX_CLEAN_LOSS:
        return "unfit"
    if mix.means[1] - mix.means[0] < MIN_LOSS_GAP:
        return "no_gap"
    return None


# What each abstain rule of ``guard_abstains`` says about the data, for the messages that report it.
ABSTAIN_REASONS = {
    "majority": "the high-loss component is a majority",
    "tail": "the high-loss component is a tail, not a cluster",
    "unfit": "the model does not fit the bulk of the data yet",
    "no_gap": "the model barely tells the high-loss examples from the rest",
    "too_few": "fewer than 2 rows have a loss to fit",
}


def guard_outcome(n_flagged: int, threshold: float, abstains: str | None) -> str:
    """What the guard did, in words: how many rows it flags, or why it abstains."""
    if abstains:
        return f"abstains ({abstains}: {ABSTAIN_REASONS[abstains]})"
    return f"flags {n_flagged:,} rows as likely mislabeled (P > {threshold})"


def check_guard_settings(threshold: float, max_spread: float, where: str, prefix: str = "") -> None:
    """The guard's bounds, for every caller that takes them (``prefix``: its name for them)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"{where}: {prefix}threshold must be in (0, 1), got {threshold}")
    if not max_spread > 0.0:
        raise ValueError(f"{where}: {prefix}max_spread must be > 0, got {max_spread}")


def flag_mislabeled(losses, threshold: float = 0.5, max_share: float = 0.5,
                    max_spread: float = 0.55) -> tuple[np.ndarray, np.ndarray, LossMixture]:
    """(p_mislabeled, likely_mislabeled, mixture): flag p > threshold where the loss exceeds
    ``MAX_CLEAN_LOSS`` (below it the model agrees with the label), unless the high-loss
    component's weight exceeds ``max_share`` (no minority of misfits), its spread (std / mean)
    exceeds ``max_spread`` (a tail of the model's own errors, not a cluster of wrong labels), or
    the low-loss component's mean exceeds ``MAX_CLEAN_LOSS`` (the model does not fit the bulk yet);
    then flag nothing. ``max_spread=inf`` turns the spread rule off."""
    check_guard_settings(threshold, max_spread, "flag_mislabeled")
    if not 0.0 < max_share <= 1.0:
        raise ValueError(f"flag_mislabeled: max_share must be in (0, 1], got {max_share}")
    x = np.asarray(losses, dtype=np.float64).ravel()
    p, mix = mislabel_probability(x)
    flagged = (p > threshold) & (x > MAX_CLEAN_LOSS)
    if guard_abstains(mix, max_share, max_spread) is not None:
        flagged[:] = False
    return p, flagged, mix


def flag_losses(losses, threshold: float = 0.5,
                max_spread: float = 0.55) -> tuple[np.ndarray, LossMixture | None]:
    """``flag_mislabeled`` over a loss column that may hold NaN (rows never scored, e.g. dropped by
    the gate): those rows are not flagged and do not enter the fit; with fewer than 2 scored rows
    nothing is flagged and the mixture is None."""
    x = np.asarray(losses, dtype=np.float64).ravel()
    scored = np.isfinite(x)
    flagged = np.zeros(x.size, dtype=bool)
    if scored.sum() < 2:
        return flagged, None
    _, flagged[scored], mix = flag_mislabeled(x[scored], threshold, max_spread=max_spread)
    return flagged, mix
