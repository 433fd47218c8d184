"""Bad input gets one line and nothing is lost: flags, files, token data, checkpoints, sweeps, ownership.

Most cases call the entry point in-process (`tools.cli.run_main`) and assert exit 2, exactly one
`error: ...` line and no traceback; a few run the real launcher to show the checks come before training.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fixtures import make_domains, write_token_dataset
from megatron_ext import checkpoint_files
from megatron_ext.arguments import parse_args
from megatron_ext.checkpointing import STATE
from megatron_ext.errors import UserError
from megatron_ext.preflight import check_outputs, check_resume, check_target_domain, check_token_file
from megatron_ext.schedule import MixtureSchedule
from tools.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LAUNCHER = os.path.join(ROOT, "pretrain_regmixd.py")
LATIN1 = "caf\xe9".encode("latin-1")          # a byte sequence that is not UTF-8
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", "512", "--eval-iters", "1", "--log-interval", "1"]


def one_line_error(main, argv, capsys) -> str:
    """Run `main(argv)` as a CLI: it must exit 2 with one `error:` line and no traceback; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def assert_one_line(proc: subprocess.CompletedProcess) -> str:
    """A subprocess that exited 2 with exactly one `error:` line on stderr (warnings aside), no traceback."""
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    data = make_domains(str(root / "tok"), n_docs=40, valid_docs=6)
    sched = root / "sched.json"
    sched.write_text(json.dumps({"version": 1, "unit": "fraction", "stages": [
        {"start": 0.0, "train": [0.5, data["web"]["train"], 0.5, data["code"]["train"]]}]}))
    return root, data, str(sched)


def launcher_args(sched, *extra):
    return TINY + ["--train-iters", "4", "--eval-interval", "2", "--data-schedule", sched, *map(str, extra)]


# ------------------------------------------------------------------------------------------ launcher flags

@pytest.mark.parametrize("flags, message", [
    (["--train-iters", "0"], "--train-iters must be positive"),
    (["--train-iters", "-3"], "--train-iters must be positive"),
    (["--eval-iters", "0"], "--eval-iters must be positive"),
    (["--save-interval", "0"], "--save-interval must be positive"),
    (["--keep-last-checkpoints", "-1"], "--keep-last-checkpoints must be >= 0"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--load", "/nonexistent/ckpt"], "no such directory"),
])
def test_launcher_flags_are_refused_in_one_line(corpus, capsys, flags, message):
    _, _, sched = corpus
    argv = launcher_args(sched)
    if flags[0] == "--train-iters":
        i = argv.index("--train-iters")
        del argv[i:i + 2]
    err = one_line_error(parse_args, argv + flags, capsys)
    assert message in err


def test_config_files_unbalanced_quote_and_non_utf8(corpus, tmp_path, capsys):
    _, _, sched = corpus
    args_file = tmp_path / "run.args"
    args_file.write_text('--lr "3e-3\n')
    assert "not a valid args file (No closing quotation)" in one_line_error(
        parse_args, launcher_args(sched, "--config", args_file), capsys)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_bytes(b"lr: 0.001\n# " + LATIN1 + b"\n")
    assert "is not UTF-8" in one_line_error(parse_args, launcher_args(sched, "--config", yaml_file), capsys)


def test_first_run_with_load_equal_to_save_starts_fresh(corpus, tmp_path):
    _, _, sched = corpus
    save = str(tmp_path / "runs" / "target")
    args = parse_args(launcher_args(sched, "--save", save, "--load", save))
    assert args.load == save and not os.path.exists(save)
    check_resume(args.load, {})                                        # nothing to resume: no error


def test_output_paths_that_are_files_or_read_only(corpus, tmp_path):
    _, _, sched = corpus
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--save", a_file], "is a file"), (["--save", a_file / "sub"], "is a file"),
             (["--tensorboard-dir", a_file / "tb"], "is a file"), (["--data-cache-path", a_file], "is a file"),
             (["--trajectory-file", tmp_path], "is a directory")]
    for flags, message in cases:
        with pytest.raises(UserError, match=message):
            check_outputs(parse_args(launcher_args(sched, *flags)))
    if os.geteuid() != 0:                                              # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="not writable"):
            check_outputs(parse_args(launcher_args(sched, "--save", locked / "run")))


