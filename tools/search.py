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
from dataclasses import dataclass

import numpy as np

from megatron_ext.errors import UserError
from megatron_ext.mixture_search import (SearchConfig, check_search, search_prior, search_segment,
                                         segment_caps)
from megatron_ext.schedule import MixtureSchedule
from megatron_ext.surrogate import Surrogate, piecewise_average
from tools.cli import run_main
from tools.mixture_sampler import token_shares
from tools.surrogate import save_figure
from tools.sweep import load_tokens


@dataclass
class SearchResult:
    starts: list            # stage starts, fractions of the run
    weights: np.ndarray     # [stages, domains]
    predicted: list         # predicted objective at each stage's end
    searched: list          # per stage: True if searched, False if it is the prior


def rollout(surrogate: Surrogate, cfg: SearchConfig, prior: np.ndarray, budgets: np.ndarray) -> SearchResult:
    """The offline RegMix-D search (the paper's Algorithm 1): stage by stage on the surrogate's grid, each
    stage searched by `search_segment` from the loss *predicted* for its start (recursive rollout).

    `budgets`: total tokens per domain (inf = unlimited). Stage 0 is the prior unless the surrogate models
    the first transition (`fit --first-stage`); a static surrogate gives one searched stage (RegMix)."""
    meta = surrogate.meta
    if meta["mode"] == "static" and cfg.stages != 1:
        raise UserError(f"a static surrogate gives one stage; --stages {cfg.stages} needs a trajectory surrogate")
    if meta["mode"] == "trajectory" and cfg.stages != meta["stages"]:
        raise UserError(f"the surrogate was fitted for {meta['stages']} stages (fit --stages); "
                        f"--stages {cfg.stages} differs")
    objective = check_search(surrogate, cfg, prior, budgets)
    rng = np.random.default_rng(cfg.seed)
    starts = surrogate.stage_starts if meta["mode"] == "trajectory" else [0.0]
    ends = starts[1:] + [1.0]
    lengths = [b - a for a, b in zip(starts, ends)]
    state = surrogate.start_state(objective)
    used, weights, predicted, searched = np.zeros(len(prior)), [], [], []
    for j, progress in enumerate(starts):
        caps = segment_caps(budgets, used, prior, cfg.target_tokens, lengths[j:], cfg.max_change)
        if meta["mode"] == "trajectory" and j == 0 and not meta.get("first_stage"):
            w = prior  # the paper: segment 0 is the prior, its end loss the proxies' mean
            over = np.flatnonzero(w > caps + 1e-12)
            if len(over):
                d = surrogate.domains[over[0]]
                raise UserError(f"infeasible: domain {d!r}: stage 0 (the prior) alone needs "
                                f"{w[over[0]] * lengths[0] * cfg.target_tokens:.4g} tokens, its budget is "
                                f"{budgets[over[0]]:.4g} (raise --max-epochs, or fit --first-stage)")
            predicted.append(float(np.mean([state[t] for t in objective])))
            searched.append(False)
        else:
            history = piecewise_average(starts[:j], weights, 0.0, progress) if j else None
            segment = search_segment(surrogate, cfg, prior, rng, progress=progress, history=history, state=state,
                                     caps=caps, previous=weights[-1] if weights else None)
            w, state = segment.weights, segment.predicted
            predicted.append(segment.loss)
            searched.append(True)
        used += w * lengths[j] * cfg.target_tokens
        weights.append(w)
    return SearchResult(starts=list(starts), weights=np.array(weights), predicted=predicted, searched=searched)


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
    excluded = [d for d in args.exclude.split(",") if d]
    prior = search_prior(prior, domains, excluded)
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
    result = rollout(surrogate, cfg, prior, budgets)

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
