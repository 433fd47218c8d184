"""Search a mixture schedule with a fitted surrogate and write it as `sched.json` (+ a stacked-area PNG).

  python -m tools.search --surrogate DIR --out sched.json --stages K --target-tokens N --top-k 100 --seed S
      [--tokens data/tok/tokens.json] [--max-epochs E] [--max-change D] [--exclude a,b]

Per stage, in order: draw candidates from Dirichlet(alpha · prior), keep those within the constraints,
predict the objective with the surrogate conditioned on the chosen history (progress, cumulative shares,
the loss predicted at the stage start), and average the top-k into the stage's mixture (RegMix). The
predicted loss of that mixture is fed into the next stage (the paper's recursive offline rollout).
Stage 0 is the prior (the paper) unless the surrogate models the first transition (`fit --first-stage`).
`--stages 1` with a static surrogate is RegMix.
"""
import argparse
import os
from dataclasses import dataclass, field

import numpy as np

from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule
from tools.cli import run_main
from tools.mixture_sampler import token_shares
from tools.surrogate import Surrogate, save_figure
from tools.sweep import load_tokens


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
class SearchResult:
    starts: list            # stage starts, fractions of the run
    weights: np.ndarray     # [stages, domains]
    predicted: list         # predicted objective at each stage's end
    searched: list          # per stage: True if searched, False if it is the prior


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


