"""Mixture controllers: DoReMi's update on a hand-computed example, the online RegMix-D controller against
tools.search's offline pick, invalid weights and mismatched surrogates, and (launcher subprocesses) kill
and resume with each controller plus DP=2 / TP=2 against one process."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from fixtures import make_domains
from megatron_ext.controllers import (RegMixDOnline, check_weights, doremi_excess, doremi_token_weights,
                                      doremi_update)
from megatron_ext.errors import UserError
from megatron_ext.mixture_search import SearchConfig
from megatron_ext.surrogate import Surrogate
from test_fit import SYN_DOMAINS, write_synthetic_sweep
from test_launcher import TINY, assert_one_line_exit_2, launch, read_jsonl, run_until_killed
from tools import fit, search


# ---------------------------------------------------------------- DoReMi, by hand

def test_doremi_update_on_a_hand_computed_three_domain_example():
    alpha, excess = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.4, 0.0])
    # α′ ∝ α·exp(η·λ) = (0.5·e^0.1, 0.3·e^0.4, 0.2) = (0.552585, 0.447547, 0.2), sum 1.200133
    prime = np.array([0.552585459, 0.447547409, 0.2]) / 1.200132868
    assert doremi_update(alpha, excess, eta=1.0, smoothing=0.0) == pytest.approx(prime, abs=1e-9)
    # α = (1 − c)·α′ + c/k with c = 1e-3, k = 3
    assert doremi_update(alpha, excess, eta=1.0, smoothing=1e-3) == pytest.approx(
        [0.460309798, 0.372875302, 0.166814900], abs=1e-8)
    # η scales the step; equal excess leaves α where it is
    assert doremi_update(alpha, np.full(3, 2.0), eta=1.0, smoothing=0.0) == pytest.approx(alpha)
    # loss weights (α_i/s_i) / Σ_j (α_j/s_j) with s = (0.6, 0.3, 0.1): (5/6, 1, 2) / (23/6)
    assert doremi_token_weights(alpha, np.array([0.6, 0.3, 0.1])) == pytest.approx([5 / 23, 6 / 23, 12 / 23])
    # λ per domain: token mean of the clipped excess; a domain absent from the step keeps its last value
    lam = doremi_excess(np.array([9.0, 9.0, 9.0]), sums=np.array([1.0, 0.0, 3.0]), counts=np.array([4.0, 0.0, 2.0]))
    assert lam.tolist() == [0.25, 9.0, 1.5]


@pytest.mark.parametrize("weights", [[float("nan"), 1, 1], [-0.1, 0.6, 0.5], [0, 0, 0], [1, 1]])
def test_invalid_controller_weights_stop_with_one_line(weights):
    with pytest.raises(UserError) as exc:
        check_weights(weights, ["a", "b", "c"], "test")
    assert "\n" not in str(exc.value) and "invalid mixture weights" in str(exc.value)


def test_from_doremi_refuses_a_file_that_is_not_doremi_weights(tmp_path, capsys):
    from tools import schedule as schedule_cli
    from tools.cli import run_main

    (tmp_path / "w.json").write_text(json.dumps({"average_weights": {"a": 1.0}}))
    with pytest.raises(SystemExit) as exc:
        run_main(schedule_cli.main, ["from-doremi", str(tmp_path / "w.json"), "--out", str(tmp_path / "s.json")])
    assert_one_line_exit_2(exc.value.code, capsys.readouterr().err)
    assert not (tmp_path / "s.json").exists()


# ---------------------------------------------------------------- RegMix-D against tools.search

@pytest.fixture(scope="module")
def synthetic_surrogate(tmp_path_factory):
    """64 static proxies of test_fit's generator; a 5-stage transition surrogate of the target loss, the
    paper's model (`--model reference`): its rollout starts every search from a loss state, as online."""
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_sweep(str(root / "sweep"), runs=64, evals=10)
    assert fit.main(["--sweep", str(root / "sweep"), "--out", str(root / "sur"), "--stages", "5",
                     "--targets", "target", "--folds", "0", "--model", "reference"]) == 0
    return str(root / "sur")


