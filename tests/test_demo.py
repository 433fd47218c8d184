"""The demo pipeline at micro size: fixture corpus → 8 proxies → collect → tools.compare (fit, search,
two target arms through the launcher) → tools.report, with a comparison killed mid-run and resumed."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fixtures import make_domains

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MODEL = """num-layers: 2
hidden-size: 64
num-attention-heads: 4
ffn-hidden-size: 128
seq-length: 64
micro-batch-size: 4
global-batch-size: 8
lr: 3.0e-3
min-lr: 3.0e-3
lr-warmup-iters: 1
eval-iters: 2
log-interval: 2
"""


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def cli(module, *args, check=True):
    out = subprocess.run([PY, "-m", module, *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """4 collected proxies of 6 iterations on the 3-domain fixture corpus (plus the eval-only set `held`),
    evaluated every 2 (3 stages)."""
    root = tmp_path_factory.mktemp("demo")
    make_domains(str(root / "tok"), n_docs=120, valid_docs=24, vocab_size=256, eval_only=("held",))
    (root / "proxy.yaml").write_text(MODEL)
    sweep = root / "sweep"
    cli("tools.sweep", "sample", sweep, "--tokens", root / "tok" / "tokens.json", "--n", 8)
    cli("tools.sweep", "run", sweep, "--config", root / "proxy.yaml", "--jobs", 2, "--retries", 0,
        "--train-iters", 6, "--eval-interval", 2)
    cli("tools.collect", sweep)
    return root


def compare_args(root, out):
    return ["--sweep", root / "sweep", "--tokens", root / "tok" / "tokens.json", "--config", root / "proxy.yaml",
            "--out", out, "--arms", "natural,regmixd_offline,regmixd_online", "--seeds", 3, "--stages", 3,
            "--candidates", 2000, "--fit-flags=--min-data-in-leaf 2 --num-iterations 50",
            "--", "--train-iters", 8, "--eval-interval", 4]


@pytest.mark.slow
def test_compare_killed_resumed_then_reported(sweep, tmp_path):
    out = tmp_path / "cmp"
    argv = [PY, "-m", "tools.compare", *map(str, compare_args(sweep, out))]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    second = out / "runs" / "regmixd_offline_b100" / "seed3"
    deadline = time.time() + 300
    while not (second / "log.txt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)   # the runner and its launcher, mid-way through the second run
    text = proc.communicate()[0]
    assert (out / "runs" / "natural" / "seed3" / "done").exists(), text[-3000:]
    assert not (second / "done").exists(), text[-3000:]

    resumed = cli("tools.compare", *compare_args(sweep, out)).stdout
    assert "(1/3) natural seed 3: done, skipped" in resumed
    assert "(2/3) regmixd_offline_b100 seed 3: training" in resumed
    assert "(3/3) regmixd_online_b100 seed 3: training" in resumed
    # a heldout.json from before tokens.json had the eval-only set is redone, nothing retrained
    stale = out / "runs" / "natural" / "seed3" / "heldout.json"
    full = json.loads(stale.read_text())
    stale.write_text(json.dumps({k: v for k, v in full.items() if k != "eval_only"}))
    again = cli("tools.compare", *compare_args(sweep, out)).stdout
    assert "training" not in again and again.count("done, skipped") == 3 + 3   # 3 schedules, 3 runs
    assert again.count("-m tools.heldout") == 1 and "held (evaluation only): loss" in again
    assert json.loads(stale.read_text())["eval_only"]["held"]["loss"] == pytest.approx(
        full["eval_only"]["held"]["loss"], abs=1e-5)
    # the online arm: the controller decided every switch point of the surrogate's 3-stage grid
    online = [json.loads(l) for l in
              (out / "runs" / "regmixd_online_b100" / "seed3" / "trajectory.jsonl").read_text().splitlines()]
    decisions = [r["regmixd"] for r in online if "regmixd" in r]
    assert [d["switch"] for d in decisions] == [1, 2], online
    assert all(abs(sum(d["weights"].values()) - 1) < 1e-9 for d in decisions)

    # the RegMix-D schedule: 3 stages, stage 0 the token prior, searched for the target's own tokens
    sched = json.loads((out / "schedules" / "regmixd_offline_b100" / "sched.json").read_text())
    assert len(sched["stages"]) == 3
    assert sched["provenance"]["target_tokens"] == 8 * 8 * 64
    # the eval-only set is never trained on: in no sampled mixture, schedule or launcher evaluation set
    assert sorted({r.split(",")[3] for r in (sweep / "sweep" / "mixtures.csv").read_text().splitlines()[1:]}) == \
        ["books", "code", "web"]
    for label in ("natural", "regmixd_offline_b100", "regmixd_online_b100"):
        assert "held_valid" not in (out / "runs" / label / "seed3" / "sched.json").read_text()

    report = cli("tools.report", "--compare", out, "--out", tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    for label in ("natural", "regmixd_offline_b100"):
        lines = [json.loads(l) for l in (out / "runs" / label / "seed3" / "trajectory.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in lines] == [4, 8]
        final = lines[-1]["losses"]
        got = summary["arms"][label]
        assert got["mean over domains"]["mean"] == pytest.approx(np.mean(list(final.values())), abs=1e-12)
        assert got["target"]["mean"] == pytest.approx(lines[-1]["target"], abs=1e-12)
        assert got["books"]["std"] is None and got["books"]["seeds"] == 1
        heldout = json.loads((out / "runs" / label / "seed3" / "heldout.json").read_text())
        assert got["top-1 token accuracy"]["mean"] == pytest.approx(heldout["mean_token_accuracy"], abs=1e-12)
        assert 0 <= heldout["mean_token_accuracy"] <= 1 and set(heldout["token_accuracy"]) == set(final)
        held = heldout["eval_only"]["held"]   # all its windows of 64 + 1 tokens (fewer than 256)
        tokens = json.loads((sweep / "tok" / "tokens.json").read_text())["eval_only"]["held"]["valid_tokens"]
        assert held["tokens"] == (tokens - 1) // 64 * 64 and 0 <= held["token_accuracy"] <= 1
        assert got["held-out source loss (held)"]["mean"] == pytest.approx(held["loss"], abs=1e-12)
        assert 0 < held["loss"] < 2 * np.log(257)
    # the unigram baseline is a cross-entropy of the fixture's Zipf bands: below ln(vocab), above 0
    assert all(0 < summary["unigram"][d] < np.log(257) for d in summary["domains"])
    index = (tmp_path / "report" / "index.md").read_text()
    assert "| regmixd_online_b100 |" in index
    verdict = [l for l in report.stdout.splitlines() if l.startswith("mean over domains: lowest")]
    assert len(verdict) == 1 and "not called: 1 seed" in verdict[0]
    verdict = [l for l in report.stdout.splitlines() if l.startswith("held-out source loss (held): lowest")]
    assert len(verdict) == 1 and "not called: 1 seed" in verdict[0]
    assert "held-out source loss (held) |" in index and "no arm optimizes it" in index
    # the eval-only set's tokens are flat within a band: the pooled Zipf unigram fits it worst
    assert max(summary["unigram"][d] for d in summary["domains"]) < summary["unigram"]["held"] < 2 * np.log(257)
    for png in ("domain_losses.png", "training.png", "schedules.png", "predicted_vs_observed.png", "proxies.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000


@pytest.mark.slow
def test_regmix_static_fit_and_bad_input(sweep, tmp_path):
    """RegMix's arm fits the proxies' final losses with one searched stage; a changed comparison is refused."""
    out = tmp_path / "cmp"
    args = compare_args(sweep, out)
    args[args.index("natural,regmixd_offline,regmixd_online")] = "regmix,doremi"
    args[args.index("--seeds") + 1] = "1"
    budgets = args.index("--candidates")
    args[budgets:budgets] = ["--budgets", "75,100", "--schedules-only"]
    cli("tools.compare", *args)
    for budget, proxies in (("75", 6), ("100", 8)):
        sched = json.loads((out / "schedules" / f"regmix_b{budget}" / "sched.json").read_text())
        assert len(sched["stages"]) == 1 and sched["provenance"]["proxies"] == proxies
        losses = (out / "schedules" / f"regmix_b{budget}" / "losses_static.csv").read_text().splitlines()
        assert len(losses) == 1 + proxies and losses[0].startswith("index,target,")
    # DoReMi: reference on the natural mixture, a DRO proxy against it, its averaged weights as one stage
    doremi = json.loads((out / "schedules" / "doremi" / "sched.json").read_text())
    assert len(doremi["stages"]) == 1 and doremi["provenance"]["made_by"] == "tools/schedule from-doremi"
    weights = doremi["stages"][0]["train"][0::2]
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-6 and min(weights) > 0
    args[-1] = 16   # another --eval-interval: not the same comparison
    bad = cli("tools.compare", *args, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "eval_interval" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_heldout_loss_and_accuracy_match_a_direct_computation():
    """tools.heldout's windows and scores against numpy, on a bigram model: every token after the first
    is predicted once, the loss is the mean cross-entropy, a NullTokenizer word is one token."""
    from tools.heldout import score_windows
    rng = np.random.default_rng(0)
    vocab, seq, windows = 50, 8, 19   # 19 windows: two forward batches
    table = torch.tensor(rng.normal(scale=3.0, size=(vocab, vocab)), dtype=torch.float32)
    ids = rng.integers(vocab, size=20 * seq + 5)
    got = score_windows(lambda inputs, position_ids, mask: table[inputs], ids, seq, windows, {"type": "NullTokenizer"})
    logits = table.numpy().astype(np.float64)[ids[:windows * seq]]
    labels = ids[1:windows * seq + 1]
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    correct = (logits.argmax(axis=1) == labels).reshape(windows, seq)
    assert got["tokens"] == windows * seq
    assert got["loss"] == pytest.approx(-logp[np.arange(len(labels)), labels].mean(), rel=1e-5)
    assert got["token_accuracy"] == pytest.approx(correct.mean(), abs=1e-12)
    assert got["word_accuracy"] == pytest.approx(correct[:, 1:-1].mean(), abs=1e-12)   # first, last word left out
    assert got["words"] == windows * (seq - 2)
    assert score_windows(None, ids[:seq], seq, windows, {"type": "NullTokenizer"}) is None   # no whole window


def test_trained_mixture_follows_a_controllers_stages():
    """The report plots a controller's run from its trajectory: an interval's mixture is the one its
    closing evaluation records, and repeated mixtures merge into one stage."""
    from tools.report import trained_mixture
    records = [{"progress": p, "weights": w} for p, w in
               [(0.25, {"a": 0.5, "b": 0.5}), (0.5, {"a": 0.5, "b": 0.5}), (0.75, {"a": 0.9, "b": 0.1}),
                (1.0, {"b": 1.0})]]
    starts, W = trained_mixture(records, ["a", "b"])
    assert starts == [0.0, 0.5, 0.75]
    assert W.tolist() == [[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]]