def test_tool_output_paths_under_a_file(corpus, tmp_path, capsys):
    from tools import fit
    from tools import sweep as sweep_cli
    root, _, _ = corpus
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    assert "sweep " + str(a_file / "s") in one_line_error(
        sweep_cli.main, ["sample", a_file / "s", "--tokens", root / "tok" / "tokens.json", "--n", "2"], capsys)
    regmix = os.path.join(ROOT, "tests", "data", "regmix")
    assert "--out " + str(a_file) + ": cannot create it (exists and is not a directory)" in one_line_error(
        fit.main, ["--mixtures", os.path.join(regmix, "train_mixture_1m.csv"), "--losses",
                   os.path.join(regmix, "train_pile_loss_1m.csv"), "--target", "metric/the_pile_pile_cc_val_loss",
                   "--out", a_file], capsys)
    assert a_file.read_text() == "keep"


def test_target_domain_must_be_a_validation_domain(corpus):
    _, _, sched = corpus
    schedule = MixtureSchedule.load(sched)
    check_target_domain("web", schedule)
    with pytest.raises(UserError, match=r"--target-domain 'nosuch' is not one of the validation domains"):
        check_target_domain("nosuch", schedule)


# ------------------------------------------------------------------------------------------ readers

def test_non_utf8_files_in_every_reader(tmp_path, capsys):
    from tools import schedule as schedule_cli
    from tools import sweep as sweep_cli
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"version": 1, "unit": "' + LATIN1 + b'"}')
    assert "schedule is not UTF-8 text (byte 0xe9" in one_line_error(
        schedule_cli.main, ["validate", bad], capsys)
    for reader in (MixtureSchedule.from_data_args_path, MixtureSchedule.from_per_split_data_args_path):
        with pytest.raises(UserError, match="is not UTF-8"):
            reader(str(bad))
    sweep = tmp_path / "sweep"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "sweep.json").write_bytes(LATIN1)
    assert "is not UTF-8" in one_line_error(sweep_cli.main, ["status", sweep], capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "trajectory.jsonl").write_bytes(b'{"iteration": 1}\n' + LATIN1 + b"\n")
    with pytest.raises(UserError, match="trajectory is not UTF-8"):
        sweep_cli.trajectory_records(str(run))
    (run / checkpoint_files.TRACKER).write_bytes(LATIN1)
    with pytest.raises(UserError, match="checkpoint tracker is not UTF-8"):
        checkpoint_files.latest_iteration(str(run))
    from tools import fit
    csv_file = tmp_path / "mixtures.csv"
    csv_file.write_bytes(b"index,web\n0," + LATIN1 + b"\n")
    assert "CSV file is not UTF-8" in one_line_error(
        fit.main, ["--mixtures", csv_file, "--losses", csv_file, "--target", "web", "--out", tmp_path / "s"], capsys)


# ------------------------------------------------------------------------------------------ token data

@pytest.fixture
def token_file(tmp_path):
    """A 2-document token file (ids < 100, EOD 100) in a fresh folder: damage it at will."""
    return write_token_dataset(str(tmp_path / "tok" / "d_train_text_document"), [[1, 2, 3], [4, 99]], 100)


def test_token_file_matching_its_index_passes(token_file):
    check_token_file(token_file, 101)


def test_token_ids_outside_the_vocabulary(token_file):
    with pytest.raises(UserError, match=r"token id 100 is outside the tokenizer's vocabulary \[0, 100\)"):
        check_token_file(token_file, 100)


