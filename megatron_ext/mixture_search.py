"""The per-segment mixture search of RegMix / RegMix-D, shared by the offline rollout (`tools.search`)
and the online controller in the training loop.

At a switch point: draw candidates from Dirichlet(alpha · prior), project them onto the per-domain caps
(token budgets) and the max-change ball around the previous mixture, predict the objective with the
surrogate conditioned on the history (progress, cumulative shares, the loss at the switch point), and
average the top-k into the next segment's mixture (RegMix's top-k mean).
"""
from dataclasses import dataclass, field

import numpy as np

from megatron_ext.errors import UserError
from megatron_ext.surrogate import Surrogate


@dataclass
class SearchConfig:
    stages: int
    target_tokens: float
    top_k: int = 100
    seed: int = 0
    candidates: int = 1_000_000
    alpha: float = 1.0             # Dirichlet concentration scale (RegMix's notebook: 1)
    chunk: int = 250_000           # candidates predicted at once (memory bound)
    max_change: float | None = None
    objective: list = field(default_factory=list)  # targets whose predicted losses are averaged


@dataclass
class Segment:
    """One search's answer: the segment's mixture and the surrogate's loss at the segment's end."""
    weights: np.ndarray       # [domains], sums to 1
    predicted: dict           # {objective target: predicted loss at the next grid point}
    loss: float               # the objective: mean of `predicted`


def dirichlet(rng: np.random.Generator, concentration: np.ndarray, n: int) -> np.ndarray:
    """Vectorized Dirichlet through normalized Gammas; zero concentration = a domain that is never used."""
    g = np.zeros((n, len(concentration)))
    on = concentration > 0
    g[:, on] = rng.standard_gamma(concentration[on], size=(n, int(on.sum())))
    total = g.sum(1, keepdims=True)
    total[total == 0] = 1.0  # vanishingly rare underflow of every Gamma: the row stays 0 and is dropped later
    return g / total


