"""tools.sweep: RegMix's sampler, and the resumable runner driven by a fake per-run command."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fixtures import make_domains
from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule
from tools.mixture_sampler import MixtureSampler, SamplerConfig
from tools.sweep import RunSettings, free_port, run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# A stand-in for pretrain_regmixd.py with its file contracts: trajectory lines at every eval, a Megatron
# checkpoint tracker, resume via --load (trimming the trajectory). Its behaviour per run comes from a
# control file: fail the first N attempts, stop early with exit 0, hang, or run slowly.
FAKE = r'''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--save"); p.add_argument("--load"); p.add_argument("--control")
p.add_argument("--train-iters", type=int); p.add_argument("--eval-interval", type=int)
p.add_argument("--save-interval", type=int); p.add_argument("--keep-last-checkpoints", type=int)
a = p.parse_args()
ctl = json.load(open(a.control))
run = os.path.basename(a.save.rstrip("/"))
mode = ctl.get(run, {})

def event(kind, **kw):
    fd = os.open(ctl["events"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps(dict(run=run, kind=kind, pid=os.getpid(), **kw)) + "\n").encode())
    os.close(fd)

marker = os.path.join(a.save, "fake.running")
if os.path.exists(marker):
    other = int(open(marker).read())
    try:   # alive and not a zombie (a killed process nobody has reaped yet)
        if open(f"/proc/{other}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            event("DOUBLE", other=other)
    except FileNotFoundError:
        pass
open(marker, "w").write(str(os.getpid()))
tracker = os.path.join(a.save, "latest_checkpointed_iteration.txt")
start = int(open(tracker).read()) if a.load else 0
traj = os.path.join(a.save, "trajectory.jsonl")
if os.path.exists(traj):
    keep = [l for l in open(traj) if json.loads(l)["iteration"] <= start]
    open(traj, "w").writelines(keep)
attempt_file = os.path.join(a.save, "fake.attempts")
attempt = (int(open(attempt_file).read()) if os.path.exists(attempt_file) else 0) + 1
open(attempt_file, "w").write(str(attempt))
event("start", resume_from=start, attempt=attempt, threads=os.environ.get("OMP_NUM_THREADS"),
      gpu=os.environ.get("CUDA_VISIBLE_DEVICES"), load=a.load)
T, E = a.train_iters, a.eval_interval
if mode.get("hang") and attempt == 1:
    time.sleep(3600)
for it in range(start + 1, T + 1):
    time.sleep(mode.get("sleep", 0.01))
    if it % E == 0 or it == T:
        losses = {"web": 5.0 / it ** 0.2, "code": 4.0 / it ** 0.3}
        rec = dict(iteration=it, consumed_samples=it * 4, tokens=it * 256, progress=it / T, stage=0,
                   weights={"web": 0.5, "code": 0.5}, losses=losses, target=sum(losses.values()) / 2,
                   target_name="mean")
        fd = os.open(traj, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, (json.dumps(rec) + "\n").encode())
        os.close(fd)
        tmp = tracker + ".tmp"
        open(tmp, "w").write(str(it))
        os.replace(tmp, tracker)
        if attempt <= mode.get("fail", 0):
            print("fake failure", flush=True)
            sys.exit(1)
        if mode.get("short"):
            break
os.remove(marker)
event("end")
'''


# ------------------------------------------------------------------------------------------ sampler

def test_sampler_bounds_zeros_and_distinct():
    counts = [1000, 400, 100, 50, 30]
    cfg = SamplerConfig(n=60, seed=3, max_usage=4.0, min_weight=0.02, sample_multiplier=20)
    sampler = MixtureSampler(counts, cfg)
    mixtures = np.stack(sampler.sample())[:, 0, :]          # [n, domains], one stage
    shares = np.array(counts) / sum(counts)
    bounds = np.minimum(shares * 4.0, 1.0)
    assert mixtures.shape == (60, 5)
    np.testing.assert_allclose(mixtures.sum(axis=1), 1.0)
    assert (mixtures <= bounds + 1e-12).all()
    assert bounds[0] == 1.0 and bounds[-1] < 0.2              # the cap binds on the small domains
    assert ((mixtures > 0) & (mixtures < 0.02)).sum() == 0   # tiny weights were zeroed
    assert 0.05 < (mixtures == 0).mean() < 0.9
    grid = np.round(mixtures / 0.02)
    assert len(np.unique(grid, axis=0)) == 60                  # distinct on the min-weight grid


def test_sampler_deterministic_for_a_seed():
    counts = [5, 3, 2, 1]
    a = MixtureSampler(counts, SamplerConfig(n=10, seed=7)).sample()
    b = MixtureSampler(counts, SamplerConfig(n=10, seed=7)).sample()
    c = MixtureSampler(counts, SamplerConfig(n=10, seed=8)).sample()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_sampler_regmix_prior_leaves_many_domains_out():
    """RegMix's 17-domain Pile prior: RegMix's own synthesize_mixture.py procedure leaves ~63% of the
    weights of its 128 picks exactly 0 (re-run with seed 42); ours must land in the same region."""
    prior = [0.1133, 0.0796, 0.0039, 0.1854, 0.0511, 0.0160, 0.1018, 0.0037, 0.0665, 0.0018, 0.0271,
             0.2369, 0.0118, 0.0079, 0.0080, 0.0388, 0.0464]
    mixtures = np.stack(MixtureSampler(prior, SamplerConfig(n=64, seed=42)).sample())
    assert 0.5 < (mixtures == 0).mean() < 0.75


def test_dynamic_schedules_and_correlation():
    counts = [40, 30, 20, 10]
    cfg = SamplerConfig(n=50, seed=1, stages=4, dynamic=True, sample_multiplier=5)
    sampler = MixtureSampler(counts, cfg)
    indep = np.stack(sampler.sample())
    assert indep.shape == (50, 4, 4) and sampler.stage_starts() == [0.0, 0.25, 0.5, 0.75]
    np.testing.assert_allclose(indep.sum(-1), 1.0)
    corr = np.stack(MixtureSampler(counts, SamplerConfig(n=50, seed=1, stages=4, dynamic=True, sample_multiplier=5,
                                                         stage_correlation=0.8)).sample())
    step = lambda m: np.abs(np.diff(m, axis=1)).sum(-1).mean()
    assert step(corr) < 0.5 * step(indep)


@pytest.mark.parametrize("cfg, message", [
    (SamplerConfig(max_usage=0.9), "infeasible"),
    (SamplerConfig(stages=3), "needs --dynamic"),
    (SamplerConfig(n=0), "--n"),
    (SamplerConfig(n=50, min_weight=0.5, sample_multiplier=20), "distinct mixtures"),
])
def test_sampler_refuses_bad_settings(cfg, message):
    with pytest.raises(UserError, match=message):
        MixtureSampler([10, 20, 30], cfg).sample()


def sweep_cli(*args, check=True, **kw):
    out = subprocess.run([PY, "-m", "tools.sweep", *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, **kw)
    if check and out.returncode != 0:
        raise AssertionError(out.stdout + out.stderr)
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_domains(str(root), domains=("web", "code", "books"), n_docs=30, valid_docs=5)
    return str(root / "tokens.json")


def test_sample_cli_writes_valid_schedules(tmp_path, tok):
    sweep = tmp_path / "s"
    out = sweep_cli("sample", sweep, "--tokens", tok, "--n", 5, "--stages", 2, "--dynamic")
    assert "share of zero weights" in out.stdout
    runs = sorted(os.listdir(sweep / "runs"))
    assert runs == [f"p{i:04d}" for i in range(5)]
    sched = MixtureSchedule.load(str(sweep / "runs/p0003/sched.json"))
    sched.validate(check_files=True)
    assert [s.start for s in sched.stages] == [0.0, 0.5]
    assert sched.domains == ["books", "code", "web"] and len(sched.valid[1]) == 3
    assert abs(sum(sched.weights_dict(1).values()) - 1) < 1e-9
    again = sweep_cli("sample", sweep, "--tokens", tok, "--n", 5, "--stages", 2, "--dynamic")
    assert "already sampled" in again.stdout
    other = sweep_cli("sample", sweep, "--tokens", tok, "--n", 6, check=False)
    assert other.returncode == 2 and other.stderr.startswith("error: ") and "other settings" in other.stderr
    bad = sweep_cli("sample", tmp_path / "t", "--tokens", tok, "--domains", "web,nope", check=False)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------ runner

@pytest.fixture
def fake(tmp_path, tok):
    """A sampled 6-proxy sweep, the fake per-run command, and its control file."""
    sweep = tmp_path / "sweep"
    sweep_cli("sample", sweep, "--tokens", tok, "--n", 6)
    script = tmp_path / "fake_proxy.py"
    script.write_text(FAKE)
    control = tmp_path / "control.json"

    def setup(**modes):
        control.write_text(json.dumps(dict(events=str(tmp_path / "events.jsonl"), **modes)))
    setup()
    command = f"{{python}} {script} --save {{run_dir}} {{load}} {{train}} {{extra}}"

    def events():
        path = tmp_path / "events.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

    return sweep, command, setup, events


def run_args(sweep, command, *extra, iters=8, interval=2):
    """`run` with the fake command; its control file travels as a launcher flag after `--`."""
    return ["run", sweep, "--command", command, "--train-iters", iters, "--eval-interval", interval, *extra,
            "--", "--control", sweep.parent / "control.json"]


def test_runner_runs_all_then_skips_finished(fake):
    """Thread split, GPU round robin, a stale claim (dead pid) reclaimed, finished runs never rerun."""
    sweep, command, setup, events = fake
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    (sweep / "runs/p0004/claim").write_text(json.dumps({"pid": dead.pid, "host": "h", "since": 0}))
    assert "stale claim: p0004" in sweep_cli("status", sweep).stdout
    out = sweep_cli(*run_args(sweep, command, "--jobs", 2), env=dict(os.environ, CUDA_VISIBLE_DEVICES="3,5"))
    assert "done 6/6" in out.stderr and "proxies/h" in out.stderr
    for i in range(6):
        run = sweep / "runs" / f"p{i:04d}"
        lines = [json.loads(l) for l in (run / "trajectory.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in lines] == [2, 4, 6, 8]
        assert json.loads((run / "done").read_text())["evals"] == 4
        assert not (run / "claim").exists()
    starts = [e for e in events() if e["kind"] == "start"]
    assert len(starts) == 6
    cores = len(os.sched_getaffinity(0))
    assert {e["threads"] for e in starts} == {str(max(1, cores // 2))}
    assert {e["gpu"] for e in starts} == {"3", "5"}
    sweep_cli(*run_args(sweep, command, "--jobs", 2))
    assert len([e for e in events() if e["kind"] == "start"]) == 6     # nothing ran again
    assert "done 6" in sweep_cli("status", sweep).stdout
    tracker = sweep / "runs/p0002/latest_checkpointed_iteration.txt"
    assert not tracker.exists()                                        # done runs keep no checkpoint
    # killed after the launcher finished (its final checkpoint is there) but before `done` was written:
    # marked, not run again, and its checkpoint removed then
    (sweep / "runs/p0002/done").unlink()
    tracker.write_text("8")
    sweep_cli(*run_args(sweep, command, "--jobs", 2))
    assert len([e for e in events() if e["kind"] == "start"]) == 6
    assert (sweep / "runs/p0002/done").exists() and not tracker.exists()


def test_runner_retries_and_reports_failures(fake):
    sweep, command, setup, events = fake
    setup(p0001={"fail": 1}, p0002={"fail": 99}, p0003={"short": True}, p0004={"hang": True})
    out = sweep_cli(*run_args(sweep, command, "--jobs", 2, "--retries", 1, "--run-timeout", 8), check=False)
    assert out.returncode == 1
    runs = sweep / "runs"
    assert json.loads((runs / "p0001/done").read_text())["attempts"] == 2
    resumed = [e for e in events() if e["run"] == "p0001" and e["kind"] == "start"]
    assert [e["resume_from"] for e in resumed] == [0, 2]           # the retry resumed from its checkpoint
    failed = json.loads((runs / "p0002/failed").read_text())
    assert failed["attempts"] == 2 and failed["reason"] == "exit code 1"
    assert failed["log"] == str(runs / "p0002/log.txt") and "fake failure" in open(failed["log"]).read()
    assert json.loads((runs / "p0004/state.json").read_text())["last_error"] == "timed out after 8 s"
    assert (runs / "p0004/done").exists()                          # the hung attempt was killed, then retried
    short = json.loads((runs / "p0003/failed").read_text())
    assert short["reason"] == "exit code 0 but 2 of 4 trajectory lines"
    assert f"failed: p0002 (exit code 1, 2 attempts) log {failed['log']}" in out.stdout
    status = sweep_cli("status", sweep).stdout
    assert "done 4, failed 2" in status and "p0003" in status
    setup()                                                        # fixed: a rerun retries only on request
    assert sweep_cli(*run_args(sweep, command), check=False).returncode == 1
    sweep_cli(*run_args(sweep, command, "--retry-failed"))
    assert all((runs / f"p{i:04d}/done").exists() for i in range(6))


def wait_for(cond, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


@pytest.mark.parametrize("kill_children", [True, False])
def test_sigkill_and_restart_finishes_every_run_exactly_once(fake, kill_children):
    """SIGKILL the runner (with its process group, or alone leaving orphans) mid-sweep, restart it:
    every run finishes once, interrupted ones resume from their checkpoints, none runs twice at once."""
    sweep, command, setup, events = fake
    setup(**{f"p{i:04d}": {"sleep": 0.06} for i in range(6)})
    argv = [PY, "-m", "tools.sweep", *map(str, run_args(sweep, command, "--jobs", 2, iters=12, interval=3))]
    runner = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stderr=subprocess.DEVNULL)
    runs = sweep / "runs"
    def partial():   # a run well inside its 12 iterations (a finished but unmarked one is not partial)
        trackers = [p / "latest_checkpointed_iteration.txt" for p in runs.iterdir()]
        return [t for t in trackers if t.exists() and int(t.read_text() or 99) < 9]
    wait_for(lambda: (runs / "p0000/done").exists() and partial())
    if kill_children:
        os.killpg(runner.pid, signal.SIGKILL)
    else:
        os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    out = sweep_cli(*run_args(sweep, command, "--jobs", 2, iters=12, interval=3))
    assert "done 6/6" in out.stderr
    ev = events()
    assert not [e for e in ev if e["kind"] == "DOUBLE"]
    for i in range(6):
        run = f"p{i:04d}"
        assert len([e for e in ev if e["run"] == run and e["kind"] == "end"]) == 1, run
        lines = [json.loads(l) for l in (runs / run / "trajectory.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in lines] == [3, 6, 9, 12]
    if kill_children:
        assert [e for e in ev if e["kind"] == "start" and e["resume_from"] > 0]


def test_a_killed_worker_is_replaced(fake):
    """SIGKILL one sweep worker mid-run: the runner starts another, and every run still ends exactly once
    (the killed worker's launcher child keeps the run's lock until it ends; then the run is marked done)."""
    sweep, command, setup, events = fake
    setup(**{f"p{i:04d}": {"sleep": 0.06} for i in range(6)})
    argv = [PY, "-m", "tools.sweep", *map(str, run_args(sweep, command, "--jobs", 2, iters=12, interval=3))]
    runner = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    claim = sweep / "runs/p0001/claim"
    wait_for(lambda: claim.exists() and [e for e in events() if e["run"] == "p0001"])
    worker = json.loads(claim.read_text())["pid"]
    os.kill(worker, signal.SIGKILL)
    _, err = runner.communicate(timeout=120)
    assert runner.returncode == 0 and "done 6/6" in err, err
    ev = events()
    assert not [e for e in ev if e["kind"] == "DOUBLE"]
    assert all(len([e for e in ev if e["run"] == f"p{i:04d}" and e["kind"] == "end"]) == 1 for i in range(6))


def test_slurm_array_calls_the_per_run_command(fake):
    sweep, command, setup, events = fake
    out = sweep_cli(*run_args(sweep, command, "--slurm", "--runs-per-task", 4, "--sbatch-arg=--partition=cpu"))
    script = (sweep / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --partition=cpu" in script
    assert "run-one" in script and "sbatch" in out.stdout
    assert not events()                                               # nothing ran locally
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_CPUS_PER_TASK="1")
    subprocess.run(["bash", str(sweep / "sweep.sbatch")], env=env, check=True, capture_output=True)
    done = sorted(p.name for p in (sweep / "runs").iterdir() if (p / "done").exists())
    assert done == ["p0004", "p0005"]                                 # task 1 = proxies 4..7 of 6


def test_run_refuses_bad_input(fake, tmp_path):
    sweep, command, setup, events = fake
    out = sweep_cli("run", tmp_path / "nope", "--command", command, check=False)
    assert out.returncode == 2 and "not a sampled sweep" in out.stderr
    out = sweep_cli("run", sweep, "--command", command, check=False)
    assert out.returncode == 2 and "--train-iters" in out.stderr
    out = sweep_cli(*run_args(sweep, "{python} {nope}"), check=False)
    assert out.returncode == 2 and "bad template" in out.stderr


# ------------------------------------------------------------------------------------------ real launcher

TINY_PROXY = """\
num-layers: 1
hidden-size: 32
num-attention-heads: 2
ffn-hidden-size: 64
seq-length: 32
micro-batch-size: 4
global-batch-size: 4
lr: 0.001
lr-decay-style: constant
lr-warmup-iters: 2
train-iters: 6
eval-interval: 3
eval-iters: 1
log-interval: 100
"""


def test_two_real_proxies_through_the_launcher(tmp_path, tok):
    """sample → run → collect on the fixture corpus: one sweep worker trains both proxies in one process,
    and the second equals the same launcher command in a fresh process (megatron-core state torn down)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_PROXY)
    sweep = tmp_path / "real"
    sweep_cli("sample", sweep, "--tokens", tok, "--n", 2)
    out = sweep_cli("run", sweep, "--config", config, "--jobs", 1, "--retries", 0)
    assert "done 2/2" in out.stderr, out.stderr
    for run in ("p0000", "p0001"):
        sched = MixtureSchedule.load(str(sweep / "runs" / run / "sched.json"))
        lines = [json.loads(l) for l in (sweep / "runs" / run / "trajectory.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in lines] == [3, 6]
        assert set(lines[-1]["losses"]) == {"books", "code", "web"}
        for domain, w in sched.weights_dict(0).items():
            assert abs(lines[-1]["weights"].get(domain, 0.0) - w) < 1e-6
        # a finished proxy keeps its trajectory, not its checkpoints (the launcher kept only the latest)
        assert not [p for p in os.listdir(sweep / "runs" / run) if p.startswith("iter_")]
        assert not (sweep / "runs" / run / "latest_checkpointed_iteration.txt").exists()
    first, second = (json.loads((sweep / "runs" / r / "done").read_text()) for r in ("p0000", "p0001"))
    assert first["worker_start_s"] > 0 and "worker_start_s" not in second      # one import for both
    assert second["phases_s"]["train"] > 0 and second["phases_s"]["eval"] > 0
    # the second proxy once more, alone in a fresh launcher process with the same threads
    settings = RunSettings.load(str(sweep))
    fresh = tmp_path / "fresh" / "p0001"
    fresh.mkdir(parents=True)
    shutil.copy(sweep / "runs/p0001/sched.json", fresh / "sched.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(len(os.sched_getaffinity(0))), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    subprocess.run(run_command(settings, str(fresh)), cwd=settings.cwd, env=env, check=True, capture_output=True)
    for name in ("trajectory.jsonl", "train_log.jsonl"):
        ours, alone = ([json.loads(l) for l in (d / name).read_text().splitlines()]
                       for d in (sweep / "runs/p0001", fresh))
        assert [r["iteration"] for r in ours] == [r["iteration"] for r in alone] and ours
        for a, b in zip(ours, alone):
            for key in ("losses", "domain_loss"):
                assert a.get(key, {}).keys() == b.get(key, {}).keys()
                assert all(abs(a[key][d] - b[key][d]) < 1e-6 for d in a.get(key, {}))
            assert abs(a.get("loss", a.get("target")) - b.get("loss", b.get("target"))) < 1e-6
    status = sweep_cli("status", sweep).stdout
    assert "done 2" in status and "checkpoints 0.0 MB" in status and "MB per finished proxy" in status, status
    out = subprocess.run([PY, "-m", "tools.collect", str(sweep)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.startswith("collected 2 of 2 runs"), out.stdout
    rows = (sweep / "trajectories.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 3                              # header + runs x evals x domains
