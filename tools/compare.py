"""Train the same target model on every data-mixture arm, seed and proxy budget (resumable).

    python -m tools.compare --sweep sweep/demo --out runs/compare --config examples/demo_10m.yaml \\
        --arms natural,uniform,regmix,regmixd_offline --seeds 1,2,3 --budgets 25,50,100 \\
        [--stages 6] [--candidates 100000] [--fit-flags="..."] [--search-flags="..."] -- LAUNCHER FLAGS

Every arm gets the same launcher command (config, flags, tokenizer, evaluation data: every domain's
validation set) and the same seeds; only its `sched.json` (or, for the controllers, its launcher flags)
differs. RegMix and RegMix-D offline are fitted on the same sweep's proxies, once per proxy budget
(the first B% of the collected runs; the sweep's mixtures are random, so that is a random subset).

Layout under --out: `compare.json` (settings), `schedules/<label>/` (proxy tables, surrogate,
sched.json), `runs/<label>/seed<S>/` (the launcher's --save: trajectory.jsonl, train_log.jsonl,
checkpoint, `log.txt`, `done` once complete, and tools.heldout's `heldout.json`, redone when tokens.json
has an eval-only set it lacks). A label is the arm, with `_b<B>` for a budget.
Runs go seed by seed (every arm's first seed before any arm's second), so a comparison stopped
part-way holds complete seeds. Re-running skips every finished schedule and run; a killed run resumes from its checkpoint if it
has one, else starts over: a kill loses at most the run in progress. `tools.report` reads the result.
"""
import argparse
import csv
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from megatron_ext.atomic import atomic_write
from megatron_ext.checkpoint_files import TRACKER
from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule
from tools.cli import run_main
from tools.heldout import is_current as heldout_is_current
from tools.surrogate import proxy_nonembedding_params
from tools.sweep import (DONE, LAUNCHER, SCHED, expected_evals, load_tokens, proxy_schedule,
                         free_port, read_json, tokenizer_flags, trajectory_records, write_json)

COMPARE_JSON, SCHEDULES, RUNS, LOG = "compare.json", "schedules", "runs", "log.txt"


@dataclass
class Context:
    """What every arm's recipe may use."""
    sweep: str
    tokens_path: str
    tokens: dict
    domains: list
    target_tokens: int
    stages: int
    candidates: int
    search_seed: int
    fit_flags: list
    search_flags: list
    launcher: list           # the target's launcher command without schedule, seed and --save
    expected_evals: int      # evaluation lines of a complete target run


@dataclass(frozen=True)
class Arm:
    """One way to choose the target's data. `schedule(ctx, budget, folder)` writes folder/sched.json;
    `launcher_flags(ctx, folder)` adds flags (the controllers)."""
    what: str
    schedule: Callable
    launcher_flags: Callable = lambda ctx, folder: []
    uses_budget: bool = False


def python_module(module: str, argv: list) -> None:
    """Run one of the project's CLIs as its user would (its own process, its own one-line errors)."""
    cmd = [sys.executable, "-m", module] + [str(a) for a in argv]
    print("[compare] $ " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"{module} failed (command above)")


def fixed_schedule(ctx: Context, weights: list, folder: str, what: str) -> None:
    provenance = {"made_by": "tools.compare", "arm": what, "tokens": ctx.tokens_path}
    proxy_schedule([weights], [0.0], ctx.domains, ctx.tokens, provenance).save(os.path.join(folder, SCHED))


def natural_schedule(ctx: Context, budget, folder: str) -> None:
    counts = [float(ctx.tokens["domains"][d]["train_tokens"]) for d in ctx.domains]
    fixed_schedule(ctx, [c / sum(counts) for c in counts], folder, "natural: token shares")


def uniform_schedule(ctx: Context, budget, folder: str) -> None:
    fixed_schedule(ctx, [1.0 / len(ctx.domains)] * len(ctx.domains), folder, "uniform")


