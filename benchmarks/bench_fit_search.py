"""Fit and search timings, plus the reference method against our extensions on the synthetic generator.

  .venv/bin/python benchmarks/bench_fit_search.py [--runs 512] [--candidates 100000] [--threads 2]
      [--parts fit,search[,cv,methods,options]]

1. fit: a synthetic sweep of R runs × 10 evaluations × 12 domains (13 targets: the target metric and each
   domain's loss), trajectory mode on 10 stages (9 transitions per run), LightGBM (RegMix settings) + ridge
   for every target; `cv` adds the 5-fold grouped CV on the same table.
2. search: 8 searched stages × C candidates per stage (12 domains; an 8-stage first-drop surrogate
   on R runs × 8 evaluations, so that stage 0 is searched too), once with compiled prediction (lleaves) and
   once with LightGBM's own, side by side in one run (order L C C L, best of each); ends with the ratio line.
3. methods (opt-in): true generator loss of the schedules searched by the reference mode and by the
   extensions, beside the generator's best static mixture (exhaustive grid) and the prior.
4. options (opt-in): on the search part's main model, the share of its splits on features that are constant
   within one stage's search (progress, the loss state), its mean leaf depth, and lleaves' per-row cost for
   other compile options (block sizes, LLVM code model, inlining) against LightGBM's, on 20K uniformly random rows,
   one thread, CPU seconds.
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
from megatron_ext.mixture_search import SearchConfig, dirichlet  # noqa: E402
from megatron_ext.surrogate import Surrogate  # noqa: E402
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


def search_surrogate(folder: str, runs: int, threads: int) -> str:
    """The search part's surrogate: an 8-stage first-drop fit of R synthetic runs × 8 evaluations, saved."""
    write_synthetic_sweep(folder, runs=runs, evals=8, domains=12)
    table = trajectory_table(folder, stages=8, targets=["target"], model="first-drop")
    surrogate = os.path.join(folder, "sur")
    fit_surrogate(table, FitConfig(lgbm=LGBMSettings(num_threads=threads)), {"objective": "target"}).save(surrogate)
    return surrogate


