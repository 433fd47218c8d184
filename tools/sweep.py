"""The proxy sweep: sample RegMix mixtures, train every proxy (locally in persistent workers, or as a Slurm array).

    python -m tools.sweep sample sweep/NAME --tokens data/tok/tokens.json --n 32 [--stages K --dynamic]
    python -m tools.sweep run sweep/NAME --config examples/proxy_1m.yaml --jobs 2 [-- launcher flags]
    python -m tools.sweep run sweep/NAME ... --slurm        # writes sweep/NAME/sweep.sbatch instead
    python -m tools.sweep status sweep/NAME
    python -m tools.sweep run-one sweep/NAME ID...         # the per-run command (what Slurm tasks call)

Layout: sweep/NAME/sweep.json (sampling settings), runner.json (run settings), runs/<id>/sched.json,
and per run the launcher's --save output plus `done` / `failed` markers, `state.json` (failed attempts),
`claim` (who runs it) and `log.txt`.

Disk: a proxy keeps only its latest checkpoint while it runs (the launcher's
`--keep-last-checkpoints 1`) and none once it is done; `run --keep-checkpoints` keeps them all.

Locally, `run` keeps `--jobs` workers (tools.sweep_worker) that import megatron-core once and train
their proxies one after another in-process, each through `run_one` below.

Exactly-once: `run-one` holds an exclusive flock on the run directory for as long as the run lives, and
hands the locked descriptor down to the launcher, so the lock outlives a killed runner as long as its
launcher still runs, and vanishes with the last process holding it (a dead pid's claim is stale and is
reclaimed). Resume: a run directory with a checkpoint gets `--load` (Megatron resumes and the launcher
trims its trajectory to the checkpoint); one without starts over with its old trajectory removed.
"""
import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import megatron_ext.quiet_imports  # noqa: F401  (before megatron-core, which `run` imports to check flags)
from megatron_ext.atomic import atomic_write, make_output_dir
from megatron_ext.checkpoint_files import TRACKER, disk_usage, remove_checkpoints
from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule
from megatron_ext.text_files import read_json_file, read_text
from tools.cli import run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "pretrain_regmixd.py")
SWEEP_JSON, RUNNER_JSON, RUNS = "sweep.json", "runner.json", "runs"
SCHED, TRAJECTORY, DONE, FAILED = "sched.json", "trajectory.jsonl", "done", "failed"
CLAIM, STATE, LOG = "claim", "state.json", "log.txt"
EXIT_BUSY = 3  # run-one: another process holds the run
DEFAULT_COMMAND = ("{python} {launcher} --config {config} --data-schedule {sched} --save {run_dir} {load} "
                   "{train} --seed {seed} {tokenizer} {extra}")


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n", fsync=True)


def read_json(path: str):
    """The file's JSON value, None when it does not exist; unreadable or not JSON: one-line error."""
    if not os.path.exists(path):
        return None
    return read_json_file(path)


def trajectory_records(run_dir: str) -> list:
    """The run's trajectory lines (whole lines only: the launcher appends each in one write)."""
    path = os.path.join(run_dir, TRAJECTORY)
    if not os.path.exists(path):
        return []
    records = []
    for line in read_text(path, "trajectory").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {len(records) + 1} is not valid JSON") from None
    return records