def _rewrite(path, edit):
    data = bytearray(open(path, "rb").read())
    data = edit(data)
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _rewrite(p + ".bin", lambda d: d[:-2]), r"\.bin: .* truncated"),
    (lambda p: _rewrite(p + ".bin", lambda d: d + d), r"\.bin: .* another dtype or index"),
    (lambda p: _rewrite(p + ".idx", lambda d: d[:-5]), r"\.idx: truncated"),
    (lambda p: _rewrite(p + ".idx", lambda d: d[:20]), r"\.idx: truncated .* shorter than the index header"),
    (lambda p: _rewrite(p + ".idx", lambda d: b"NOTMEGA!!" + d[9:]), "not a Megatron index file"),
    (lambda p: _rewrite(p + ".idx", lambda d: d[:17] + bytes([4]) + d[18:]), r"\.bin: .*int32"),   # dtype changed
    (lambda p: _rewrite(p + ".idx", lambda d: d[:17] + bytes([42]) + d[18:]), "unknown token dtype code 42"),
    (lambda p: _rewrite(p + ".idx", lambda d: d[:17] + bytes([7]) + d[18:]), "not an integer type"),
])
def test_damaged_token_files_are_refused(token_file, damage, message):
    damage(token_file)
    with pytest.raises(UserError, match=message) as info:
        check_token_file(token_file, 101)
    assert "\n" not in str(info.value)


def test_large_token_files_are_sampled(tmp_path, monkeypatch):
    import megatron_ext.preflight as preflight
    monkeypatch.setattr(preflight, "FULL_SCAN_TOKENS", 64)
    monkeypatch.setattr(preflight, "SAMPLE_TOKENS", 16)
    prefix = write_token_dataset(str(tmp_path / "big_train_text_document"), [list(range(50))] * 20, 100)
    check_token_file(prefix, 101)                                      # sampled windows, all in range
    data = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")          # optimal dtype for 101 ids
    data[-1] = 250                                                     # the last window is always sampled
    data.flush()
    with pytest.raises(UserError, match="token id 250"):
        check_token_file(prefix, 101)


# ------------------------------------------------------------------------------------------ checkpoints

def _fake_checkpoint(root, iteration=4, shape=None, metadata=True):
    path = checkpoint_files.checkpoint_dir(str(root), iteration)
    os.makedirs(path)
    torch.save({"iteration": iteration, "model_shape": shape or {}}, os.path.join(path, STATE))
    if metadata:
        open(os.path.join(path, ".metadata"), "wb").close()
    (root / checkpoint_files.TRACKER).write_text(f"{iteration}\n")
    return path


SHAPE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 4,
         "ffn_hidden_size": 256, "padded_vocab_size": 640}


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, shape=SHAPE)
    check_resume(str(tmp_path), SHAPE)
    with pytest.raises(UserError, match=r"checkpoint of another model \(--hidden-size 64 in the checkpoint, "
                                         r"32 now\)"):
        check_resume(str(tmp_path), dict(SHAPE, hidden_size=32))


