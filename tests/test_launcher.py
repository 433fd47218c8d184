"""pretrain_regmixd.py on CPU, one process: training on a 2-stage schedule, exact resume after SIGKILL,
--override-data-schedule, and one-line errors for bad input."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fixtures import make_domains

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LAUNCHER = os.path.join(ROOT, "pretrain_regmixd.py")
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "2",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
        "--eval-iters", "2", "--log-interval", "1", "--seed", "7"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e["MASTER_PORT"] = str(free_port())
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_schedule(path, data, second_stage=(0.1, 0.2, 0.7)):
    stages = [{"start": 0.0, "train": [0.7, data["web"]["train"], 0.3, data["code"]["train"],
                                       0.0, data["books"]["train"]]},
              {"start": 0.5, "train": [second_stage[0], data["web"]["train"], second_stage[1],
                                       data["code"]["train"], second_stage[2], data["books"]["train"]]}]
    with open(path, "w") as f:
        json.dump({"version": 1, "unit": "fraction", "stages": stages}, f)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    data = make_domains(str(root / "tok"), n_docs=120, valid_docs=12)
    return root, data, write_schedule(str(root / "sched.json"), data)


def launch(args, timeout=300, nproc=1):
    cmd = [PY, LAUNCHER] if nproc == 1 else [
        PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port", str(free_port()),
        LAUNCHER]
    return subprocess.run(cmd + args, env=env(), capture_output=True, text=True, timeout=timeout)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(save_dir):
    return [r["loss"] for r in read_jsonl(os.path.join(save_dir, "train_log.jsonl"))]


def test_two_stage_schedule_trains_and_writes_trajectory(corpus):
    root, data, sched = corpus
    save = str(root / "single")
    r = launch(TINY + ["--train-iters", "30", "--data-schedule", sched, "--save", save, "--eval-interval", "10",
                       "--lr-decay-style", "constant"])
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_jsonl(os.path.join(save, "train_log.jsonl"))
    assert [x["iteration"] for x in log] == list(range(1, 31))
    assert [x["consumed_samples"] for x in log] == [8 * i for i in range(1, 31)]
    assert [x["stage"] for x in log] == [0] * 15 + [1] * 15
    assert np.mean([x["loss"] for x in log[:3]]) > np.mean([x["loss"] for x in log[12:15]]) + 0.5
    traj = read_jsonl(os.path.join(save, "trajectory.jsonl"))
    assert [t["iteration"] for t in traj] == [10, 20, 30]
    for t in traj:
        assert set(t) == {"iteration", "consumed_samples", "tokens", "progress", "stage", "weights", "losses",
                          "target", "target_name"}
        assert set(t["losses"]) == {"web", "code", "books"} == set(t["weights"])
        assert t["tokens"] == t["consumed_samples"] * 64 and t["progress"] == t["consumed_samples"] / 240
        assert t["target"] == pytest.approx(np.mean(list(t["losses"].values())))
    assert [t["stage"] for t in traj] == [0, 1, 1]
    assert traj[0]["weights"] == pytest.approx({"web": 0.7, "code": 0.3, "books": 0.0})
    assert traj[2]["weights"] == pytest.approx({"web": 0.1, "code": 0.2, "books": 0.7})
    # books is off in stage 0 and on in stage 1: its validation loss falls most once it is trained on
    assert traj[0]["losses"]["books"] - traj[2]["losses"]["books"] > traj[0]["losses"]["web"] - traj[2]["losses"]["web"]
    assert os.path.exists(os.path.join(save, "iter_0000030", "regmixd_state.pt"))
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "30"

    # the samples the launcher drew, per stage and domain, realize the schedule's weights
    from megatron_ext.schedule import MixtureSchedule
    from megatron_ext.scheduled_dataset import build_train_valid_datasets
    from megatron_ext.tokenizer import build_tokenizer

    train_ds, _ = build_train_valid_datasets(
        MixtureSchedule.load(sched), train_samples=240, global_batch_size=8, seq_length=64, seed=7,
        tokenizer=build_tokenizer("NullTokenizer", vocab_size=512))
    counts = train_ds.realized_counts()
    assert counts.shape == (2, 3) and counts.sum() == 240
    for stage, weights in enumerate(([0.7, 0.3, 0.0], [0.1, 0.2, 0.7])):
        assert np.abs(counts[stage] - 120 * np.array(weights)).max() <= 1, counts


def test_loader_gives_the_synchronous_batches_and_rereads_after_a_controller_decision(corpus):
    """TrainBatches (DP 2, rank 1; a reader thread, then 2 worker processes) against collate() on indices
    written out by hand: Megatron's order, the same tensors; a stage appended while the next batch is
    being read ahead, and seeks (as on resume)."""
    import torch
    from megatron_ext.data_loader import TrainBatches
    from megatron_ext.evaluation import collate
    from megatron_ext.schedule import MixtureSchedule
    from megatron_ext.scheduled_dataset import build_train_valid_datasets
    from megatron_ext.tokenizer import build_tokenizer

    _, _, sched = corpus
    train_ds, _ = build_train_valid_datasets(
        MixtureSchedule.load(sched), train_samples=128, global_batch_size=8, seq_length=64, seed=7,
        tokenizer=build_tokenizer("NullTokenizer", vocab_size=512))

    def check(loader, c):
        got = loader.get(c)
        # micro-batch j of rank 1 of 2: samples c + (2j + 1)·2, +1
        want = [collate(train_ds, [c + 2, c + 3]), collate(train_ds, [c + 6, c + 7])]
        assert len(got) == 2 and all(set(g) == set(w) for g, w in zip(got, want))
        assert all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w), c
        return got

    for workers, switch, domain in ((0, 72, "books"), (2, 88, "web")):
        loader = TrainBatches(train_ds, global_batch_size=8, micro_batch_size=2, end_sample=128,
                              num_workers=workers, dp_size=2, dp_rank=1)
        try:
            for c in range(switch - 24, switch, 8):
                check(loader, c)
            # the batch at `switch` is being read ahead; the RegMix-D controller appends a stage there
            train_ds.append_stage(switch, {domain: 1.0})
            after = check(loader, switch)  # the new stage's samples, not the ones read ahead
            assert all((b["dataset_id"] == train_ds.domains.index(domain)).all() for b in after)
            check(loader, 120)  # seeks, as a resume does
            check(loader, 8)
        finally:
            loader.close()


def run_until_killed(args, save, kill_after_iteration):
    """Start a run, SIGKILL it once checkpoint `kill_after_iteration` is recorded (mid-training)."""
    proc = subprocess.Popen([PY, LAUNCHER] + args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    tracker = os.path.join(save, "latest_checkpointed_iteration.txt")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(tracker) and open(tracker).read().strip() == str(kill_after_iteration):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def test_resume_after_sigkill_is_bit_identical(corpus):
    root, data, sched = corpus
    base = TINY + ["--train-iters", "20", "--data-schedule", sched, "--eval-interval", "5", "--save-interval", "10"]
    straight = str(root / "straight")
    r = launch(base + ["--save", straight])
    assert r.returncode == 0, r.stderr[-3000:]

    resumed = str(root / "resumed")  # read by 2 DataLoader workers, then (resumed) by the default reader thread
    run_until_killed(base + ["--save", resumed, "--num-workers", "2"], resumed, 10)
    r = launch(base + ["--save", resumed, "--load", resumed])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_jsonl(os.path.join(straight, "train_log.jsonl")), read_jsonl(os.path.join(resumed, "train_log.jsonl"))
    assert [x["iteration"] for x in b] == list(range(1, 21))
    assert [x["loss"] for x in a] == [x["loss"] for x in b]  # bit-identical
    assert [x["consumed_samples"] for x in a] == [x["consumed_samples"] for x in b]
    assert read_jsonl(os.path.join(straight, "trajectory.jsonl")) == read_jsonl(os.path.join(resumed, "trajectory.jsonl"))

    # a different schedule on resume is refused without --override-data-schedule ...
    changed = write_schedule(str(root / "changed.json"), data, second_stage=(0.0, 0.0, 1.0))
    overridden = str(root / "overridden")
    os.makedirs(overridden)
    os.symlink(os.path.join(straight, "iter_0000010"), os.path.join(overridden, "iter_0000010"))
    with open(os.path.join(overridden, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10\n")
    swap = [x for x in base if x != sched]
    swap[swap.index("--data-schedule") + 1:swap.index("--data-schedule") + 1] = [changed]
    r = launch(swap + ["--load", overridden])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr[-2000:]
    # ... and with it, the new weights apply from the resume point on (stage 1 starts at iteration 10)
    r = launch(swap + ["--load", overridden, "--save", overridden, "--override-data-schedule"])
    assert r.returncode == 0, r.stderr[-3000:]
    traj = read_jsonl(os.path.join(overridden, "trajectory.jsonl"))
    assert [t["iteration"] for t in traj] == [15, 20]
    for t in traj:
        assert t["weights"] == pytest.approx({"web": 0.0, "code": 0.0, "books": 1.0})
    log = read_jsonl(os.path.join(overridden, "train_log.jsonl"))
    assert [x["iteration"] for x in log] == list(range(11, 21))
    assert [x["consumed_samples"] for x in log] == [x["consumed_samples"] for x in a[10:]]
    assert log[0]["loss"] != a[10]["loss"]  # same weights at iteration 10, different (books-only) batch


def assert_one_line_exit_2(returncode, stderr):
    assert returncode == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("case", ["missing_data", "unknown_bin"])
def test_bad_data_is_one_line_exit_2(corpus, case, tmp_path):
    """Found after torch.distributed is up: the launcher's real path, in a subprocess."""
    root, data, sched = corpus
    args = TINY + ["--train-iters", "2", "--data-schedule", sched]
    if case == "missing_data":
        args = [a for a in args if a not in ("--data-schedule", sched)] + ["--data-path", str(tmp_path / "nope")]
    else:
        bad = json.load(open(sched))
        bad["stages"][1]["train"][1] = str(tmp_path / "ghost_train_text_document")
        json.dump(bad, open(tmp_path / "bad.json", "w"))
        args[args.index(sched)] = str(tmp_path / "bad.json")
    r = launch(args, timeout=120)
    assert_one_line_exit_2(r.returncode, r.stderr)