def expected_evals(train_iters: int, eval_interval: int) -> int:
    """Evaluations of a complete run: every eval_interval iterations and once more at the end."""
    return -(-train_iters // eval_interval)


# ---------------------------------------------------------------------------------------------------
# sample

def load_tokens(path: str) -> dict:
    tokens = read_json(path)
    if tokens is None:
        raise UserError(f"{path}: no such file (run tools.preprocess first)")
    if not isinstance(tokens, dict) or not isinstance(tokens.get("domains"), dict) or not tokens["domains"]:
        raise UserError(f"{path}: expected a tokens.json with a non-empty 'domains' mapping")
    return tokens


def proxy_schedule(stages, starts, domains: list, tokens: dict, provenance: dict) -> MixtureSchedule:
    """One proxy's sched.json: its stage mixtures over the domains' train prefixes, all domains in valid."""
    info = tokens["domains"]
    train = [info[d]["train_prefix"] for d in domains]
    d = {"version": 1, "unit": "fraction",
         "stages": [{"start": float(s), "train": [x for w, p in zip(weights, train) for x in (float(w), p)]}
                    for s, weights in zip(starts, stages)],
         "provenance": provenance}
    if all(info[name].get("valid_prefix") for name in domains):
        d["valid"] = [x for name in domains for x in (1, info[name]["valid_prefix"])]
    return MixtureSchedule.from_dict(d)


def cmd_sample(args) -> int:
    # numpy only here: run-one starts once per proxy and should start fast
    from tools.mixture_sampler import MixtureSampler, SamplerConfig, summarize
    tokens = load_tokens(args.tokens)
    domains = args.domains.split(",") if args.domains else sorted(tokens["domains"])
    unknown = [d for d in domains if d not in tokens["domains"]]
    if unknown:
        raise UserError(f"--domains: {', '.join(unknown)} not in {args.tokens}")
    if len(set(domains)) != len(domains):
        raise UserError("--domains lists a domain twice")
    for d in domains:
        if "train_prefix" not in tokens["domains"][d] or "train_tokens" not in tokens["domains"][d]:
            raise UserError(f"{args.tokens}: domain {d!r} lacks train_prefix or train_tokens")
    cfg = SamplerConfig(n=args.n, seed=args.seed, temperature=args.temperature, max_usage=args.max_usage,
                        min_weight=args.min_weight, sample_multiplier=args.sample_multiplier, stages=args.stages,
                        dynamic=args.dynamic, stage_correlation=args.stage_correlation)
    sampler = MixtureSampler([tokens["domains"][d]["train_tokens"] for d in domains], cfg)
    settings = {"tokens": args.tokens, "domains": domains, "sampler": asdict(cfg)}
    existing = read_json(os.path.join(args.sweep, SWEEP_JSON))
    if existing is not None:
        if existing != settings:
            raise UserError(f"{args.sweep} was sampled with other settings; pick a new sweep name")
        print(f"{args.sweep}: already sampled ({cfg.n} proxies), nothing to do")
        return 0
    mixtures = sampler.sample()
    for i, stages in enumerate(mixtures):
        run_dir = os.path.join(args.sweep, RUNS, f"p{i:04d}")
        make_output_dir(run_dir, "sweep")
        provenance = {"made_by": "tools.sweep sample", "proxy": i, "seed": cfg.seed, "tokens": args.tokens}
        proxy_schedule(stages, sampler.stage_starts(), domains, tokens, provenance).save(
            os.path.join(run_dir, SCHED))
    write_json(os.path.join(args.sweep, SWEEP_JSON), settings)   # last: marks the sample complete
    print(summarize(mixtures, domains))
    print(f"wrote {len(mixtures)} schedules under {os.path.join(args.sweep, RUNS)}")
    return 0


# ---------------------------------------------------------------------------------------------------
# run settings, claims and one run

@dataclass
class RunSettings:
    """What every run of a sweep executes, stored in runner.json so Slurm tasks run the same thing."""
    command: str
    config: str
    seed: int
    train_iters: int                  # 0 until known: then the launcher config's value applies
    eval_interval: int
    save_interval: int                # checkpoint period, so an interrupted run resumes
    expected_evals: int
    retries: int
    run_timeout: float = 0.0          # seconds per attempt; 0 = none
    tokenizer: list = field(default_factory=list)
    extra: list = field(default_factory=list)
    cwd: str = ""
    keep_checkpoints: bool = False    # False: only the latest while running, none once done

    @classmethod
    def load(cls, sweep: str) -> "RunSettings":
        d = read_json(os.path.join(sweep, RUNNER_JSON))
        if d is None:
            raise UserError(f"{sweep}: no {RUNNER_JSON}; start the sweep with `tools.sweep run` first")
        return cls(**d)


def run_ids(sweep: str) -> list:
    if read_json(os.path.join(sweep, SWEEP_JSON)) is None:
        raise UserError(f"{sweep}: not a sampled sweep (no {SWEEP_JSON}); run `tools.sweep sample` first")
    root = os.path.join(sweep, RUNS)
    if not os.path.isdir(root):
        raise UserError(f"{sweep}: no {RUNS}/ folder")
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, SCHED)))


