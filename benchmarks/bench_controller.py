"""Cost of the online mixture controllers, as ratios against the runs they replace.

1. RegMix-D online vs offline: the same target run (launcher, fresh process) once with
   `--mixture-controller regmixd` (evaluation + 100K-candidate search at each of the 4 switch points of
   a 5-stage surrogate) and once on the offline `tools.search` schedule of the same surrogate; wall-clock
   of the whole process, best of `--repeats`. The paper reports +0.37% for its 1B run.
2. DoReMi vs a plain proxy step: the launcher's own training tokens/s (log intervals after the first)
   with `--mixture-controller doremi` (reference forward + proxy forward + weight update per step) and
   without; printed as step-time ratio.

Data: the synthetic generator's surrogate (tests/test_fit.py, 64 proxies) and fixture corpora with its
domain names, so the benchmark needs no downloads.

    .venv/bin/python benchmarks/bench_controller.py [--threads 2] [--iters 20] [--repeats 2]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SHAPE = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "256",
         "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "1e-3", "--lr-warmup-iters", "2",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--eval-iters", "2", "--seed", "1"]


def run(args, threads, save):
    """(wall seconds, stdout) of one launcher process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT, PYTHONWARNINGS="ignore",
               MASTER_PORT=str(29400 + os.getpid() % 500))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_regmixd.py")] + args + ["--save", save],
                         env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"launcher failed:\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def step_rate(stdout) -> float:
    rates = [float(x) for x in re.findall(r"tokens/s (\d+)", stdout)]
    return sum(rates[1:]) / len(rates[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from fixtures import make_domains
    from test_fit import SYN_DOMAINS, write_synthetic_sweep
    from tools import fit, search

    tmp = tempfile.mkdtemp(prefix="bench_controller_")
    data = make_domains(os.path.join(tmp, "tok"), domains=SYN_DOMAINS, n_docs=400, valid_docs=40)
    prefixes = [data[d]["train"] for d in SYN_DOMAINS]
    base = os.path.join(tmp, "base.json")
    with open(base, "w") as f:
        json.dump({"version": 1, "unit": "fraction",
                   "stages": [{"start": 0.0, "train": [x for p in prefixes for x in (1.0, p)]}]}, f)
    write_synthetic_sweep(os.path.join(tmp, "sweep"), runs=64, evals=10)
    sur = os.path.join(tmp, "sur")
    quiet = open(os.devnull, "w")
    stdout, sys.stdout = sys.stdout, quiet
    fit.main(["--sweep", os.path.join(tmp, "sweep"), "--out", sur, "--stages", "5", "--targets", "target",
              "--folds", "0"])
    offline = os.path.join(tmp, "offline.json")
    tokens = args.iters * 16 * 256
    search.main(["--surrogate", sur, "--out", offline, "--target-tokens", str(tokens), "--prior", "uniform",
                 "--candidates", "100000", "--top-k", "128", "--seed", "0", "--no-plot",
                 "--data-prefix-dir", os.path.dirname(prefixes[0])])
    sys.stdout = stdout
    common = SHAPE + ["--train-iters", str(args.iters), "--eval-interval", str(args.iters // 4),
                      "--log-interval", "2"]
    online_args = common + ["--data-schedule", base, "--mixture-controller", "regmixd", "--surrogate", sur,
                            "--controller-beta", "0"]
    offline_args = common + ["--data-schedule", offline]

    times = {"online": [], "offline": []}
    for r in range(args.repeats):
        for name, a in (("offline", offline_args), ("online", online_args)):
            seconds, _ = run(a, args.threads, os.path.join(tmp, f"{name}{r}"))
            times[name].append(seconds)
    decisions = [json.loads(line).get("regmixd") for line in open(os.path.join(tmp, "online0", "trajectory.jsonl"))]
    search_seconds = sum(d["seconds"] for d in decisions if d)
    on, off = min(times["online"]), min(times["offline"])
    print(f"RegMix-D online vs offline schedule ({args.iters} iterations, 4 switch points, 100K candidates, "
          f"threads {args.threads}): online {on:.1f} s, offline {off:.1f} s, ratio {on / off:.4f} "
          f"(searches {search_seconds:.2f} s; the paper: 1.0037)")

    ref = os.path.join(tmp, "reference")
    run(common + ["--data-schedule", base], args.threads, ref)
    plain, doremi = [], []
    for r in range(args.repeats):
        plain.append(step_rate(run(common + ["--data-schedule", base], args.threads, os.path.join(tmp, f"p{r}"))[1]))
        doremi.append(step_rate(run(common + ["--data-schedule", base, "--mixture-controller", "doremi",
                                              "--reference-load", ref], args.threads, os.path.join(tmp, f"d{r}"))[1]))
    print(f"DoReMi step vs plain proxy step (tokens/s, best of {args.repeats}): plain {max(plain):.0f}, "
          f"doremi {max(doremi):.0f}, step-time ratio {max(plain) / max(doremi):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