class Searcher:
    """The per-stage search over one surrogate; `budgets` (tokens per domain, inf = unlimited) are totals."""

    def __init__(self, surrogate: Surrogate, cfg: SearchConfig, prior: np.ndarray, budgets: np.ndarray):
        self.s, self.cfg, self.prior, self.budgets = surrogate, cfg, prior, budgets
        meta = surrogate.meta
        if meta["mode"] == "static" and cfg.stages != 1:
            raise UserError(f"a static surrogate gives one stage; --stages {cfg.stages} needs a trajectory surrogate")
        if meta["mode"] == "trajectory" and cfg.stages != meta["stages"]:
            raise UserError(f"the surrogate was fitted for {meta['stages']} stages (fit --stages); "
                            f"--stages {cfg.stages} differs")
        if cfg.top_k < 1 or cfg.candidates < cfg.top_k:
            raise UserError(f"--candidates ({cfg.candidates}) must be >= --top-k ({cfg.top_k}) >= 1")
        if cfg.target_tokens <= 0:
            raise UserError("--target-tokens must be positive")
        self.objective = cfg.objective or [meta["objective"]]
        for t in self.objective:
            if t not in surrogate.targets:
                raise UserError(f"objective {t!r} is not a fitted target ({', '.join(surrogate.targets)})")
        total = np.where(prior > 0, budgets, 0).sum()
        if total < cfg.target_tokens:
            names = ", ".join(d for d, p in zip(surrogate.domains, prior) if p > 0)
            raise UserError(f"infeasible: the token budgets of all usable domains ({names}) total {total:.4g} "
                            f"tokens < --target-tokens {cfg.target_tokens:.4g}")

    def features(self, progress: float, W: np.ndarray, history: np.ndarray) -> np.ndarray:
        """The common features in the fit's order; history None = no stage before (cumulative = the stage)."""
        cols = [np.full((len(W), 1), progress)] if self.s.meta["mode"] == "trajectory" else []
        cols.append(W)
        if any(n.startswith("cum:") for n in self.s.meta["features"]):
            cols.append(W if history is None else np.broadcast_to(history, W.shape))
        return np.hstack(cols)

    def predict(self, progress: float, W: np.ndarray, history: np.ndarray, state: dict) -> dict:
        X = self.features(progress, W, history)
        return {t: self.s.predict(t, X, state.get(t)) for t in self.objective}

    def caps(self, used: np.ndarray, length: float, later_stages: int) -> np.ndarray:
        """Largest weight per domain this stage can take without passing its total budget.

        With --max-change, a domain can only ramp down by max_change/2 per stage afterwards, so its cap
        leaves room for that glide path (otherwise a greedy stage could spend a budget that the next
        stage cannot leave fast enough)."""
        remaining = np.maximum(self.budgets - used, 0.0) / (length * self.cfg.target_tokens)
        if self.cfg.max_change is None or later_stages == 0:
            cap = remaining
        else:
            steps = self.cfg.max_change / 2 * np.arange(1, later_stages + 1)
            lo, hi = np.zeros_like(remaining), np.minimum(remaining, 1.0)
            for _ in range(60):  # bisection: need(w) = w + sum_k max(0, w - k·max_change/2) is increasing
                mid = (lo + hi) / 2
                need = mid + np.clip(mid[:, None] - steps[None, :], 0, None).sum(1)
                ok = need <= remaining
                lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
            cap = np.where(np.isinf(remaining), np.inf, lo)
        return np.where(self.prior > 0, cap, 0.0)

    def top_k_mean(self, rng, progress, history, state, caps, previous) -> np.ndarray:
        cfg = self.cfg
        best_loss, best_w = np.empty(0), np.empty((0, len(self.prior)))
        limited = previous is not None and cfg.max_change is not None
        if limited:
            # the nearest mixture within this stage's caps; candidates are pulled towards it
            anchor = project_to_caps(previous[None], caps)[0]
            radius = cfg.max_change - np.abs(anchor - previous).sum()
            if radius < 0 or abs(anchor.sum() - 1) > 1e-9:
                d = self.s.domains[int(np.argmax(previous - caps))]
                raise UserError(f"infeasible at progress {progress:.4g}: domain {d!r} has to drop by more than "
                                f"--max-change {cfg.max_change} because its token budget is spent")
        done = 0
        while done < cfg.candidates:
            n = min(cfg.chunk, cfg.candidates - done)
            done += n
            W = project_to_caps(dirichlet(rng, cfg.alpha * self.prior, n), caps)
            if limited:  # convex combinations with the anchor stay within the caps and the max-change
                dist = np.abs(W - anchor).sum(1, keepdims=True)
                W = anchor + np.minimum(1.0, radius / np.maximum(dist, 1e-300)) * (W - anchor)
            W = W[np.abs(W.sum(1) - 1) < 1e-9]
            if not len(W):
                continue
            pred = self.predict(progress, W, history, state)
            loss = np.mean([pred[t] for t in self.objective], axis=0)
            best_loss = np.concatenate([best_loss, loss])
            best_w = np.concatenate([best_w, W])
            if len(best_loss) > cfg.top_k:
                keep = np.argpartition(best_loss, cfg.top_k)[:cfg.top_k]
                best_loss, best_w = best_loss[keep], best_w[keep]
        if len(best_loss) < cfg.top_k:
            tight = self.s.domains[int(np.argmin(caps - self.prior))]
            raise UserError(f"infeasible at progress {progress:.4g}: only {len(best_loss)} of {cfg.candidates} "
                            f"candidates meet the constraints (tightest: domain {tight!r}); "
                            f"loosen --max-epochs/--max-change")
        return best_w.mean(0)

    def run(self) -> SearchResult:
        cfg, K, D = self.cfg, self.cfg.stages, len(self.prior)
        rng = np.random.default_rng(cfg.seed)
        trajectory = self.s.meta["mode"] == "trajectory"
        # the paper's rollout starts from the proxies' mean loss at t_1 (the end of stage 0)
        state = {t: (np.nan if self.s.meta.get("first_stage") else self.s.meta["initial_loss"].get(t, np.nan))
                 for t in self.objective}
        used, weights, predicted, searched = np.zeros(D), [], [], []
        for j in range(K):
            length = 1.0 / K
            caps = self.caps(used, length, K - 1 - j)
            history = np.mean(weights, axis=0) if weights else None
            previous = weights[-1] if weights else None
            if trajectory and j == 0 and not self.s.meta.get("first_stage"):
                w = self.prior  # the paper: segment 0 is the prior
                over = np.flatnonzero(w > caps + 1e-12)
                if len(over):
                    d = self.s.domains[over[0]]
                    raise UserError(f"infeasible: domain {d!r}: stage 0 (the prior) alone needs "
                                    f"{w[over[0]] * length * cfg.target_tokens:.4g} tokens, its budget is "
                                    f"{self.budgets[over[0]]:.4g} (raise --max-epochs, or fit --first-stage)")
                predicted.append(float(np.mean([state[t] for t in self.objective])))
                searched.append(False)
            else:
                w = self.top_k_mean(rng, j / K, history, state, caps, previous)
                after = self.predict(j / K, w[None], history, state)
                state = {t: float(after[t][0]) for t in self.objective}
                predicted.append(float(np.mean([state[t] for t in self.objective])))
                searched.append(True)
            used += w * length * cfg.target_tokens
            weights.append(w)
        return SearchResult(starts=[j / K for j in range(K)], weights=np.array(weights), predicted=predicted,
                            searched=searched)