def tokenizer_flags(tokens: dict) -> list:
    """Launcher tokenizer flags (Megatron-LM names) from tokens.json's tokenizer entry."""
    tok = tokens.get("tokenizer") or {}
    if "type" not in tok:
        return []
    flags = ["--tokenizer-type", tok["type"]]
    for key, flag in (("model", "--tokenizer-model"), ("vocab_file", "--vocab-file"), ("merge_file", "--merge-file")):
        if tok.get(key):
            flags += [flag, tok[key]]
    if tok["type"] == "NullTokenizer":
        flags += ["--vocab-size", str(tok["vocab_size"])]
    return flags


def has_checkpoint(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, TRACKER))


def finished_unmarked(run_dir: str, settings: "RunSettings") -> bool:
    """The launcher finished (final checkpoint, every evaluation) but the runner was killed before it
    wrote `done`: a restart must mark it, not run it again."""
    try:
        with open(os.path.join(run_dir, TRACKER), "rb") as f:
            last = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return False
    return last >= settings.train_iters and len(trajectory_records(run_dir)) == settings.expected_evals


def run_command(settings: RunSettings, run_dir: str) -> list:
    """The per-run argv: the settings' template filled in for this run."""
    q = shlex.quote
    fields = {
        "python": q(sys.executable), "launcher": q(LAUNCHER), "config": q(settings.config),
        "sched": q(os.path.abspath(os.path.join(run_dir, SCHED))), "run_dir": q(os.path.abspath(run_dir)),
        "id": q(os.path.basename(run_dir)), "seed": str(settings.seed),
        "train_iters": str(settings.train_iters), "eval_interval": str(settings.eval_interval),
        "train": " ".join(f"--{flag} {value}" for flag, value in (
            ("train-iters", settings.train_iters), ("eval-interval", settings.eval_interval),
            ("save-interval", settings.save_interval),
            ("keep-last-checkpoints", 0 if settings.keep_checkpoints else 1)) if value),
        "load": f"--load {q(os.path.abspath(run_dir))}" if has_checkpoint(run_dir) else "",
        "tokenizer": " ".join(map(q, settings.tokenizer)), "extra": " ".join(map(q, settings.extra)),
    }
    try:
        return shlex.split(settings.command.format(**fields))
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--command: bad template ({exc!r}); fields: {', '.join(sorted(fields))}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_claim(run_dir: str):
    """An fd holding the run's exclusive lock, or None if another process holds it."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    write_json(os.path.join(run_dir, CLAIM), {"pid": os.getpid(), "host": socket.gethostname(),
                                              "since": time.time()})
    return fd


def claim_state(run_dir: str) -> str:
    """'free', 'held' or 'stale' (a claim file whose process is gone); probes without keeping the lock."""
    claim = read_json(os.path.join(run_dir, CLAIM))
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    finally:
        os.close(fd)
    return "stale" if claim else "free"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Terminated(Exception):
    pass


def prepare_attempt(settings: RunSettings, run_dir: str, number: int) -> tuple:
    """(argv, resume) of the next attempt, whose header line is now in the run's log."""
    resume = has_checkpoint(run_dir)
    if not resume and os.path.exists(os.path.join(run_dir, TRAJECTORY)):
        os.remove(os.path.join(run_dir, TRAJECTORY))   # a restart must not append to a dead run's lines
    argv = run_command(settings, run_dir)
    with open(os.path.join(run_dir, LOG), "a") as log:
        log.write(f"=== attempt {number} ({'resume' if resume else 'start'}) pid {os.getpid()} "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}\n")
    return argv, resume


def judge_attempt(settings: RunSettings, run_dir: str) -> tuple:
    """(ok, reason) of an attempt that ended without error: every evaluation must be there."""
    evals = len(trajectory_records(run_dir))
    if evals != settings.expected_evals:
        return False, f"exit code 0 but {evals} of {settings.expected_evals} trajectory lines"
    return True, ""


def attempt(settings: RunSettings, run_dir: str, lock_fd: int, number: int) -> tuple:
    """One launcher execution in a child process; returns (ok, reason, details for the `done` marker)."""
    argv, _ = prepare_attempt(settings, run_dir, number)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    with open(os.path.join(run_dir, LOG), "a") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=settings.cwd or None, pass_fds=(lock_fd,))

        def forward(signum, _frame):
            child.send_signal(signum)
            raise _Terminated()

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = child.wait(timeout=settings.run_timeout or None)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return False, f"timed out after {settings.run_timeout:g} s", {}
        except _Terminated:
            child.wait()
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if code != 0:
        return False, f"exit code {code}", {}
    return (*judge_attempt(settings, run_dir), {})


