"""Sweep throughput: a sweep's aggregate training tokens/s against the launcher's, side by side in one run.

    .venv/bin/python benchmarks/bench_proxies.py [--n 4] [--train-iters 96] [--eval-interval 16] [--jobs 1]
        [--tokens data/tok/tokens.json] [--config examples/proxy_1m.yaml] [--workdir DIR] [-- launcher flags]

Defaults: the demo proxy recipe (Makefile PROXY_FLAGS: seq 128, global batch 16, micro-batch 8, 4
evaluation batches per domain, every 16 iterations) on the demo corpus, at its 96 iterations.
- launcher tokens/s: `pretrain_regmixd.py` alone on the first proxy's mixture, same config and threads
  (cores // jobs), training steps only (its own per-log-interval tokens/s lines, combined as tokens over
  step seconds; start-up, evaluations and saves excluded); run once before and once after the sweep,
  and the two averaged, so a load that changes during the run affects both sides alike;
- sweep tokens/s: every proxy's training tokens over the wall time of `tools.sweep run --jobs J`
  (start-up, imports, data, evaluations, checkpoints, all included).
Then where a proxy's time goes, from the `done` markers the sweep workers write.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools.sweep import DONE, LAUNCHER, RUNS, SCHED, free_port, load_tokens, tokenizer_flags  # noqa: E402

DEMO_FLAGS = ["--seq-length", "128", "--global-batch-size", "16", "--micro-batch-size", "8", "--eval-iters", "4",
              "--lr", "3e-3", "--min-lr", "3e-3", "--lr-warmup-iters", "8"]


def sweep(*args) -> None:
    out = subprocess.run([sys.executable, "-m", "tools.sweep", *map(str, args)], cwd=REPO, capture_output=True,
                         text=True)
    if out.returncode:
        sys.exit(f"tools.sweep {args[0]} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")


def launcher_rate(args, sched: str, save: str, threads: int) -> float:
    """Training-step tokens/s of the launcher alone: its log lines' tokens over their step seconds."""
    argv = [sys.executable, LAUNCHER, "--config", args.config, "--data-schedule", sched, "--save", save,
            "--train-iters", str(args.train_iters), "--eval-interval", str(args.eval_interval),
            "--log-interval", str(args.eval_interval), *tokenizer_flags(load_tokens(args.tokens)), *args.extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"launcher failed:\n{out.stderr[-3000:]}")
    rates = [float(x) for x in re.findall(r"tokens/s (\d+(?:\.\d+)?)", out.stdout)]
    return len(rates) / sum(1 / r for r in rates)      # equal tokens per interval: tokens / step seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="data/tok/tokens.json")
    p.add_argument("--config", default="examples/proxy_1m.yaml")
    p.add_argument("--n", type=int, default=4, help="proxies in the sweep")
    p.add_argument("--jobs", type=int, default=1, help="tools.sweep run --jobs")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-iters", type=int, default=96)
    p.add_argument("--eval-interval", type=int, default=16)
    p.add_argument("--workdir", help="keep the sweep here (default: a temporary directory)")
    p.add_argument("extra", nargs="*", help="launcher flags (after --; default: the demo recipe's)")
    args = p.parse_args()
    args.extra = args.extra or DEMO_FLAGS
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.abspath(args.workdir or tmp)
        path = os.path.join(workdir, "sweep")
        sweep("sample", path, "--tokens", args.tokens, "--n", args.n, "--seed", args.seed)
        sched = os.path.join(path, RUNS, "p0000", SCHED)
        print(f"bench_proxies: {args.n} proxies of {args.train_iters} iterations, evaluation every "
              f"{args.eval_interval}, --jobs {args.jobs}, {threads} threads per run, {cores} cores; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        before = launcher_rate(args, sched, os.path.join(workdir, "alone1"), threads)
        start = time.time()
        sweep("run", path, "--config", args.config, "--jobs", args.jobs, "--train-iters", args.train_iters,
              "--eval-interval", args.eval_interval, "--", "--log-interval", args.eval_interval, *args.extra)
        wall = time.time() - start
        after = launcher_rate(args, sched, os.path.join(workdir, "alone2"), threads)
        launcher = (before + after) / 2
        runs = sorted(os.listdir(os.path.join(path, RUNS)))
        done = [json.load(open(os.path.join(path, RUNS, r, DONE))) for r in runs]
        with open(os.path.join(path, RUNS, runs[0], "trajectory.jsonl")) as f:
            tokens = json.loads(f.read().splitlines()[-1])["tokens"]
        aggregate = tokens * len(runs) / wall
        phases = {k: sum(d["phases_s"][k] for d in done) / len(done) for k in ("build", "train", "eval", "save")}
        start_s = sum(d.get("worker_start_s", 0.0) for d in done) / len(done)
        other = sum(d["wall_s"] for d in done) / len(done) - sum(phases.values())
        runner = wall - sum(d["wall_s"] + d.get("worker_start_s", 0.0) for d in done) / args.jobs
        print(f"launcher tokens/s (training steps, alone): {before:.0f} before, {after:.0f} after the sweep")
        print(f"sweep: {len(runs)} proxies x {tokens} tokens in {wall:.1f} s = {aggregate:.0f} tokens/s; "
              f"{len(runs) / wall * 3600:.1f} proxies/hour; load {os.getloadavg()[0]:.1f}")
        print("per proxy (s, mean): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) +
              f", run bookkeeping {other:.2f}, worker import {start_s:.2f} (one per worker, spread over its "
              f"proxies), runner start-up and hand-offs {runner / len(runs):.2f} (one per sweep, spread)")
        step_rate = tokens / phases["train"]
        print(f"sweep training steps alone: {step_rate:.0f} tokens/s ({step_rate / launcher:.2f}x the launcher's); "
              f"evaluation is {phases['eval'] / phases['train']:.2f}x the training steps' time")
        print(f"sweep/launcher tokens/s ratio: {aggregate / launcher:.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