@pytest.mark.parametrize("case", ["tp_heads", "batch", "bad_config"])
def test_bad_layout_or_config_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    """Refused before any process group exists, so run in-process through the CLI wrapper."""
    import pretrain_regmixd
    from tools.cli import run_main

    capsys.readouterr()  # drop megatron-core's import-time warnings
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    args = TINY + ["--train-iters", "2", "--data-path", str(tmp_path / "x")]
    if case == "tp_heads":
        args += ["--tensor-model-parallel-size", "3"]
    elif case == "batch":
        args[args.index("--global-batch-size") + 1] = "7"
    else:
        (tmp_path / "c.yaml").write_text("num-layers: [unclosed\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    with pytest.raises(SystemExit) as exc:
        run_main(pretrain_regmixd.main, args)
    assert_one_line_exit_2(exc.value.code, capsys.readouterr().err)


def test_config_file_supplies_flags_and_command_line_wins(tmp_path):
    from megatron_ext.arguments import parse_args

    (tmp_path / "m.yaml").write_text("num-layers: 3\nhidden_size: 64\nnum-attention-heads: 4\nseq-length: 32\n"
                                     "micro-batch-size: 1\nglobal-batch-size: 4\nlr: 0.001\ntrain-iters: 9\n"
                                     "vocab-size: 100\nbf16: false\ndata-path: [a_text_document]\n")
    args = parse_args(["--config", str(tmp_path / "m.yaml"), "--num-layers", "5"])
    assert (args.num_layers, args.hidden_size, args.train_iters, args.data_path) == (5, 64, 9, ["a_text_document"])
    assert args.ffn_hidden_size == 256 and args.max_position_embeddings == 32 and not args.bf16
    (tmp_path / "m.args").write_text("--num-layers 2 --hidden-size 32  # comment\n--num-attention-heads 2\n")
    args = parse_args(["--config", str(tmp_path / "m.args"), "--seq-length", "8", "--micro-batch-size", "1",
                       "--global-batch-size", "1", "--lr", "1", "--train-iters", "1", "--vocab-size", "9",
                       "--data-path", "x"])
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (2, 32, 2)