def record_failure(run_dir: str, settings: RunSettings, state: dict, reason: str) -> bool:
    """Count a failed attempt in `state.json` (the caller holds the run); True when the run is now failed."""
    state["failures"] += 1
    state["last_error"] = reason
    write_json(os.path.join(run_dir, STATE), state)
    if state["failures"] > settings.retries:
        write_json(os.path.join(run_dir, FAILED), {
            "run": os.path.basename(run_dir), "attempts": state["failures"], "reason": reason,
            "log": os.path.abspath(os.path.join(run_dir, LOG))})
        return True
    return False


def failure_state(run_dir: str) -> dict:
    return read_json(os.path.join(run_dir, STATE)) or {"failures": 0}


def run_one(sweep: str, run_id: str, settings: RunSettings, attempt_fn=attempt, on_attempt=None) -> int:
    """Run one proxy to completion (with retries) unless done, failed, or held by another process.
    `attempt_fn` runs one attempt (default: the launcher in a child process); `on_attempt(number)`
    is told when each starts.

    Exit: 0 done, 1 failed (now or before), EXIT_BUSY held elsewhere."""
    run_dir = os.path.join(sweep, RUNS, run_id)
    if not os.path.isfile(os.path.join(run_dir, SCHED)):
        raise UserError(f"{run_dir}: no {SCHED}")
    lock = try_claim(run_dir)
    if lock is None:
        return EXIT_BUSY
    try:
        if os.path.exists(os.path.join(run_dir, DONE)):
            finish_disk(run_dir, settings)   # a runner killed between `done` and the clean-up
            return 0
        if os.path.exists(os.path.join(run_dir, FAILED)):
            return 1
        state = failure_state(run_dir)
        start = time.time()
        while True:
            details = {}
            if finished_unmarked(run_dir, settings):
                ok, reason = True, ""
            else:
                if on_attempt is not None:
                    on_attempt(state["failures"] + 1)
                try:
                    ok, reason, details = attempt_fn(settings, run_dir, lock, state["failures"] + 1)
                except _Terminated:
                    return 143
            if ok:
                write_json(os.path.join(run_dir, DONE), {
                    "run": run_id, "evals": settings.expected_evals, "attempts": state["failures"] + 1,
                    "wall_s": round(time.time() - start, 3), "finished": time.time(), **details})
                finish_disk(run_dir, settings)
                return 0
            if record_failure(run_dir, settings, state, reason):
                return 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, CLAIM))
        os.close(lock)


def finish_disk(run_dir: str, settings: RunSettings) -> None:
    """A done run's checkpoints are no longer needed (the trajectory is the result) unless kept."""
    if not settings.keep_checkpoints:
        remove_checkpoints(run_dir)


def cmd_run_one(args) -> int:
    settings = RunSettings.load(args.sweep)
    if args.runs_per_task < 1:
        raise UserError(f"--runs-per-task must be at least 1, got {args.runs_per_task}")
    everything = run_ids(args.sweep)
    ids = args.ids
    if args.task_index is not None:
        if args.task_index < 0:
            raise UserError(f"--task-index must be >= 0, got {args.task_index}")
        ids = everything[args.task_index * args.runs_per_task:(args.task_index + 1) * args.runs_per_task]
    if not ids:
        raise UserError("run-one: no run ids (give IDs or --task-index)")
    unknown = [i for i in ids if i not in everything]   # also refuses paths such as ../../elsewhere/x
    if unknown:
        raise UserError(f"run-one: {unknown[0]!r} is not a run of {args.sweep} (runs are {everything[0]}.."
                        f"{everything[-1]})" if everything else f"run-one: {args.sweep} has no runs")
    codes = [run_one(args.sweep, i, settings) for i in ids]
    return max(codes)


# ---------------------------------------------------------------------------------------------------
# the local runner