def project_to_caps(W: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Clip rows to per-domain caps and hand the excess to the unclipped domains in proportion (water filling).

    Rows that cannot sum to 1 under the caps come back with a sum < 1 (the caller drops them)."""
    W = W.copy()
    for _ in range(W.shape[1]):
        over = W > caps
        if not over.any():
            break
        W = np.minimum(W, caps)
        free = (W < caps) & (W > 0)
        missing = 1.0 - W.sum(1, keepdims=True)
        room = np.where(free, W, 0.0).sum(1, keepdims=True)
        scale = np.divide(missing, room, out=np.zeros_like(missing), where=room > 0)
        W = np.where(free, W * (1 + scale), W)
    return np.minimum(W, caps)


def search_prior(base: np.ndarray, domains: list[str], exclude=()) -> np.ndarray:
    """The Dirichlet centre: `base` floored at 1e-6 × max (every concentration > 0), excluded domains at 0."""
    base = np.asarray(base, float)
    prior = np.maximum(base, 1e-6 * base.max())
    for d in exclude:
        if d not in domains:
            raise UserError(f"--exclude: unknown domain {d!r}")
    prior = np.where(np.isin(domains, list(exclude)), 0.0, prior)
    if prior.sum() == 0:
        raise UserError("--exclude leaves no domain")
    return prior / prior.sum()


def check_search(surrogate: Surrogate, cfg: SearchConfig, prior: np.ndarray, budgets: np.ndarray) -> list[str]:
    """Refuse settings no search can satisfy; returns the objective's targets."""
    if cfg.top_k < 1 or cfg.candidates < cfg.top_k:
        raise UserError(f"--candidates ({cfg.candidates}) must be >= --top-k ({cfg.top_k}) >= 1")
    if cfg.target_tokens <= 0:
        raise UserError("--target-tokens must be positive")
    objective = list(cfg.objective) or [surrogate.meta["objective"]]
    for t in objective:
        if t not in surrogate.targets:
            raise UserError(f"objective {t!r} is not a fitted target ({', '.join(surrogate.targets)})")
    total = np.where(prior > 0, budgets, 0).sum()
    if total < cfg.target_tokens:
        names = ", ".join(d for d, p in zip(surrogate.domains, prior) if p > 0)
        raise UserError(f"infeasible: the token budgets of all usable domains ({names}) total {total:.4g} "
                        f"tokens < --target-tokens {cfg.target_tokens:.4g}")
    return objective


def segment_caps(budgets: np.ndarray, used: np.ndarray, prior: np.ndarray, target_tokens: float,
                 lengths, max_change: float | None) -> np.ndarray:
    """Largest weight per domain this segment can take without passing its total token budget.

    `budgets`/`used`: tokens per domain (inf = unlimited); `lengths`: this segment's length and every
    later one's, as fractions of the run. With max_change, a domain can only ramp down by max_change/2
    per later segment, so its cap leaves room for that glide path (otherwise a greedy segment could
    spend a budget that the next segments cannot leave fast enough). Excluded domains (prior 0) get 0."""
    lengths = np.asarray(lengths, float)
    remaining = np.maximum(budgets - used, 0.0) / (lengths[0] * target_tokens)
    later = lengths[1:] / lengths[0]
    if max_change is None or len(later) == 0:
        cap = remaining
    else:
        steps = max_change / 2 * np.arange(1, len(later) + 1)
        lo, hi = np.zeros_like(remaining), np.minimum(remaining, 1.0)
        for _ in range(60):  # bisection: need(w) = w + sum_k len_k · max(0, w - k·max_change/2) is increasing
            mid = (lo + hi) / 2
            need = mid + (np.clip(mid[:, None] - steps[None, :], 0, None) * later[None, :]).sum(1)
            ok = need <= remaining
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        cap = np.where(np.isinf(remaining), np.inf, lo)
    return np.where(prior > 0, cap, 0.0)


def predict_objective(surrogate: Surrogate, objective, progress: float, W: np.ndarray, history, state: dict) -> dict:
    """{target: predicted loss at the next grid point} for mixtures W run from `progress`."""
    return {t: surrogate.predict_next(t, progress, W, history, state.get(t, np.nan)) for t in objective}


def search_segment(surrogate: Surrogate, cfg: SearchConfig, prior: np.ndarray, rng: np.random.Generator, *,
                   progress: float, history: np.ndarray | None, state: dict, caps: np.ndarray,
                   previous: np.ndarray | None) -> Segment:
    """The next segment's mixture from the switch point `progress` (a grid value; 0 = the first segment).

    history: the realized cumulative mixture over [0, progress) ([D], None at progress 0); state:
    {target: loss at progress} (observed online, predicted offline; NaN unknown); caps: from
    `segment_caps`; previous: the mixture before the switch (None: no max-change limit)."""
    objective = list(cfg.objective) or [surrogate.meta["objective"]]
    best_loss, best_w = np.empty(0), np.empty((0, len(prior)))
    limited = previous is not None and cfg.max_change is not None
    if limited:
        # the nearest mixture within this segment's caps; candidates are pulled towards it
        anchor = project_to_caps(np.asarray(previous, float)[None], caps)[0]
        radius = cfg.max_change - np.abs(anchor - previous).sum()
        if radius < 0 or abs(anchor.sum() - 1) > 1e-9:
            d = surrogate.domains[int(np.argmax(previous - caps))]
            raise UserError(f"infeasible at progress {progress:.4g}: domain {d!r} has to drop by more than "
                            f"--max-change {cfg.max_change} because its token budget is spent")
    done = 0
    while done < cfg.candidates:
        n = min(cfg.chunk, cfg.candidates - done)
        done += n
        W = project_to_caps(dirichlet(rng, cfg.alpha * prior, n), caps)
        if limited:  # convex combinations with the anchor stay within the caps and the max-change
            dist = np.abs(W - anchor).sum(1, keepdims=True)
            W = anchor + np.minimum(1.0, radius / np.maximum(dist, 1e-300)) * (W - anchor)
        W = W[np.abs(W.sum(1) - 1) < 1e-9]
        if not len(W):
            continue
        pred = predict_objective(surrogate, objective, progress, W, history, state)
        loss = np.mean([pred[t] for t in objective], axis=0)
        best_loss = np.concatenate([best_loss, loss])
        best_w = np.concatenate([best_w, W])
        if len(best_loss) > cfg.top_k:
            keep = np.argpartition(best_loss, cfg.top_k)[:cfg.top_k]
            best_loss, best_w = best_loss[keep], best_w[keep]
    if len(best_loss) < cfg.top_k:
        tight = surrogate.domains[int(np.argmin(caps - prior))]
        raise UserError(f"infeasible at progress {progress:.4g}: only {len(best_loss)} of {cfg.candidates} "
                        f"candidates meet the constraints (tightest: domain {tight!r}); "
                        f"loosen --max-epochs/--max-change")
    w = best_w.mean(0)
    after = predict_objective(surrogate, objective, progress, w[None], history, state)
    predicted = {t: float(after[t][0]) for t in objective}
    return Segment(weights=w, predicted=predicted, loss=float(np.mean(list(predicted.values()))))
