"""Proxies per hour with `tools.sweep run --jobs 1` and `--jobs 2`, and tokens/s per proxy.

    .venv/bin/python benchmarks/bench_proxies.py [--tokens data/tok/tokens.json] [--config examples/proxy_1m.yaml]
        [--n 2] [--train-iters N] [--eval-interval N] [--workdir DIR] [-- extra launcher flags]

Samples the same N mixtures twice (one sweep per --jobs setting), runs both sweeps through the real
launcher and prints wall-clock figures. "tokens/s per proxy (wall)" divides a proxy's training tokens by
its whole run time (start-up, data index building, evaluations and checkpoints included): the figure
that sizes a sweep. "launcher tokens/s" is the mean of the launcher's own log lines (training steps
only), when it prints them.
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

from tools.sweep import DONE, LOG, RUNS, trajectory_records  # noqa: E402


def sweep(*args) -> None:
    subprocess.run([sys.executable, "-m", "tools.sweep", *map(str, args)], cwd=REPO, check=True)


def measure(workdir: str, jobs: int, args) -> dict:
    path = os.path.join(workdir, f"jobs{jobs}")
    sweep("sample", path, "--tokens", args.tokens, "--n", args.n, "--seed", args.seed)
    flags = ["--config", args.config, "--jobs", jobs]
    for name in ("train_iters", "eval_interval"):
        if getattr(args, name):
            flags += [f"--{name.replace('_', '-')}", getattr(args, name)]
    start = time.time()
    sweep("run", path, *flags, "--", *args.extra)
    wall = time.time() - start
    runs = sorted(os.listdir(os.path.join(path, RUNS)))
    per_proxy, launcher_rates = [], []
    for run in runs:
        run_dir = os.path.join(path, RUNS, run)
        tokens = trajectory_records(run_dir)[-1]["tokens"]
        with open(os.path.join(run_dir, DONE)) as f:
            per_proxy.append(tokens / json.load(f)["wall_s"])
        with open(os.path.join(run_dir, LOG)) as f:
            launcher_rates += [float(x) for x in re.findall(r"tokens/s (\d+(?:\.\d+)?)", f.read())]
    return {"jobs": jobs, "wall_s": wall, "proxies_per_hour": len(runs) / wall * 3600, "tokens": tokens,
            "tokens_per_s_wall": sum(per_proxy) / len(per_proxy),
            "launcher_tokens_per_s": sum(launcher_rates) / len(launcher_rates) if launcher_rates else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="data/tok/tokens.json")
    p.add_argument("--config", default="examples/proxy_1m.yaml")
    p.add_argument("--n", type=int, default=2, help="proxies per setting (use a multiple of 2)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-iters", type=int)
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--workdir", help="keep the sweeps here (default: a temporary directory)")
    p.add_argument("extra", nargs="*", help="launcher flags (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        cores = len(os.sched_getaffinity(0))
        print(f"bench_proxies: {args.n} proxies per setting, config {args.config}, {cores} cores")
        for jobs in (1, 2):
            r = measure(workdir, jobs, args)
            launcher = (f", launcher tokens/s {r['launcher_tokens_per_s']:.0f}"
                        if r["launcher_tokens_per_s"] else "")
            print(f"--jobs {jobs}: {r['proxies_per_hour']:.1f} proxies/hour ({args.n} in {r['wall_s']:.1f} s), "
                  f"{r['tokens']} tokens per proxy, tokens/s per proxy (wall) {r['tokens_per_s_wall']:.0f}"
                  f"{launcher}", flush=True)


if __name__ == "__main__":
    main()