@pytest.mark.parametrize("damage, message", [
    (lambda root, path: open(os.path.join(path, STATE), "wb").write(b"\x80\x02garbage"), "damaged: .* unreadable"),
    (lambda root, path: os.remove(os.path.join(path, STATE)), "incomplete: no regmixd_state.pt"),
    (lambda root, path: os.remove(os.path.join(path, ".metadata")), "damaged .*no dist_checkpointing"),
    (lambda root, path: shutil.rmtree(path), "tracker names iteration 4 but .* is missing"),
    (lambda root, path: (root / checkpoint_files.TRACKER).write_text("four"), "expected an iteration number"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    damage(tmp_path, _fake_checkpoint(tmp_path, shape=SHAPE))
    with pytest.raises(UserError, match=message):
        check_resume(str(tmp_path), SHAPE)


def test_pruning_keeps_the_latest_and_drops_stale_saves(tmp_path):
    for it in (2, 4, 6):
        os.makedirs(checkpoint_files.checkpoint_dir(str(tmp_path), it))
    os.makedirs(str(tmp_path / "iter_0000003.tmp"))                    # a killed save of another iteration
    (tmp_path / checkpoint_files.TRACKER).write_text("6\n")
    checkpoint_files.remove_stale_saves(str(tmp_path))
    assert not (tmp_path / "iter_0000003.tmp").exists()
    checkpoint_files.prune_checkpoints(str(tmp_path), 0)               # 0 keeps everything
    assert checkpoint_files.checkpoint_iterations(str(tmp_path)) == [2, 4, 6]
    checkpoint_files.prune_checkpoints(str(tmp_path), 2)
    assert checkpoint_files.checkpoint_iterations(str(tmp_path)) == [4, 6]
    checkpoint_files.prune_checkpoints(str(tmp_path), 1)
    assert checkpoint_files.checkpoint_iterations(str(tmp_path)) == [6]
    (tmp_path / "trajectory.jsonl").write_text("{}\n")
    checkpoint_files.remove_checkpoints(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["trajectory.jsonl"]       # the result stays


# ------------------------------------------------------------------------------------------ sweeps

@pytest.fixture(scope="module")
def sampled_sweep(tmp_path_factory):
    from tools import sweep as sweep_cli
    root = tmp_path_factory.mktemp("sweep")
    make_domains(str(root / "tok"), n_docs=10, valid_docs=3)
    with pytest.raises(SystemExit):
        run_main(sweep_cli.main, ["sample", str(root / "s"), "--tokens", str(root / "tok" / "tokens.json"),
                                  "--n", "3"])
    return root / "s"


@pytest.mark.parametrize("argv, message", [
    (["run", "{s}", "--slurm", "--runs-per-task", "0", "--command", "x", "--train-iters", "2",
      "--eval-interval", "1"], "--runs-per-task must be at least 1"),
    (["run", "{s}", "--slurm", "--cpus-per-task", "0", "--command", "x", "--train-iters", "2",
      "--eval-interval", "1"], "--cpus-per-task must be at least 1"),
    (["run", "{s}", "--command", "x", "--train-iters", "-2", "--eval-interval", "1"],
     "--train-iters must be positive"),
    (["run", "{s}", "--command", "x", "--train-iters", "2", "--eval-interval", "1", "--run-timeout", "-1"],
     "--run-timeout must be >= 0"),
])
def test_sweep_run_flags(sampled_sweep, capsys, argv, message):
    from tools import sweep as sweep_cli
    argv = [a.replace("{s}", str(sampled_sweep)) for a in argv]
    assert message in one_line_error(sweep_cli.main, argv, capsys)


def test_sweep_run_checks_launcher_flags_once_before_any_run(sampled_sweep, tmp_path, capsys):
    from tools import sweep as sweep_cli
    config = tmp_path / "proxy.yaml"
    config.write_text("num-layers: 1\nhidden-size: 32\nnum-attention-heads: 2\nseq-length: 32\n"
                      "micro-batch-size: 4\nglobal-batch-size: 4\nlr: 0.001\ntrain-iters: 4\neval-interval: 2\n")
    run = ["run", sampled_sweep, "--config", config]
    for extra, message in ((["--", "--target-domain", "nosuch"], "--target-domain 'nosuch' is not one of"),
                           (["--", "--eval-iters", "0"], "--eval-iters must be positive"),
                           (["--", "--train-iters", "-4"], "--train-iters must be positive"),
                           (["--train-iters", "0"], "--train-iters must be positive")):
        assert message in one_line_error(sweep_cli.main, run + extra, capsys)
    assert not list(sampled_sweep.glob("runs/*/log.txt"))              # no proxy was started


def test_run_one_refuses_ids_outside_the_sweep(sampled_sweep, tmp_path, capsys):
    from tools import sweep as sweep_cli
    with pytest.raises(SystemExit):          # writes runner.json for run-one
        run_main(sweep_cli.main, ["run", str(sampled_sweep), "--slurm", "--command", "true", "--train-iters",
                                  "2", "--eval-interval", "1"])
    elsewhere = tmp_path / "elsewhere" / "x"
    elsewhere.mkdir(parents=True)
    (elsewhere / "sched.json").write_text("{}")
    for run_id in ("../../elsewhere/x", os.path.relpath(elsewhere, sampled_sweep / "runs"), "p9999", ".."):
        assert "is not a run of" in one_line_error(sweep_cli.main, ["run-one", sampled_sweep, run_id], capsys)
    assert not os.path.exists(elsewhere / "claim") and not os.path.exists(elsewhere / "log.txt")
    for argv in (["--task-index", "-1"], ["--task-index", "0", "--runs-per-task", "0"]):
        one_line_error(sweep_cli.main, ["run-one", sampled_sweep, *argv], capsys)


# ------------------------------------------------------------------------------------------ the real launcher

def launch(args, **kw):
    return subprocess.run([PY, LAUNCHER, *map(str, args)], env=env(), capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.slow
def test_launcher_keeps_only_the_latest_checkpoint_and_refuses_another_model(corpus, tmp_path):
    """A stale `.tmp` save is removed by a save of another iteration and only the latest checkpoint
    stays; then a checkpoint of another model is refused in one line before any training step."""
    _, _, sched = corpus
    save = tmp_path / "target"
    os.makedirs(save / "iter_0000009.tmp")                              # a save killed in an earlier run
    r = launch(launcher_args(sched, "--save", save, "--load", save, "--save-interval", 1,
                             "--keep-last-checkpoints", 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_files.checkpoint_iterations(str(save)) == [4]
    assert not (save / "iter_0000009.tmp").exists()
    log = (save / "train_log.jsonl").read_text()

    r = launch(launcher_args(sched, "--save", save, "--load", save, "--hidden-size", 32))
    assert "checkpoint of another model (--hidden-size 64 in the checkpoint, 32 now)" in assert_one_line(r)
    assert (save / "train_log.jsonl").read_text() == log                # nothing trained, nothing lost
    assert checkpoint_files.checkpoint_iterations(str(save)) == [4]

    for shard in (save / "iter_0000004").glob("*.distcp"):             # damaged shards: only loading sees it
        shard.write_bytes(shard.read_bytes()[:100])
    r = launch(launcher_args(sched, "--save", save, "--load", save))
    assert "cannot load checkpoint" in assert_one_line(r)
    assert (save / "train_log.jsonl").read_text() == log


def _children(pid: int) -> list:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _descendants(pid: int) -> list:
    out = []
    for child in _children(pid):
        out += [child] + _descendants(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_save_dir_is_owned_and_helpers_die_with_the_launcher(corpus, tmp_path):
    """torchrun → launcher → megatron-core's write-results manager and a DataLoader worker. A second
    launcher on the same --save is refused in one line; SIGKILL of torchrun's process group takes the
    worker and its helpers along, and the lock is free again."""
    _, _, sched = corpus
    save = tmp_path / "owned"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port", str(port), LAUNCHER,
           *launcher_args(sched, "--save", save, "--train-iters", 100000, "--eval-interval", 100000,
                          "--save-interval", 1, "--num-workers", 1)]  # a DataLoader worker too
    torchrun = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    worker = manager = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and manager is None:
            time.sleep(1)
            assert torchrun.poll() is None, "torchrun ended early"
            workers = [c for c in _children(torchrun.pid) if "pretrain_regmixd" in open(f"/proc/{c}/cmdline").read()]
            if workers:
                worker = workers[0]
                spawned = [c for c in _children(worker) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
                manager = spawned[0] if spawned else None
        assert manager is not None, "the launcher never started its write-results manager (first save)"
        assert f"pid {worker}" in (save / ".regmixd_save.lock").read_text()

        r = launch(launcher_args(sched, "--save", save))
        assert "in use by another launcher (pid" in assert_one_line(r)

        tree = [worker] + _descendants(worker)                             # manager, forked writers, tracker
        os.killpg(torchrun.pid, signal.SIGKILL)                            # the worker is in its own session
        torchrun.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(map(_alive, tree)):
            time.sleep(0.5)
        assert not [pid for pid in tree if _alive(pid)], "helpers outlived the launcher"
        for _ in range(10):                                                # the lock died with its holder
            probe = subprocess.run([PY, "-c", "import sys; from megatron_ext.ownership import hold_save_dir; "
                                              "from tools.cli import run_main; run_main(lambda a: hold_save_dir(a[0]), "
                                              "sys.argv[1:])", str(save)], env=env(), cwd=ROOT,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(3)
        assert probe.returncode == 0, probe.stderr
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
            torchrun.wait()
        for pid in ([worker] + _descendants(worker) if worker else []):  # only if the test failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