def controller_args(surrogate, **kw):
    base = dict(surrogate=surrogate, controller_exclude="", controller_top_k=16, controller_seed=3,
                controller_candidates=3000, controller_alpha=1.0, controller_max_change=None, controller_beta=0.0,
                controller_max_epochs=None, controller_tokens=None, global_batch_size=8, seq_length=64,
                num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, num_query_groups=4)
    base.update(kw)
    return SimpleNamespace(**base)


def fake_trainer(domains, prior, train_iters=50):
    """What the controller reads from the trainer: a one-stage run on `prior`."""
    ds = SimpleNamespace(stage_starts=[0], stage_weights=lambda s: dict(zip(domains, prior)))
    return SimpleNamespace(domains=list(domains), train_ds=ds, train_iters=train_iters,
                           train_samples=train_iters * 8, iteration=10, rank=0)


def test_online_controller_picks_what_the_offline_search_picks(synthetic_surrogate):
    sur = Surrogate.load(synthetic_surrogate)
    prior = np.array([0.5, 0.3, 0.2])
    trainer = fake_trainer(SYN_DOMAINS, prior)
    ctl = RegMixDOnline(controller_args(synthetic_surrogate))
    ctl.setup(trainer)
    assert ctl.switches == [80, 160, 240, 320]  # grid 0.2..0.8 of 50 iterations × 8 samples
    cfg = SearchConfig(stages=5, target_tokens=50 * 8 * 64, top_k=16, seed=3, candidates=3000)
    offline = search.rollout(sur, cfg, prior, np.full(3, np.inf))
    # observe exactly the loss the offline rollout starts its first search from (the proxies' mean at t_1)
    observed = sur.meta["initial_loss"]["target"]
    assert offline.predicted[0] == pytest.approx(observed, abs=1e-12)
    decision = ctl.search(trainer, {"target": observed, "losses": {}}, 1)
    assert [decision["weights"][d] for d in SYN_DOMAINS] == pytest.approx(offline.weights[1], abs=1e-12)
    assert decision["predicted_loss"] == pytest.approx(offline.predicted[1], abs=1e-12)
    # a different observed loss conditions the surrogate: a different state, a different prediction
    other = RegMixDOnline(controller_args(synthetic_surrogate))
    other.setup(trainer)
    moved = other.search(trainer, {"target": observed + 1.0, "losses": {}}, 1)
    assert moved["predicted_loss"] != pytest.approx(decision["predicted_loss"], abs=1e-6)


def test_online_controller_scales_the_observed_loss_to_the_proxies(synthetic_surrogate, tmp_path):
    sur_dir = tmp_path / "sur"
    os.makedirs(sur_dir)
    for name in os.listdir(synthetic_surrogate):
        data = open(os.path.join(synthetic_surrogate, name), "rb").read()
        if name == "meta.json":
            meta = json.loads(data)
            meta["proxy_nonembedding_params"] = 1000
            data = json.dumps(meta).encode()
        (sur_dir / name).write_bytes(data)
    ctl = RegMixDOnline(controller_args(str(sur_dir), controller_beta=0.05))
    ctl.setup(fake_trainer(SYN_DOMAINS, [1 / 3] * 3))
    # the tiny model: 2 layers × (4·64·64 attention + 3·64·256 SwiGLU + 2·64 norms) + 64 = 131,392
    assert ctl.scale == pytest.approx((131392 / 1000) ** 0.05)
    decision = ctl.search(fake_trainer(SYN_DOMAINS, [1 / 3] * 3), {"target": 4.0, "losses": {}}, 1)
    assert decision["scaled"]["target"] == pytest.approx(4.0 * ctl.scale)


def test_surrogate_with_other_domains_is_refused(synthetic_surrogate):
    ctl = RegMixDOnline(controller_args(synthetic_surrogate))
    with pytest.raises(UserError, match="do not match the schedule"):
        ctl.setup(fake_trainer(("web", "code", "books"), [1 / 3] * 3))


# ---------------------------------------------------------------- the launcher with a controller