def bench_search(surrogate: str, candidates: int, threads: int) -> float:
    """The search with compiled and with LightGBM prediction on one surrogate; returns the ratio of their
    prediction rates (candidates/s)."""
    lightgbm, compiled = (Surrogate.load(surrogate) for _ in range(2))
    objective, domains = compiled.meta["objective"], compiled.domains
    compiled.compiled = {}  # compile here even where a cache exists, to time it
    lightgbm.compiled = dict.fromkeys(lightgbm.model_files())  # None: LightGBM predicts
    lightgbm.threads = compiled.threads = threads
    took = {}
    with timed(took):
        compiled.compile()
    trees = sum(lightgbm.meta["trees"].values())
    print(f"compile: {len(compiled.compiled)} models, {trees} trees: {took['wall']:.1f} s wall, {took['cpu']:.1f} s CPU "
          f"(cached beside the models; a later load takes them)", flush=True)

    # prediction alone: one later stage's candidates
    W = dirichlet(np.random.default_rng(0), np.ones(len(domains)), min(candidates, 100_000))
    progress = compiled.stage_starts[len(compiled.stage_starts) // 2]
    query = dict(progress=progress, W=W, history=W.mean(0), state=compiled.meta["initial_loss"][objective])
    rates, cpu_rates, preds = {}, {}, {}
    for name, s in (("lightgbm", lightgbm), ("compiled", compiled), ("compiled", compiled), ("lightgbm", lightgbm)):
        with timed(took):
            preds[name] = s.predict_next(objective, **query)
        rates[name] = max(rates.get(name, 0.0), len(W) / took["wall"])
        cpu_rates[name] = max(cpu_rates.get(name, 0.0), len(W) / took["cpu"])
    diff = np.abs(preds["compiled"] - preds["lightgbm"]).max()
    k = 100
    same = set(np.argsort(preds["compiled"], kind="stable")[:k]) == set(np.argsort(preds["lightgbm"], kind="stable")[:k])
    print(f"predict {len(W)} candidates at progress {progress:.3g}, {threads} thread(s): LightGBM {rates['lightgbm']:,.0f}/s, compiled "
          f"{rates['compiled']:,.0f}/s, ratio {rates['compiled'] / rates['lightgbm']:.2f} (per CPU-second "
          f"{cpu_rates['compiled'] / cpu_rates['lightgbm']:.2f}); max abs difference "
          f"{diff:.3g}, top-{k} identical: {same}", flush=True)

    prior = np.full(len(domains), 1 / len(domains))
    cfg = SearchConfig(stages=compiled.stages, target_tokens=1e9, top_k=100, seed=0, candidates=candidates)
    best, results = {}, {}
    predict_compiled, in_predict = compiled._lgbm, [0.0]

    def timed_predict(name, X):  # the compiled search's time in prediction, for the profile line
        start = time.perf_counter()
        out = predict_compiled(name, X)
        in_predict[0] += time.perf_counter() - start
        return out

    compiled._lgbm = timed_predict
    for name, s in (("lightgbm", lightgbm), ("compiled", compiled), ("compiled", compiled), ("lightgbm", lightgbm)):
        in_predict[0] = 0.0
        with timed(took):
            results[name] = rollout(s, cfg, prior, np.full(len(prior), np.inf))
        best[name] = min(best.get(name, (np.inf, 0.0, 0.0)), (took["wall"], took["cpu"], in_predict[0]))
    stages = sum(results["compiled"].searched)
    for name in ("lightgbm", "compiled"):
        wall, cpu, _ = best[name]
        print(f"search ({name}): {candidates} candidates x {stages} searched stages x {len(prior)} domains: "
              f"{wall:.1f} s wall ({wall / stages:.2f} s per stage, {candidates * stages / wall:,.0f} candidates/s), "
              f"{cpu:.1f} s CPU, {threads} thread(s), best of 2", flush=True)
    weights = np.abs(results["compiled"].weights - results["lightgbm"].weights).max()
    predicted = np.abs(np.subtract(results["compiled"].predicted, results["lightgbm"].predicted)).max()
    print(f"searched schedules: weights differ by {weights:.3g}, predicted losses by {predicted:.3g} "
          f"(same top-k: {weights <= 1e-12})")
    wall, _, predicting = best["compiled"]
    print(f"search candidates/s ratio compiled/LightGBM: {best['lightgbm'][0] / wall:.2f}; the compiled search spends "
          f"{predicting:.2f} s of {wall:.2f} s in the compiled models, the rest in Dirichlet draws, caps, feature "
          f"encoding, the ridge part and top-k")
    return rates["compiled"] / rates["lightgbm"]


def bench_options(surrogate: str, rows: int = 20_000) -> None:
    """What the compiled search's levers are worth on the main model (the loss-state model of stages 1+)."""
    import lleaves
    s = Surrogate.load(surrogate)
    name = s.model_file(s.meta["objective"])
    booster, path = s.model_files()[name], os.path.join(surrogate, name)
    model = booster.dump_model()
    names = s.meta["features"]
    splits, depths = {}, []

    def walk(node, depth):
        if "split_feature" not in node:
            depths.append(depth)
            return
        feature = names[node["split_feature"]]
        splits[feature] = splits.get(feature, 0) + 1
        walk(node["left_child"], depth + 1)
        walk(node["right_child"], depth + 1)

    for tree in model["tree_info"]:
        walk(tree["tree_structure"], 0)
    total = sum(splits.values())
    constant = {f: n / total for f, n in splits.items() if f in ("progress", "loss_start") or f.startswith("cum:")}
    print(f"options: {name}, {len(model['tree_info'])} trees, {len(depths)} leaves, mean leaf depth "
          f"{np.mean(depths):.2f}; share of splits on features constant within a stage's search: "
          + ", ".join(f"{f} {v:.3f}" for f, v in sorted(constant.items())), flush=True)
    X = np.random.default_rng(0).random((rows, booster.num_feature()))

    def cpu_per_row(predict) -> float:
        best = np.inf
        for _ in range(3):
            start = time.process_time()
            predict()
            best = min(best, time.process_time() - start)
        return best / rows

    base = cpu_per_row(lambda: booster.predict(X, num_threads=1))
    reference = booster.predict(X, num_threads=1)
    print(f"options: LightGBM {base * 1e6:.2f} us/row (1 thread, CPU seconds, {rows} uniform rows)", flush=True)
    for blocksize, codemodel, inline in ((34, "large", False), (34, "small", False), (16, "large", False),
                                         (8, "large", False), (64, "large", False), (1000, "large", False),
                                         (34, "large", True)):
        compiled = lleaves.Model(model_file=path)
        start = time.process_time()
        compiled.compile(finline=inline, fblocksize=blocksize, fcodemodel=codemodel)
        took = time.process_time() - start
        per_row = cpu_per_row(lambda: compiled.predict(X, n_jobs=1))
        diff = np.abs(compiled.predict(X, n_jobs=1) - reference).max()
        print(f"options: blocks of {blocksize}, code model {codemodel}, inlining {'on' if inline else 'off'}: "
              f"compile {took:.1f} CPU-s, {per_row * 1e6:.2f} us/row, {base / per_row:.2f}x LightGBM, "
              f"max abs difference {diff:.2g}", flush=True)


def bench_methods(folder: str, candidates: int, threads: int) -> None:
    write_synthetic_sweep(folder, runs=128, evals=10)
    grid = np.array([(a, b, 100 - a - b) for a in range(101) for b in range(101 - a)]) / 100
    static, _ = synthetic_losses([0.0], grid[:, None, :], [1.0])
    prior = np.full(3, 1 / 3)
    print(f"methods (3-domain generator, 128 static proxies, 5 stages, {candidates} candidates/stage): "
          f"true final loss")
    print(f"  prior (uniform, static)          {synthetic_losses([0.0], prior[None, None], [1.0])[0][0, 0]:.4f}")
    print(f"  best static mixture (grid)       {static.min():.4f} at {grid[static[:, 0].argmin()]}")
    variants = [("first-drop (default)", TrajectoryFeatures(), ["target"], "first-drop"),
                ("reference (paper: t, m, l)", TrajectoryFeatures(), ["target"], "reference"),
                ("+ searched stage 0 (ours)", TrajectoryFeatures(first_stage=True), ["target"], "reference"),
                ("+ history shares (ours)", TrajectoryFeatures(history=True), ["target"], "reference"),
                ("predict the drop (ours)", TrajectoryFeatures(predict_drop=True), ["target"], "reference"),
                ("no loss state (ours)", TrajectoryFeatures(loss_state=False), ["target"], "reference"),
                ("objective: mean domain loss", TrajectoryFeatures(), ["easy", "hard", "filler"], "reference")]
    for name, feats, objective, model in variants:
        table = trajectory_table(folder, stages=5, feats=feats, targets=objective, model=model)
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
    p.add_argument("--candidates", type=int, default=100_000)
    p.add_argument("--method-candidates", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--surrogate", help="search part: time this surrogate folder instead of fitting one (R runs)")
    p.add_argument("--parts", default="fit,search",
                   help="comma-separated parts to run: fit,cv,search,methods,options")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        sweep = os.path.join(tmp, "fit")
        if "fit" in parts:
            bench_fit(sweep, args.runs, args.threads, cv="cv" in parts)
        if "methods" in parts:
            bench_methods(os.path.join(tmp, "small"), args.method_candidates, args.threads)
        if parts & {"search", "options"}:
            surrogate = args.surrogate or search_surrogate(os.path.join(tmp, "search"), args.runs, args.threads)
        if "options" in parts:
            bench_options(surrogate)
        if "search" in parts:
            ratio = bench_search(surrogate, args.candidates, args.threads)
            print(f"compiled/LightGBM candidates/s ratio: {ratio:.2f} (target >= 10)")


if __name__ == "__main__":
    main()