# ---------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--surrogate", required=True, help="folder written by tools.fit")
    p.add_argument("--out", required=True, help="sched.json to write (the PNG goes beside it)")
    p.add_argument("--stages", type=int, help="K stages (default: the surrogate's; static surrogates: 1)")
    p.add_argument("--target-tokens", type=float, required=True, help="tokens of the target run")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", type=int, default=1_000_000, help="Dirichlet candidates per stage")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration = alpha × prior")
    p.add_argument("--prior", choices=("tokens", "mean", "uniform"),
                   help="Dirichlet centre and stage-0 mixture: token shares from --tokens (default when given), "
                        "the proxies' mean mixture (default otherwise), or uniform")
    p.add_argument("--tokens", help="data/tok/tokens.json: token counts (prior, budgets) and train prefixes")
    p.add_argument("--data-prefix-dir", help="prefixes DIR/<domain>_train_text_document instead of tokens.json's")
    p.add_argument("--max-epochs", type=float, help="per-domain budget: epochs of its train tokens (needs --tokens)")
    p.add_argument("--max-change", type=float, help="largest L1 distance between adjacent stages' mixtures")
    p.add_argument("--exclude", default="", help="comma-separated domains never to use")
    p.add_argument("--objective", default="", help="comma-separated targets to average (default: the fit's)")
    p.add_argument("--threads", type=int, default=0, help="LightGBM prediction threads (0: all cores)")
    p.add_argument("--no-plot", action="store_true")
    return p


def domain_tokens(tokens: dict, domains: list[str], path: str) -> np.ndarray:
    info = tokens["domains"]
    missing = [d for d in domains if d not in info]
    if missing:
        raise UserError(f"{path}: no domain {missing[0]!r} (the surrogate's domains must all be there)")
    try:
        return np.array([float(info[d]["train_tokens"]) for d in domains])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: every domain needs a numeric train_tokens") from None


def make_schedule(result: SearchResult, domains, prefixes, valid, provenance) -> MixtureSchedule:
    stages = [{"start": s, "train": [x for w, p in zip(ws, prefixes) for x in (round(float(w), 8), p)]}
              for s, ws in zip(result.starts, result.weights)]
    d = {"version": 1, "unit": "fraction", "stages": stages, "provenance": provenance}
    if valid:
        d["valid"] = valid
    return MixtureSchedule.from_dict(d)