@pytest.fixture(scope="module")
def syn_corpus(tmp_path_factory, synthetic_surrogate):
    """The surrogate's domains as .bin/.idx files, a one-stage baseline schedule and a reference checkpoint."""
    root = tmp_path_factory.mktemp("ctl")
    data = make_domains(str(root / "tok"), domains=SYN_DOMAINS, n_docs=120, valid_docs=12)
    stages = [{"start": 0.0, "train": [x for d, w in zip(SYN_DOMAINS, (0.5, 0.3, 0.2)) for x in (w, data[d]["train"])]}]
    sched = str(root / "base.json")
    with open(sched, "w") as f:
        json.dump({"version": 1, "unit": "fraction", "stages": stages}, f)
    ref = str(root / "reference")
    r = launch(TINY + ["--train-iters", "6", "--data-schedule", sched, "--eval-interval", "6", "--save", ref])
    assert r.returncode == 0, r.stderr[-3000:]
    return root, sched, ref, synthetic_surrogate


def doremi_args(sched, ref):
    return TINY + ["--train-iters", "8", "--data-schedule", sched, "--eval-interval", "4", "--save-interval", "4",
                   "--mixture-controller", "doremi", "--reference-load", ref]


def regmixd_args(sched, sur):
    return TINY + ["--train-iters", "10", "--data-schedule", sched, "--eval-interval", "5", "--save-interval", "3",
                   "--mixture-controller", "regmixd", "--surrogate", sur, "--controller-candidates", "2000",
                   "--controller-top-k", "16", "--controller-beta", "0"]


def without_seconds(trajectory):
    for t in trajectory:
        t.get("regmixd", {}).pop("seconds", None)
    return trajectory


@pytest.fixture(scope="module")
def doremi_straight(syn_corpus):
    root, sched, ref, _ = syn_corpus
    save = str(root / "doremi_straight")
    r = launch(doremi_args(sched, ref) + ["--save", save])
    assert r.returncode == 0, r.stderr[-3000:]
    return save


@pytest.mark.slow
def test_doremi_resume_after_sigkill_is_bit_identical(syn_corpus, doremi_straight, tmp_path):
    root, sched, ref, _ = syn_corpus
    straight = doremi_straight
    traj = read_jsonl(os.path.join(straight, "trajectory.jsonl"))
    assert [t["iteration"] for t in traj] == [4, 8] and traj[-1]["doremi"]["updates"] == 9  # α₀ + 8 updates
    weights = json.load(open(os.path.join(straight, "doremi_weights.json")))
    assert sum(weights["average_weights"].values()) == pytest.approx(1.0)
    assert weights["average_weights"] != pytest.approx(weights["baseline"], abs=1e-4)  # it moved
    log = read_jsonl(os.path.join(straight, "train_log.jsonl"))
    assert all(set(x["domain_loss"]) <= set(SYN_DOMAINS) and x["domain_loss"] for x in log)

    resumed = str(tmp_path / "doremi_resumed")
    run_until_killed(doremi_args(sched, ref) + ["--save", resumed], resumed, 4)
    r = launch(doremi_args(sched, ref) + ["--save", resumed, "--load", resumed])
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_jsonl(os.path.join(resumed, "train_log.jsonl")) == log  # bit-identical losses
    assert read_jsonl(os.path.join(resumed, "trajectory.jsonl")) == traj  # and weights
    again = json.load(open(os.path.join(resumed, "doremi_weights.json")))
    assert again["average_weights"] == weights["average_weights"]

    # ᾱ becomes the target's one-stage schedule
    from tools import schedule as schedule_cli
    out = str(tmp_path / "doremi_sched.json")
    assert schedule_cli.main(["from-doremi", os.path.join(straight, "doremi_weights.json"), "--out", out]) == 0
    from megatron_ext.schedule import MixtureSchedule
    got = MixtureSchedule.load(out).weights_dict(0)
    assert got == pytest.approx(weights["average_weights"], abs=1e-8)