def gpu_ids() -> list:
    """GPUs to spread runs over: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def run_state(run_dir: str) -> str:
    if os.path.exists(os.path.join(run_dir, DONE)):
        return "done"
    if os.path.exists(os.path.join(run_dir, FAILED)):
        return "failed"
    return "todo"


def fmt_hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Worker:
    """One `tools.sweep_worker` process: gets run ids on stdin, one at a time, and answers on stdout
    `attempt ID N` as each attempt starts and `result ID CODE` (run_one's exit code) at the end."""

    def __init__(self, sweep: str, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.sweep_worker", sweep], env=env, cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.pending = b""
        self.run_id, self.attempt_since = None, 0.0

    def give(self, run_id: str) -> None:
        self.proc.stdin.write(f"{run_id}\n".encode())
        self.proc.stdin.flush()
        self.run_id, self.attempt_since = run_id, time.time()

    def messages(self) -> list:
        """The whole lines it wrote since the last call, split into words."""
        try:
            chunk = self.proc.stdout.read() or b""
        except BlockingIOError:
            chunk = b""
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        return [line.decode().split() for line in lines if line.strip()]

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait()


class LocalRunner:
    """Keeps `jobs` sweep workers busy until every run is done or failed. A worker imports megatron-core
    once and trains its runs one after another in its own process (a custom `--command`: one child
    process per attempt, as `run-one`). A worker that dies, or whose in-process attempt outlives
    `--run-timeout` (it is killed), costs its run one attempt and is replaced."""

    def __init__(self, sweep: str, jobs: int, cores: int, gpus: list, settings: RunSettings):
        self.sweep, self.jobs, self.gpus, self.settings = os.path.abspath(sweep), jobs, gpus, settings
        self.threads = max(1, cores // jobs)
        self.in_process = settings.command == DEFAULT_COMMAND   # else `attempt` enforces the timeout
        self.workers = {}         # slot -> Worker
        self.tty = sys.stderr.isatty()
        self.last_line, self.last_print = "", 0.0

    def _worker(self, slot: int) -> Worker:
        if slot in self.workers and self.workers[slot].proc.poll() is not None:
            del self.workers[slot]           # an idle worker that ended on its own
        if slot not in self.workers:
            env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                       OPENBLAS_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
            self.workers[slot] = Worker(self.sweep, env)
        return self.workers[slot]

    def _running(self) -> int:
        return sum(w.run_id is not None for w in self.workers.values())

    def _lost(self, slot: int, reason: str) -> str:
        """Worker `slot` died or was killed mid-run: its run loses that attempt; returns the run id."""
        worker = self.workers.pop(slot)
        worker.stop(signal.SIGKILL)
        run_dir = os.path.join(self.sweep, RUNS, worker.run_id)
        lock = try_claim(run_dir)
        if lock is not None:
            try:
                if run_state(run_dir) == "todo":
                    record_failure(run_dir, self.settings, failure_state(run_dir), reason)
            finally:
                os.remove(os.path.join(run_dir, CLAIM))
                os.close(lock)
        return worker.run_id

    def _status(self, ids, started: float, finished_here: int, final=False) -> None:
        states = [run_state(os.path.join(self.sweep, RUNS, i)) for i in ids]
        done, failed = states.count("done"), states.count("failed")
        hours = (time.time() - started) / 3600
        rate = finished_here / hours if hours > 0 else 0.0
        left = len(ids) - done - failed
        eta = fmt_hms(left / rate * 3600) if rate > 0 else "--"
        line = (f"[sweep] done {done}/{len(ids)}  running {self._running()}  failed {failed}  "
                f"{rate:.1f} proxies/h  ETA {eta}")
        now = time.time()
        if self.tty and not final:
            sys.stderr.write("\r" + line.ljust(len(self.last_line)))
            sys.stderr.flush()
        elif final or line.split("  ")[:3] != self.last_line.split("  ")[:3] or now - self.last_print > 60:
            print(("\r" if self.tty else "") + line, file=sys.stderr, flush=True)
            self.last_print = now
        self.last_line = line

    def run(self) -> int:
        ids = run_ids(self.sweep)
        queue = [i for i in ids if run_state(os.path.join(self.sweep, RUNS, i)) == "todo"]
        elsewhere = {}            # run id -> time of the next look (held by another process)
        started, finished_here = time.time(), 0
        timeout = self.settings.run_timeout if self.in_process else 0.0
        try:
            while queue or self._running() or elsewhere:
                now = time.time()
                for run_id, when in list(elsewhere.items()):
                    if now >= when:
                        del elsewhere[run_id]
                        if run_state(os.path.join(self.sweep, RUNS, run_id)) == "todo":
                            queue.append(run_id)
                for slot in range(self.jobs):
                    while (slot not in self.workers or self.workers[slot].run_id is None) and queue:
                        run_id = queue.pop(0)
                        run_dir = os.path.join(self.sweep, RUNS, run_id)
                        if run_state(run_dir) != "todo":
                            continue
                        if claim_state(run_dir) == "held":
                            elsewhere[run_id] = now + 2.0
                            continue
                        self._worker(slot).give(run_id)
                for slot, worker in list(self.workers.items()):
                    for words in worker.messages():
                        if words[0] == "attempt":
                            worker.attempt_since = time.time()
                            continue
                        run_id, code = words[1], int(words[2])
                        worker.run_id = None
                        if code == 0:
                            finished_here += 1
                        elif code == EXIT_BUSY:
                            elsewhere[run_id] = now + 2.0
                        elif code != 1:
                            raise UserError(f"sweep worker: run {run_id} ended with code {code}")
                    if worker.run_id is None:
                        continue
                    code = worker.proc.poll()
                    if code is not None:
                        queue.insert(0, self._lost(slot, f"worker exited with code {code}"))
                    elif timeout and now - worker.attempt_since > timeout:
                        queue.insert(0, self._lost(slot, f"timed out after {timeout:g} s"))
                self._status(ids, started, finished_here)
                time.sleep(0.1)
            for worker in self.workers.values():
                worker.proc.stdin.close()       # no more runs: the worker exits
                worker.proc.wait()
        finally:
            for worker in self.workers.values():
                worker.stop()
        self._status(ids, started, finished_here, final=True)
        failed = [i for i in ids if run_state(os.path.join(self.sweep, RUNS, i)) == "failed"]
        for run_id in failed:
            info = read_json(os.path.join(self.sweep, RUNS, run_id, FAILED))
            print(f"failed: {run_id} ({info['reason']}, {info['attempts']} attempts) log {info['log']}")
        return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------
# run / status commands

def launcher_train_settings(argv: list) -> tuple:
    """(train_iters, eval_interval) the launcher will use for this argv, via its own parser; a
    `--target-domain` that is not one of the run's validation domains fails here, once."""
    from megatron_ext.arguments import parse_args
    from megatron_ext.preflight import check_target_domain
    args = parse_args(argv)
    if args.train_iters is None:
        raise UserError("proxy runs need --train-iters (a sweep counts evaluations per iteration)")
    check_target_domain(args.target_domain, MixtureSchedule.load(args.data_schedule))
    return args.train_iters, args.eval_interval


def make_settings(args) -> RunSettings:
    sweep_info = read_json(os.path.join(args.sweep, SWEEP_JSON))
    default = args.command is None
    if default and not args.config:
        raise UserError("--config is required with the default launcher command")
    if args.retries < 0:
        raise UserError("--retries must be >= 0")
    for flag in ("train_iters", "eval_interval", "save_interval", "expected_evals"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.run_timeout < 0:
        raise UserError(f"--run-timeout must be >= 0, got {args.run_timeout:g}")
    settings = RunSettings(command=args.command or DEFAULT_COMMAND, config=args.config or "", seed=args.seed,
                           train_iters=args.train_iters or 0, eval_interval=args.eval_interval or 0,
                           save_interval=args.save_interval or 0, expected_evals=0, retries=args.retries,
                           run_timeout=args.run_timeout, tokenizer=tokenizer_flags(load_tokens(sweep_info["tokens"])),
                           extra=args.extra, cwd=os.getcwd(), keep_checkpoints=args.keep_checkpoints)
    first = os.path.join(args.sweep, RUNS, run_ids(args.sweep)[0])
    argv = run_command(settings, first)        # a bad template fails here, not in every run
    if default:
        # the launcher's own parser checks the whole command line once, here, not in every run
        settings.train_iters, settings.eval_interval = launcher_train_settings(argv[2:])
    elif not settings.train_iters or not settings.eval_interval:
        raise UserError("a custom --command needs --train-iters and --eval-interval")
    settings.save_interval = settings.save_interval or settings.eval_interval
    settings.expected_evals = args.expected_evals or expected_evals(settings.train_iters, settings.eval_interval)
    return settings


def slurm_script(sweep: str, settings: RunSettings, n_runs: int, runs_per_task: int, cpus: int,
                 sbatch_args: list) -> str:
    tasks = -(-n_runs // runs_per_task)
    root = os.path.abspath(sweep)
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=sweep-{os.path.basename(root)}",
             f"#SBATCH --array=0-{tasks - 1}",
             f"#SBATCH --cpus-per-task={cpus}",
             f"#SBATCH --output={root}/slurm/%A_%a.out"]
    lines += [f"#SBATCH {a}" for a in sbatch_args]
    lines += [f"# {n_runs} proxies, {runs_per_task} per array task; written by tools.sweep run --slurm.",
              "# Each task calls the sweep's per-run command (run-one), which skips finished runs, resumes",
              "# interrupted ones and never runs one twice, so resubmitting the array finishes the rest.",
              "set -euo pipefail",
              f"cd {shlex.quote(settings.cwd)}",
              'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
              f"exec {shlex.quote(sys.executable)} -m tools.sweep run-one {shlex.quote(root)} "
              f'--task-index "$SLURM_ARRAY_TASK_ID" --runs-per-task {runs_per_task}', ""]
    return "\n".join(lines)


def cmd_run(args) -> int:
    if args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    if args.runs_per_task < 1:
        raise UserError(f"--runs-per-task must be at least 1, got {args.runs_per_task}")
    if args.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be at least 1, got {args.cpus_per_task}")
    ids = run_ids(args.sweep)
    if not ids:
        raise UserError(f"{args.sweep}: no runs")
    settings = make_settings(args)
    write_json(os.path.join(args.sweep, RUNNER_JSON), asdict(settings))
    if args.retry_failed:
        for run_id in ids:
            for name in (FAILED, STATE):
                path = os.path.join(args.sweep, RUNS, run_id, name)
                if os.path.exists(path):
                    os.remove(path)
    if args.slurm:
        make_output_dir(os.path.join(args.sweep, "slurm"), "sweep")
        path = os.path.join(args.sweep, "sweep.sbatch")
        atomic_write(path, slurm_script(args.sweep, settings, len(ids), args.runs_per_task,
                                        args.cpus_per_task, args.sbatch_arg), fsync=True)
        print(f"wrote {path}: {-(-len(ids) // args.runs_per_task)} array tasks; submit with: sbatch {path}")
        return 0
    cores = len(os.sched_getaffinity(0))
    gpus = gpu_ids()
    print(f"[sweep] {len(ids)} proxies, {settings.expected_evals} evaluations each, --jobs {args.jobs}, "
          f"{max(1, cores // args.jobs)} threads per run" + (f", GPUs {','.join(gpus)}" if gpus else ""),
          file=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so the runner stops its workers (they stop their launchers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return LocalRunner(args.sweep, args.jobs, cores, gpus, settings).run()


def cmd_status(args) -> int:
    ids = run_ids(args.sweep)
    counts = {"done": 0, "failed": 0, "running": 0, "todo": 0}
    for run_id in ids:
        run_dir = os.path.join(args.sweep, RUNS, run_id)
        state = run_state(run_dir)
        if state == "todo":
            claim = claim_state(run_dir)
            if claim == "held":
                state = "running"
                info = read_json(os.path.join(run_dir, CLAIM)) or {}
                evals = len(trajectory_records(run_dir))
                print(f"running: {run_id} pid {info.get('pid')} on {info.get('host')}, {evals} evaluations so far")
            elif claim == "stale":
                info = read_json(os.path.join(run_dir, CLAIM)) or {}
                alive = "alive" if pid_alive(info.get("pid", 0)) else "dead"
                print(f"stale claim: {run_id} (pid {info.get('pid')} {alive}, lock free): will be reclaimed")
        elif state == "failed":
            info = read_json(os.path.join(run_dir, FAILED))
            print(f"failed: {run_id} ({info['reason']}, {info['attempts']} attempts) log {info['log']}")
        counts[state] += 1
    print(f"{args.sweep}: {len(ids)} proxies: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(disk_line(args.sweep, ids, counts["done"]))
    return 0


def disk_line(sweep: str, ids: list, done: int) -> str:
    """`disk: X MB (checkpoints Y MB; Z MB per finished proxy)`: what the sweep occupies now."""
    mb = 1 / 2 ** 20
    total = disk_usage(sweep)
    checkpoints = 0
    finished = 0
    for run_id in ids:
        run_dir = os.path.join(sweep, RUNS, run_id)
        size = sum(disk_usage(os.path.join(run_dir, name)) for name in os.listdir(run_dir)
                   if name.startswith("iter_"))
        checkpoints += size
        if run_state(run_dir) == "done":
            finished += disk_usage(run_dir)
    per_done = f"; {finished / done * mb:.2f} MB per finished proxy" if done else ""
    return f"disk: {total * mb:.1f} MB (checkpoints {checkpoints * mb:.1f} MB{per_done})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sample", help="write one sched.json per proxy (RegMix's sampler)")
    s.add_argument("sweep", help="sweep directory, e.g. sweep/demo")
    s.add_argument("--tokens", default="data/tok/tokens.json", help="token counts per domain (tools.preprocess)")
    s.add_argument("--n", type=int, default=32, help="number of proxies")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--domains", help="comma-separated subset of the domains in --tokens (default: all)")
    s.add_argument("--temperature", type=float, default=0.5, help="prior = token share ** temperature")
    s.add_argument("--max-usage", type=float, default=15.0, help="reject weight > min(share * this, 1)")
    s.add_argument("--min-weight", type=float, default=2e-4,
                   help="weights below become 0; the rest are rounded to multiples of it")
    s.add_argument("--sample-multiplier", type=int, default=100,
                   help="draw n * this, drop duplicates, pick n at random")
    s.add_argument("--stages", type=int, default=1, help="stages per proxy (needs --dynamic if > 1)")
    s.add_argument("--dynamic", action="store_true", help="random K-stage schedules instead of static mixtures")
    s.add_argument("--stage-correlation", type=float, default=0.0,
                   help="dynamic: stage k = c * stage k-1 + (1 - c) * fresh sample")
    s.set_defaults(func=cmd_sample)

    r = sub.add_parser("run", help="run every proxy (resumable), or write a Slurm array script",
                       description="Flags after `--` go to the launcher.")
    r.add_argument("sweep")
    r.add_argument("--config", help="launcher config, e.g. examples/proxy_1m.yaml")
    r.add_argument("--jobs", type=int, default=1, help="concurrent runs (threads per run = cores // jobs)")
    r.add_argument("--retries", type=int, default=1, help="re-attempts of a failing run before it is failed")
    r.add_argument("--retry-failed", action="store_true", help="give runs marked failed a new set of attempts")
    r.add_argument("--seed", type=int, default=1234, help="launcher --seed (the same for every proxy)")
    r.add_argument("--train-iters", type=int, help="default: the launcher config's")
    r.add_argument("--eval-interval", type=int, help="default: the launcher config's")
    r.add_argument("--save-interval", type=int, help="launcher checkpoint period (default: --eval-interval)")
    r.add_argument("--expected-evals", type=int, help="trajectory lines of a complete run (default: derived)")
    r.add_argument("--run-timeout", type=float, default=0.0, help="seconds before an attempt is killed (0: none)")
    r.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every checkpoint (default: only the latest while a proxy runs, none once done)")
    r.add_argument("--command", help="per-run command template (default: the launcher); fields: "
                                     "{python} {launcher} {config} {sched} {run_dir} {id} {seed} {train_iters} "
                                     "{eval_interval} {train} {load} {tokenizer} {extra}")
    r.add_argument("--slurm", action="store_true", help="write sweep.sbatch (a job array) instead of running")
    r.add_argument("--runs-per-task", type=int, default=1, help="--slurm: proxies per array task")
    r.add_argument("--cpus-per-task", type=int, default=2, help="--slurm: #SBATCH --cpus-per-task")
    r.add_argument("--sbatch-arg", action="append", default=[], help="--slurm: extra #SBATCH line, repeatable")
    r.set_defaults(func=cmd_run)

    o = sub.add_parser("run-one", help="the per-run command: run given proxies (or a Slurm task's chunk)")
    o.add_argument("sweep")
    o.add_argument("ids", nargs="*")
    o.add_argument("--task-index", type=int, help="run proxies [i*C, (i+1)*C) with C = --runs-per-task")
    o.add_argument("--runs-per-task", type=int, default=1)
    o.set_defaults(func=cmd_run_one)

    st = sub.add_parser("status", help="done / running / failed runs, with log paths")
    st.add_argument("sweep")
    st.set_defaults(func=cmd_status)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after the first `--` goes to the launcher verbatim (argparse cannot mix it with options)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if extra and args.cmd != "run":
        raise UserError(f"launcher flags after -- are only for `run`, not `{args.cmd}`")
    args.extra = extra
    return args.func(args)


if __name__ == "__main__":
    run_main(main)