def plot_schedule(result: SearchResult, domains: list[str], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.array(result.starts + [1.0])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    W = np.vstack([result.weights, result.weights[-1]])
    ax.stackplot(x, W.T, labels=domains, step="post")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("fraction of the target run")
    ax.set_ylabel("mixture weight")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    surrogate = Surrogate.load(args.surrogate)
    domains = surrogate.domains
    surrogate.threads = args.threads or os.cpu_count() or 1
    tokens = load_tokens(args.tokens) if args.tokens else None
    counts = domain_tokens(tokens, domains, args.tokens) if tokens else None
    prior_kind = args.prior or ("tokens" if tokens else "mean")
    if prior_kind == "tokens":
        if counts is None:
            raise UserError("--prior tokens needs --tokens tokens.json")
        prior = token_shares(counts)
    elif prior_kind == "mean":
        prior = np.asarray(surrogate.meta["mean_mixture"], float)
    else:
        prior = np.ones(len(domains))
    prior = np.maximum(prior, 1e-6 * prior.max())  # Dirichlet needs every concentration > 0
    excluded = [d for d in args.exclude.split(",") if d]
    for d in excluded:
        if d not in domains:
            raise UserError(f"--exclude: unknown domain {d!r}")
    prior = np.where(np.isin(domains, excluded), 0.0, prior)
    if prior.sum() == 0:
        raise UserError("--exclude leaves no domain")
    prior = prior / prior.sum()
    if args.max_epochs is not None:
        if counts is None:
            raise UserError("--max-epochs needs --tokens tokens.json (the domains' token counts)")
        if args.max_epochs <= 0:
            raise UserError("--max-epochs must be positive")
        budgets = args.max_epochs * counts
    else:
        budgets = np.full(len(domains), np.inf)
    stages = args.stages or surrogate.stages
    cfg = SearchConfig(stages=stages, target_tokens=args.target_tokens, top_k=args.top_k, seed=args.seed,
                       candidates=args.candidates, alpha=args.alpha, max_change=args.max_change,
                       objective=[t for t in args.objective.split(",") if t])
    result = Searcher(surrogate, cfg, prior, budgets).run()

    if args.data_prefix_dir:
        prefixes = [os.path.join(args.data_prefix_dir, f"{d}_train_text_document") for d in domains]
    elif tokens and all(tokens["domains"][d].get("train_prefix") for d in domains):
        prefixes = [tokens["domains"][d]["train_prefix"] for d in domains]
    else:  # data without files (the external RegMix CSVs): the domain names stand in for prefixes
        prefixes = list(domains)
    has_files = prefixes != list(domains)
    valid = None
    if tokens and all(tokens["domains"][d].get("valid_prefix") for d in domains):
        valid = [x for d in domains for x in (1, tokens["domains"][d]["valid_prefix"])]
    provenance = {"made_by": "tools/search", "surrogate": os.path.abspath(args.surrogate),
                  "surrogate_sha256": surrogate.meta["sha256"], "surrogate_mode": surrogate.meta["mode"],
                  "proxies": surrogate.meta["proxies"], "objective": cfg.objective or [surrogate.meta["objective"]],
                  "predicted_loss": result.predicted, "searched": result.searched, "prior": prior_kind,
                  "alpha": cfg.alpha, "candidates": cfg.candidates, "top_k": cfg.top_k, "seed": cfg.seed,
                  "target_tokens": cfg.target_tokens, "max_epochs": args.max_epochs, "max_change": args.max_change,
                  "exclude": excluded}
    schedule = make_schedule(result, domains, prefixes, valid, provenance)
    schedule.validate(check_files=has_files)
    schedule.save(args.out)
    if not args.no_plot:
        plot_schedule(result, domains, os.path.splitext(args.out)[0] + ".png",
                      f"{os.path.basename(args.out)}: {stages} stage(s), predicted "
                      f"{', '.join(f'{p:.3f}' for p in result.predicted)}")
    for j, (s, w, p) in enumerate(zip(result.starts, result.weights, result.predicted)):
        top = ", ".join(f"{domains[i]} {w[i]:.4f}" for i in np.argsort(-w)[:5])
        print(f"stage {j} start {s:.4g} predicted {p:.4f}{'' if result.searched[j] else ' (prior)'}: {top}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