@pytest.mark.slow
def test_doremi_dp2_gives_the_weights_of_one_process(syn_corpus, doremi_straight):
    root, sched, ref, _ = syn_corpus
    save = str(root / "doremi_dp2")
    r = launch(doremi_args(sched, ref) + ["--save", save], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one = read_jsonl(os.path.join(doremi_straight, "trajectory.jsonl"))
    two = read_jsonl(os.path.join(save, "trajectory.jsonl"))
    for a, b in zip(one, two):
        for key in ("weights", "average_weights", "excess_loss"):
            assert b["doremi"][key] == pytest.approx(a["doremi"][key], abs=1e-5)
    assert [x["loss"] for x in read_jsonl(os.path.join(save, "train_log.jsonl"))] == pytest.approx(
        [x["loss"] for x in read_jsonl(os.path.join(doremi_straight, "train_log.jsonl"))], abs=1e-4)


@pytest.fixture(scope="module")
def regmixd_straight(syn_corpus):
    root, sched, _, sur = syn_corpus
    save = str(root / "regmixd_straight")
    r = launch(regmixd_args(sched, sur) + ["--save", save])
    assert r.returncode == 0, r.stderr[-3000:]
    return save


@pytest.mark.slow
def test_regmixd_resume_after_sigkill_inside_and_at_stage_boundaries(syn_corpus, regmixd_straight, tmp_path):
    root, sched, _, sur = syn_corpus
    traj = without_seconds(read_jsonl(os.path.join(regmixd_straight, "trajectory.jsonl")))
    decisions = [t["regmixd"] for t in traj if "regmixd" in t]
    assert [d["iteration"] for d in decisions] == [2, 4, 6, 8]  # the grid 0.2..0.8 of 10 iterations
    assert [d["start_sample"] for d in decisions] == [16, 32, 48, 64]
    log = read_jsonl(os.path.join(regmixd_straight, "train_log.jsonl"))
    assert [x["stage"] for x in log] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for d in decisions:
        assert sum(d["weights"].values()) == pytest.approx(1.0)
        assert {"observed", "scaled", "predicted", "weights"} <= set(d)

    # killed after iteration 3 (inside stage 1) and after 6 (at the boundary of stages 2 and 3)
    resumed = str(tmp_path / "regmixd_resumed")
    run_until_killed(regmixd_args(sched, sur) + ["--save", resumed], resumed, 3)
    # iterations 4-6 read by DataLoader workers, which read ahead across the switch points at 4 and 6
    run_until_killed(regmixd_args(sched, sur) + ["--save", resumed, "--load", resumed, "--num-workers", "2"],
                     resumed, 6)
    r = launch(regmixd_args(sched, sur) + ["--save", resumed, "--load", resumed])
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_jsonl(os.path.join(resumed, "train_log.jsonl")) == log  # samples' stages and losses
    assert without_seconds(read_jsonl(os.path.join(resumed, "trajectory.jsonl"))) == traj  # decisions

    # a surrogate for other domains stops the resumed run with one line; the last checkpoint stays
    other = str(tmp_path / "other_sur")
    os.makedirs(other)
    for name in os.listdir(sur):
        data = open(os.path.join(sur, name), "rb").read()
        if name == "meta.json":
            meta = json.loads(data)
            meta["domains"] = ["web", "code", "books"]
            data = json.dumps(meta).encode()
        open(os.path.join(other, name), "wb").write(data)
    args = regmixd_args(sched, other)
    r = launch(args + ["--save", resumed, "--load", resumed])
    assert_one_line_exit_2(r.returncode, r.stderr)
    assert "do not match" in r.stderr
    assert open(os.path.join(resumed, "latest_checkpointed_iteration.txt")).read().strip() == "10"


@pytest.mark.slow
def test_regmixd_tp2_makes_the_decisions_of_one_process(syn_corpus, regmixd_straight):
    root, sched, _, sur = syn_corpus
    save = str(root / "regmixd_tp2")
    r = launch(regmixd_args(sched, sur) + ["--save", save, "--tensor-model-parallel-size", "2",
                                           "--make-vocab-size-divisible-by", "64"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one = [t["regmixd"] for t in read_jsonl(os.path.join(regmixd_straight, "trajectory.jsonl")) if "regmixd" in t]
    two = [t["regmixd"] for t in read_jsonl(os.path.join(save, "trajectory.jsonl")) if "regmixd" in t]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["observed"]["target"] == pytest.approx(a["observed"]["target"], abs=1e-4)
        assert b["weights"] == pytest.approx(a["weights"], abs=1e-3)
    # every rank appended the same stages: a rank with other indices would train on other samples
    assert [x["loss"] for x in read_jsonl(os.path.join(save, "train_log.jsonl"))] == pytest.approx(
        [x["loss"] for x in read_jsonl(os.path.join(regmixd_straight, "train_log.jsonl"))], abs=1e-4)
    assert [x["stage"] for x in read_jsonl(os.path.join(save, "train_log.jsonl"))] == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
