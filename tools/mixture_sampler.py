"""RegMix's proxy-mixture sampler, plus random K-stage schedules for dynamic proxies.

RegMix (sail-sg/regmix, mixture_config/synthesize_mixture.py) draws each proxy's mixture from a
Dirichlet centred on the tempered token-share prior, with a concentration picked at random from
log-spaced strengths, so the sweep covers both near-prior and very peaked mixtures. A mixture that
would use a domain more than `max_usage` times its token share is rejected (it would repeat that
domain's data many epochs at target scale); tiny weights are zeroed so many proxies leave domains
out entirely, which the regression needs to see. As in RegMix, a pool of `n × sample_multiplier`
draws is deduplicated and `n` are picked from the distinct ones at random: picking among *distinct*
mixtures thins out the very peaked draws, which collapse onto a few identical one-domain mixtures.
"""
from dataclasses import dataclass

import numpy as np

from megatron_ext.errors import UserError


@dataclass
class SamplerConfig:
    """Knobs of the sampler; defaults are RegMix's."""
    n: int = 32
    seed: int = 42
    temperature: float = 0.5       # prior = share ** temperature, renormalized
    max_usage: float = 15.0        # reject w_d > min(share_d * max_usage, 1)
    min_weight: float = 2e-4       # weights below are set to 0, the rest rounded to multiples of it
    min_strength: float = 0.1      # Dirichlet(prior * s), s from n_strengths log-spaced values
    max_strength: float = 5.0
    n_strengths: int = 15
    sample_multiplier: int = 100   # pool of n * this draws, deduplicated, then n picked at random
    stages: int = 1                # K > 1 needs dynamic=True
    dynamic: bool = False
    stage_correlation: float = 0.0  # stage k = normalize(c * stage k-1 + (1 - c) * fresh draw)

    def validate(self):
        if self.n < 1:
            raise UserError(f"--n must be at least 1, got {self.n}")
        if not 0 < self.temperature <= 1:
            raise UserError(f"--temperature must be in (0, 1], got {self.temperature}")
        if self.max_usage <= 0:
            raise UserError(f"--max-usage must be positive, got {self.max_usage}")
        if not 0 < self.min_weight < 1:
            raise UserError(f"--min-weight must be in (0, 1), got {self.min_weight}")
        if self.sample_multiplier < 1:
            raise UserError(f"--sample-multiplier must be at least 1, got {self.sample_multiplier}")
        if not 0 < self.min_strength <= self.max_strength:
            raise UserError("Dirichlet strengths need 0 < min <= max")
        if self.stages < 1:
            raise UserError(f"--stages must be at least 1, got {self.stages}")
        if self.stages > 1 and not self.dynamic:
            raise UserError("--stages K > 1 needs --dynamic (static proxies have one stage)")
        if not 0 <= self.stage_correlation < 1:
            raise UserError(f"--stage-correlation must be in [0, 1), got {self.stage_correlation}")


def token_shares(token_counts) -> np.ndarray:
    """Token counts per domain → shares summing to 1."""
    counts = np.asarray(token_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) < 2:
        raise UserError("a sweep needs at least 2 domains")
    if (counts <= 0).any():
        raise UserError("every domain in a sweep needs training tokens (a count is 0)")
    return counts / counts.sum()


class MixtureSampler:
    """Draws `cfg.n` distinct proxy schedules, each an array [stages, domains] of weights summing to 1."""

    def __init__(self, token_counts, cfg: SamplerConfig):
        cfg.validate()
        self.cfg = cfg
        self.shares = token_shares(token_counts)
        self.bounds = np.minimum(self.shares * cfg.max_usage, 1.0)
        if self.bounds.sum() < 1.0:
            raise UserError(f"--max-usage {cfg.max_usage} makes every mixture infeasible "
                            f"(the per-domain caps sum to {self.bounds.sum():.3f} < 1)")
        prior = self.shares ** cfg.temperature
        self.prior = prior / prior.sum()
        self.strengths = np.logspace(np.log10(cfg.min_strength), np.log10(cfg.max_strength),
                                     cfg.n_strengths)

    def _postprocess(self, w: np.ndarray):
        """Zero tiny weights, round the rest to multiples of min_weight (RegMix), renormalize;
        None if the result breaks a usage bound (checked last, so every kept mixture obeys it)."""
        if not np.isfinite(w).all() or w.sum() <= 0:
            return None
        w = np.where(w < self.cfg.min_weight, 0.0, w)
        if w.sum() <= 0:
            return None
        w = np.round(w / w.sum() / self.cfg.min_weight) * self.cfg.min_weight
        if w.sum() <= 0:
            return None
        w = w / w.sum()
        return w if (w <= self.bounds).all() else None

    def _draw_stage(self, rng, previous=None):
        """One accepted stage mixture (or None if this draw was rejected)."""
        strength = self.strengths[rng.integers(len(self.strengths))]
        w = rng.dirichlet(self.prior * strength)
        if previous is not None and self.cfg.stage_correlation > 0:
            c = self.cfg.stage_correlation
            w = c * previous + (1 - c) * w
        return self._postprocess(w)

    def _draw_schedule(self, rng):
        stages = []
        for _ in range(self.cfg.stages):
            w = self._draw_stage(rng, stages[-1] if stages else None)
            if w is None:
                return None
            stages.append(w)
        return np.stack(stages)

    def sample(self) -> list:
        """Deterministic for a seed: the same config always yields the same list."""
        rng = np.random.default_rng(self.cfg.seed)
        distinct = {}                     # rounded weights -> schedule, in order of first draw
        for _ in range(self.cfg.n * self.cfg.sample_multiplier):
            sched = self._draw_schedule(rng)
            if sched is not None:
                distinct.setdefault(np.round(sched / self.cfg.min_weight).astype(np.int64).tobytes(), sched)
        if len(distinct) < self.cfg.n:
            raise UserError(f"found only {len(distinct)} distinct mixtures in "
                            f"{self.cfg.n * self.cfg.sample_multiplier} draws; lower --n or raise --max-usage")
        pool = list(distinct.values())
        return [pool[i] for i in sorted(rng.choice(len(pool), self.cfg.n, replace=False))]

    def stage_starts(self) -> list:
        """Stage starts as fractions of the run: K equal stages."""
        return [k / self.cfg.stages for k in range(self.cfg.stages)]


def summarize(mixtures, domains) -> str:
    """Per-domain weight quantiles and zero shares over all proxies and stages, as a text table."""
    w = np.concatenate([np.asarray(m) for m in mixtures], axis=0)   # [proxies*stages, domains]
    width = max(len(d) for d in domains + ["domain"])
    lines = [f"{'domain':<{width}}  {'min':>7} {'q25':>7} {'median':>7} {'q75':>7} {'max':>7} {'zeros':>6}"]
    for j, name in enumerate(domains):
        q = np.quantile(w[:, j], [0, 0.25, 0.5, 0.75, 1])
        zeros = (w[:, j] == 0).mean()
        lines.append(f"{name:<{width}}  " + " ".join(f"{x:7.4f}" for x in q) + f" {zeros:6.1%}")
    lines.append(f"{len(mixtures)} proxies x {w.shape[0] // len(mixtures)} stage(s); "
                 f"share of zero weights: {(w == 0).mean():.1%}")
    return "\n".join(lines)
