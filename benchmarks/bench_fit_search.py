"""Fit and search timings, plus the reference method against our extensions on the synthetic generator.

  .venv/bin/python benchmarks/bench_fit_search.py [--runs 512] [--candidates 1000000] [--threads 2]

1. fit: a synthetic sweep of R runs × 10 evaluations × 12 domains (13 targets: the target metric and each
   domain's loss), trajectory mode on 10 stages (9 transitions per run), LightGBM (RegMix settings) + ridge
   for every target; then the 5-fold grouped CV on the same table.
2. search: 8 searched stages × C candidates per stage (12 domains; an 8-stage surrogate fitted with
   --first-stage on R runs × 8 evaluations, so that stage 0 is searched too).
3. methods: true generator loss of the schedules searched by the reference mode and by the extensions,
   beside the generator's best static mixture (exhaustive grid) and the prior.
"""
import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_fit import synthetic_losses, write_synthetic_sweep  # noqa: E402  (the tests' known generator)
from megatron_ext.mixture_search import SearchConfig  # noqa: E402
from tools.search import rollout  # noqa: E402
from tools.surrogate import (FitConfig, LGBMSettings, TrajectoryFeatures, cross_validate, fit_surrogate,  # noqa: E402
                             trajectory_table)


@contextmanager
def timed(out: dict):
    """Wall and CPU seconds (this process, all threads): CPU time stays meaningful on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    out["wall"], out["cpu"] = time.perf_counter() - wall, time.process_time() - cpu


def bench_fit(folder: str, runs: int, threads: int, cv: bool) -> None:
    write_synthetic_sweep(folder, runs=runs, evals=10, domains=12)
    read, fitted, cv_time = {}, {}, {}
    with timed(read):
        table = trajectory_table(folder, stages=10)
    cfg = FitConfig(lgbm=LGBMSettings(num_threads=threads))
    with timed(fitted):
        fit_surrogate(table, cfg)
    print(f"fit: {runs} runs x 10 evals x {len(table.targets)} targets = {len(table.Y)} rows x "
          f"{len(table.feature_names())} features; read sweep {read['wall']:.2f} s; LightGBM (1000 rounds) + ridge "
          f"for all targets: {fitted['wall']:.1f} s wall, {fitted['cpu']:.1f} s CPU "
          f"({fitted['wall'] / len(table.targets):.2f} s wall per target), {threads} thread(s)", flush=True)
    if cv:
        with timed(cv_time):
            report = cross_validate(table, cfg)
        rho = report["targets"]["target"]
        print(f"cv: 5 folds grouped by run, all targets: {cv_time['wall']:.1f} s wall, {cv_time['cpu']:.1f} s CPU; "
              f"target spearman lgbm {rho['lgbm']['all']['spearman']:.4f}, ridge {rho['ridge']['all']['spearman']:.4f}",
              flush=True)


def bench_search(folder: str, runs: int, candidates: int, threads: int) -> None:
    write_synthetic_sweep(folder, runs=runs, evals=8, domains=12)
    table = trajectory_table(folder, stages=8, feats=TrajectoryFeatures(first_stage=True), targets=["target"])
    surrogate = fit_surrogate(table, FitConfig(lgbm=LGBMSettings(num_threads=threads)), {"objective": "target"})
    surrogate.threads = threads
    prior = np.full(len(table.domains), 1 / len(table.domains))
    cfg = SearchConfig(stages=8, target_tokens=1e9, top_k=100, seed=0, candidates=candidates)
    took = {}
    with timed(took):
        result = rollout(surrogate, cfg, prior, np.full(len(prior), np.inf))
    stages = sum(result.searched)
    print(f"search: {candidates} candidates x {stages} searched stages x {len(prior)} domains: "
          f"{took['wall']:.1f} s wall ({took['wall'] / stages:.1f} s per stage, "
          f"{candidates * stages / took['wall']:,.0f} candidates/s), {took['cpu']:.1f} s CPU, {threads} thread(s)",
          flush=True)


def bench_methods(folder: str, candidates: int, threads: int) -> None:
    write_synthetic_sweep(folder, runs=128, evals=10)
    grid = np.array([(a, b, 100 - a - b) for a in range(101) for b in range(101 - a)]) / 100
    static, _ = synthetic_losses([0.0], grid[:, None, :], [1.0])
    prior = np.full(3, 1 / 3)
    print(f"methods (3-domain generator, 128 static proxies, 5 stages, {candidates} candidates/stage): "
          f"true final loss")
    print(f"  prior (uniform, static)          {synthetic_losses([0.0], prior[None, None], [1.0])[0][0, 0]:.4f}")
    print(f"  best static mixture (grid)       {static.min():.4f} at {grid[static[:, 0].argmin()]}")
    variants = [("reference (paper: t, m, l)", TrajectoryFeatures(), ["target"]),
                ("+ searched stage 0 (ours)", TrajectoryFeatures(first_stage=True), ["target"]),
                ("+ history shares (ours)", TrajectoryFeatures(history=True), ["target"]),
                ("predict the drop (ours)", TrajectoryFeatures(predict_drop=True), ["target"]),
                ("no loss state (ours)", TrajectoryFeatures(loss_state=False), ["target"]),
                ("objective: mean domain loss", TrajectoryFeatures(), ["easy", "hard", "filler"])]
    for name, feats, objective in variants:
        table = trajectory_table(folder, stages=5, feats=feats, targets=objective)
        surrogate = fit_surrogate(table, FitConfig(lgbm=LGBMSettings(num_threads=threads)),
                                  {"objective": objective[0]})
        surrogate.threads = threads
        cfg = SearchConfig(stages=5, target_tokens=1e9, top_k=100, seed=0, candidates=candidates,
                           objective=objective)
        result = rollout(surrogate, cfg, prior, np.full(3, np.inf))
        true, _ = synthetic_losses(result.starts, result.weights[None], [1.0])
        shares = " ".join(f"{w[0]:.2f}/{w[1]:.2f}" for w in result.weights)
        print(f"  {name:32s} {true[0, 0]:.4f}  (easy/hard per stage: {shares})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=512)
    p.add_argument("--candidates", type=int, default=1_000_000)
    p.add_argument("--method-candidates", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: fit,cv,search,methods")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        sweep = os.path.join(tmp, "fit")
        if "fit" not in skip:
            bench_fit(sweep, args.runs, args.threads, cv="cv" not in skip)
        if "search" not in skip:
            bench_search(os.path.join(tmp, "search"), args.runs, args.candidates, args.threads)
        if "methods" not in skip:
            bench_methods(os.path.join(tmp, "small"), args.method_candidates, args.threads)


if __name__ == "__main__":
    main()