def read_rows(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def budget_runs(ctx: Context, budget: int) -> list:
    """The first ceil(budget% × M) of the sweep's M collected proxies (sorted by id)."""
    runs = sorted({r["run"] for r in read_rows(os.path.join(ctx.sweep, "mixtures.csv"))})
    return runs[:max(1, math.ceil(len(runs) * budget / 100))]


def subset_sweep(ctx: Context, budget: int, folder: str) -> list:
    """folder/proxies/{trajectories,mixtures}.csv: the sweep's tables restricted to the budget's runs."""
    keep = set(budget_runs(ctx, budget))
    sub = os.path.join(folder, "proxies")
    os.makedirs(sub, exist_ok=True)
    for name in ("trajectories.csv", "mixtures.csv"):
        with open(os.path.join(ctx.sweep, name), newline="") as f:
            lines = f.read().splitlines(keepends=True)
        atomic_write(os.path.join(sub, name), lines[0] + "".join(
            line for line in lines[1:] if line.split(",", 1)[0] in keep))
    return sorted(keep)


def folds(n_proxies: int) -> int:
    """Grouped CV folds for a fit on n proxies (none below 3: nothing to hold out)."""
    return min(5, n_proxies) if n_proxies >= 3 else 0


def search(ctx: Context, surrogate: str, folder: str, stages: int) -> None:
    python_module("tools.search", ["--surrogate", surrogate, "--out", os.path.join(folder, SCHED),
                                   "--stages", stages, "--tokens", ctx.tokens_path,
                                   "--target-tokens", ctx.target_tokens, "--candidates", ctx.candidates,
                                   "--seed", ctx.search_seed] + ctx.search_flags)


def fit_trajectory_surrogate(ctx: Context, budget: int, folder: str) -> str:
    """folder/surrogate: the trajectory surrogate of the budget's proxies (RegMix-D offline and online)."""
    runs = subset_sweep(ctx, budget, folder)
    surrogate = os.path.join(folder, "surrogate")
    params = proxy_nonembedding_params(ctx.sweep)  # the subset has no runner.json to read it from
    python_module("tools.fit", ["--sweep", os.path.join(folder, "proxies"), "--out", surrogate,
                                "--stages", ctx.stages, "--targets", "target", "--folds", folds(len(runs))]
                  + (["--proxy-params", params] if params else []) + ctx.fit_flags)
    return surrogate


def regmixd_offline_schedule(ctx: Context, budget: int, folder: str) -> None:
    search(ctx, fit_trajectory_surrogate(ctx, budget, folder), folder, ctx.stages)


def regmixd_online_schedule(ctx: Context, budget: int, folder: str) -> None:
    """The surrogate the controller queries, and the prior (token shares) it starts from."""
    fit_trajectory_surrogate(ctx, budget, folder)
    natural_schedule(ctx, budget, folder)


def regmixd_online_flags(ctx: Context, folder: str) -> list:
    return ["--mixture-controller", "regmixd", "--surrogate", os.path.join(folder, "surrogate"),
            "--controller-candidates", str(ctx.candidates), "--controller-seed", str(ctx.search_seed),
            "--controller-tokens", ctx.tokens_path]


def doremi_schedule(ctx: Context, budget, folder: str) -> None:
    """DoReMi as its authors run it, at the target's size here: a reference model on the natural
    mixture, then a Group-DRO proxy against it (same model, tokens and data); its averaged domain
    weights become the target's one-stage mixture."""
    natural_schedule(ctx, budget, folder)
    prior = os.path.join(folder, "prior_" + SCHED)
    os.replace(os.path.join(folder, SCHED), prior)
    reference, dro = os.path.join(folder, "reference"), os.path.join(folder, "dro")
    for run_dir, flags, title in ((reference, [], "doremi reference (natural mixture)"),
                                  (dro, ["--mixture-controller", "doremi", "--reference-load", reference],
                                   "doremi DRO proxy")):
        if not os.path.exists(os.path.join(run_dir, DONE)):
            run_target(ctx.launcher + ["--data-schedule", prior] + flags, run_dir, ctx.expected_evals, title)
    python_module("tools.schedule", ["from-doremi", os.path.join(dro, "doremi_weights.json"),
                                     "--out", os.path.join(folder, SCHED)])


def static_tables(ctx: Context, runs: list, folder: str) -> tuple:
    """RegMix's CSV pair from the proxies: each run's time-averaged mixture and its final losses."""
    keep = set(runs)
    mix = {}
    for r in read_rows(os.path.join(ctx.sweep, "mixtures.csv")):
        if r["run"] in keep:
            mix.setdefault(r["run"], []).append((float(r["start"]), int(r["stage"]), r["domain"], float(r["weight"])))
    rows = [r for r in read_rows(os.path.join(ctx.sweep, "trajectories.csv")) if r["run"] in keep]
    last = {}
    for r in rows:
        last[r["run"]] = max(last.get(r["run"], -1), int(r["iteration"]))
    final = {run: {} for run in runs}
    for r in rows:
        if int(r["iteration"]) == last[r["run"]]:
            final[r["run"]][r["domain"]] = float(r["loss"])
            final[r["run"]]["target"] = float(r["target"])
    domains = sorted({d for rows in mix.values() for _, _, d, _ in rows})
    loss_cols = ["target"] + domains
    mix_lines, loss_lines = ["index," + ",".join(domains)], ["index," + ",".join(loss_cols)]
    for run in runs:
        starts = sorted({(s, k) for s, k, _, _ in mix[run]})
        ends = [s for s, _ in starts[1:]] + [1.0]
        avg = {d: 0.0 for d in domains}
        for (start, stage), end in zip(starts, ends):
            for s, k, d, w in mix[run]:
                if k == stage:
                    avg[d] += w * (end - start)
        mix_lines.append(run + "," + ",".join(repr(avg[d]) for d in domains))
        loss_lines.append(run + "," + ",".join(repr(final[run][c]) for c in loss_cols))
    paths = os.path.join(folder, "mixtures_static.csv"), os.path.join(folder, "losses_static.csv")
    for path, lines in zip(paths, (mix_lines, loss_lines)):
        atomic_write(path, "\n".join(lines) + "\n")
    return paths


def regmix_schedule(ctx: Context, budget: int, folder: str) -> None:
    runs = budget_runs(ctx, budget)
    mixtures, losses = static_tables(ctx, runs, folder)
    surrogate = os.path.join(folder, "surrogate")
    python_module("tools.fit", ["--mixtures", mixtures, "--losses", losses, "--target", "target",
                                "--targets", "target", "--out", surrogate, "--folds", folds(len(runs))]
                  + ctx.fit_flags)
    search(ctx, surrogate, folder, 1)


ARMS = {
    "natural": Arm("token-proportional mixture (the corpus as it is)", natural_schedule),
    "uniform": Arm("equal weight per domain", uniform_schedule),
    "regmix": Arm("RegMix: static LightGBM fit of the proxies' final target loss, 1 searched stage",
                  regmix_schedule, uses_budget=True),
    "regmixd_offline": Arm("RegMix-D offline: per-transition fit of the proxies' trajectories, K-stage rollout search",
                           regmixd_offline_schedule, uses_budget=True),
    "doremi": Arm("DoReMi: reference (natural mixture) + Group-DRO proxy of the target's size, averaged weights",
                  doremi_schedule),
    "regmixd_online": Arm("RegMix-D online: the frozen transition model queried with the target's own losses",
                          regmixd_online_schedule, launcher_flags=regmixd_online_flags, uses_budget=True),
}
DEFAULT_ARMS = "natural,uniform,regmix,regmixd_offline,doremi,regmixd_online"


def labels(arm: str, budgets: list) -> list:
    return [f"{arm}_b{b}" for b in budgets] if ARMS[arm].uses_budget else [arm]


def run_target(argv: list, run_dir: str, expected: int, title: str, threads=None) -> None:
    """One target run to completion: resume from a checkpoint, or start over with a stale log removed.
    `threads` sets OMP_NUM_THREADS when several runs share the machine."""
    os.makedirs(run_dir, exist_ok=True)
    resume = os.path.exists(os.path.join(run_dir, TRACKER))
    if not resume:
        for name in ("trajectory.jsonl", "train_log.jsonl"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    cmd = argv + ["--save", run_dir] + (["--load", run_dir] if resume else [])
    print(f"[compare] {title}: {'resuming' if resume else 'training'} (log {os.path.join(run_dir, LOG)})", flush=True)
    start = time.time()
    with open(os.path.join(run_dir, LOG), "a") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        env = dict(os.environ, MASTER_PORT=str(free_port()))  # concurrent runs each get a rendezvous port
        if threads:
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith(("iter ", "eval iter ")):
                print(f"[compare]   {title}: {line.rstrip()[:160]}", flush=True)
        code = proc.wait()
    got = len(trajectory_records(run_dir))  # an online controller adds its switch-point evaluations
    if code != 0 or got < expected:
        raise UserError(f"{title}: the launcher exited {code} with {got} of {expected} evaluations "
                        f"(see {os.path.join(run_dir, LOG)})")
    write_json(os.path.join(run_dir, DONE), {"seconds": round(time.time() - start, 1), "evaluations": got})


def launcher_settings(argv: list) -> tuple:
    """(train_iters, eval_interval, tokens per run) from the launcher's own parser."""
    from megatron_ext.arguments import parse_args
    args = parse_args(argv)
    iters = args.train_iters or args.train_samples // args.global_batch_size
    return iters, args.eval_interval, iters * args.global_batch_size * args.seq_length


def parse_list(text: str, what: str, cast=str) -> list:
    try:
        items = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what}: expected a comma-separated list, got {text!r}") from None
    if not items or len(set(items)) != len(items):
        raise UserError(f"--{what}: expected distinct values, got {text!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="collected proxy sweep (trajectories.csv, mixtures.csv)")
    p.add_argument("--out", required=True, help="comparison folder, e.g. runs/compare")
    p.add_argument("--config", required=True, help="target launcher config, e.g. examples/demo_10m.yaml")
    p.add_argument("--tokens", default="data/tok/tokens.json")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--seeds", default="1", help="launcher --seed values, comma-separated")
    p.add_argument("--budgets", default="100", help="proxy budgets in %% of the sweep (RegMix, RegMix-D offline)")
    p.add_argument("--stages", type=int, default=6, help="RegMix-D stages (the proxies' evaluation grid)")
    p.add_argument("--candidates", type=int, default=100_000, help="search candidates per stage")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--fit-flags", default="", help="extra tools.fit flags as one string: --fit-flags=\"--min-data-in-leaf 5\"")
    p.add_argument("--search-flags", default="", help="extra tools.search flags, one string")
    p.add_argument("--jobs", type=int, default=1, help="target runs at once (threads per run = cores // jobs)")
    p.add_argument("--schedules-only", action="store_true", help="write the schedules, train nothing")
    p.add_argument("launcher", nargs=argparse.REMAINDER, help="-- then launcher flags for every target run")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extra = args.launcher[1:] if args.launcher[:1] == ["--"] else args.launcher
    arms = parse_list(args.arms, "arms")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
    seeds = parse_list(args.seeds, "seeds", int)
    budgets = parse_list(args.budgets, "budgets", int)
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    if any(not 0 < b <= 100 for b in budgets):
        raise UserError("--budgets: each must be in 1..100 (percent of the sweep's proxies)")
    if any(ARMS[a].uses_budget for a in arms):
        for name in ("trajectories.csv", "mixtures.csv"):
            if not os.path.isfile(os.path.join(args.sweep, name)):
                raise UserError(f"{args.sweep}: no {name} (run tools.collect first)")
    tokens = load_tokens(args.tokens)
    base = [sys.executable, LAUNCHER, "--config", args.config] + tokenizer_flags(tokens) + extra
    iters, eval_interval, target_tokens = launcher_settings(base[2:] + ["--data-path", "unused"])
    domains = sorted(tokens["domains"])   # the sweep's too, unless it was sampled with --domains
    ctx = Context(sweep=args.sweep, tokens_path=args.tokens, tokens=tokens, domains=domains,
                  target_tokens=target_tokens, stages=args.stages, candidates=args.candidates,
                  search_seed=args.search_seed, fit_flags=shlex.split(args.fit_flags),
                  search_flags=shlex.split(args.search_flags), launcher=base,
                  expected_evals=expected_evals(iters, eval_interval))
    settings = {"sweep": args.sweep, "tokens": args.tokens, "config": args.config, "launcher": extra,
                "target_tokens": target_tokens, "train_iters": iters, "eval_interval": eval_interval,
                "stages": args.stages, "candidates": args.candidates, "search_seed": args.search_seed,
                "fit_flags": args.fit_flags, "search_flags": args.search_flags}
    previous = read_json(os.path.join(args.out, COMPARE_JSON))
    if previous and previous.get("settings") != settings:
        changed = sorted(k for k in settings if previous["settings"].get(k) != settings[k])
        raise UserError(f"{args.out} holds a comparison with other settings ({', '.join(changed)}); "
                        "pick a new --out")
    os.makedirs(args.out, exist_ok=True)
    arm_info = dict((previous or {}).get("arms", {}))
    for arm in arms:
        arm_info[arm] = {"what": ARMS[arm].what, "labels": labels(arm, budgets)}
    all_seeds = sorted(set((previous or {}).get("seeds", [])) | set(seeds))
    write_json(os.path.join(args.out, COMPARE_JSON), {"settings": settings, "arms": arm_info, "seeds": all_seeds})
    print(f"[compare] target: {iters} iterations, {target_tokens:,} tokens, evaluation every {eval_interval}; "
          f"seeds {seeds}; budgets {budgets}%", flush=True)

    plan = []
    for arm in arms:
        for label, budget in zip(labels(arm, budgets), budgets if ARMS[arm].uses_budget else [None]):
            folder = os.path.join(args.out, SCHEDULES, label)
            if os.path.isfile(os.path.join(folder, SCHED)):
                print(f"[compare] schedule {label}: done, skipped", flush=True)
            else:
                print(f"[compare] schedule {label}: making it", flush=True)
                os.makedirs(folder, exist_ok=True)
                ARMS[arm].schedule(ctx, budget, folder)
            plan += [(label, folder, arm, seed) for seed in seeds]
    if args.schedules_only:
        return 0
    plan.sort(key=lambda item: seeds.index(item[3]))   # seed by seed: a stopped comparison holds whole seeds
    expected = ctx.expected_evals
    threads = str(max(1, len(os.sched_getaffinity(0)) // args.jobs))

    def one(n, label, folder, arm, seed):
        run_dir = os.path.join(args.out, RUNS, label, f"seed{seed}")
        title = f"({n}/{len(plan)}) {label} seed {seed}"
        if os.path.exists(os.path.join(run_dir, DONE)):
            print(f"[compare] {title}: done, skipped", flush=True)
        else:
            sched = os.path.join(folder, SCHED)
            MixtureSchedule.load(sched).validate()
            run_dir_sched = os.path.join(run_dir, SCHED)
            os.makedirs(run_dir, exist_ok=True)
            shutil.copyfile(sched, run_dir_sched)
            argv = base + ["--data-schedule", run_dir_sched, "--seed", str(seed)] + ARMS[arm].launcher_flags(ctx, folder)
            run_target(argv, run_dir, expected, title, threads if args.jobs > 1 else None)
        if not heldout_is_current(run_dir, tokens):   # also when tokens.json gained an eval-only set
            python_module("tools.heldout", [run_dir, "--tokens", args.tokens])

    with ThreadPoolExecutor(args.jobs) as pool:   # each run is its own process; threads only wait
        for future in [pool.submit(one, n, *item) for n, item in enumerate(plan, 1)]:
            future.result()
    print(f"[compare] {len(plan)} runs complete under {os.path.join(args.out, RUNS)}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
