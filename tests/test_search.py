"""tools.search: the trajectory search beats the best static mixture on a known generator; RegMix static
search on real data; budgets, max-change, exclusions; sched.json passes `tools.schedule validate`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures import make_domains
from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule
from test_fit import PILE_CC, REGMIX, ROOT, SYN_DOMAINS, synthetic_losses, write_synthetic_sweep
from tools import fit, search
from megatron_ext.mixture_search import project_to_caps


def cli(module, *argv):
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=ROOT, capture_output=True, text=True)


def schedule_weights(path) -> tuple[list, np.ndarray, MixtureSchedule]:
    s = MixtureSchedule.load(str(path))
    W = np.array([[s.weights_dict(k)[d] for d in SYN_DOMAINS] for k in range(len(s.stages))])
    return [st.start for st in s.stages], W, s


@pytest.fixture(scope="module")
def synthetic_surrogate(tmp_path_factory):
    """128 static proxies of the generator, a 5-stage transition surrogate for the target loss."""
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_sweep(str(root / "sweep"), runs=128, evals=10)
    assert fit.main(["--sweep", str(root / "sweep"), "--out", str(root / "sur"), "--stages", "5",
                     "--targets", "target", "--folds", "0"]) == 0
    return root / "sur"


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    """Real .bin/.idx files and tokens.json for the generator's domains (`hard` is the small one)."""
    root = tmp_path_factory.mktemp("tok")
    make_domains(str(root), domains=SYN_DOMAINS, n_docs=40, doc_len=(10, 30), vocab_size=96, valid_docs=4)
    tokens = json.loads((root / "tokens.json").read_text())
    tokens["domains"]["hard"]["train_tokens"] //= 20  # make one domain scarce (the counts drive budgets only)
    (root / "tokens.json").write_text(json.dumps(tokens))
    return root, {d: tokens["domains"][d]["train_tokens"] for d in SYN_DOMAINS}


def test_trajectory_search_beats_best_static_mixture(synthetic_surrogate, tmp_path):
    out = tmp_path / "sched.json"
    assert search.main(["--surrogate", str(synthetic_surrogate), "--out", str(out), "--stages", "5",
                        "--target-tokens", "1e9", "--top-k", "50", "--seed", "1", "--candidates", "10000",
                        "--prior", "uniform"]) == 0
    starts, W, sched = schedule_weights(out)
    assert starts == [0.0, 0.2, 0.4, 0.6, 0.8] and np.allclose(W[0], 1 / 3)  # the paper: stage 0 = prior
    assert (out.parent / "sched.png").is_file()
    prov = sched.provenance
    assert prov["proxies"] == 128 and len(prov["predicted_loss"]) == 5 and len(prov["surrogate_sha256"]) == 64
    # the generator's best static mixture, by exhaustive search on a 1/100 grid of the simplex
    grid = np.array([(a, b, 100 - a - b) for a in range(101) for b in range(101 - a)]) / 100
    static_loss, _ = synthetic_losses([0.0], grid[:, None, :], [1.0])
    schedule_loss, _ = synthetic_losses(starts, W[None], [1.0])
    print(f"\nsynthetic generator: searched 5-stage schedule true loss {schedule_loss[0, 0]:.4f}, best static "
          f"{static_loss.min():.4f} at {grid[static_loss[:, 0].argmin()]}")
    assert schedule_loss[0, 0] < static_loss.min()
    # the searched schedule moves from the easy domain towards the hard one (the generator's optimum does)
    assert W[1, 0] > W[-1, 0] and W[1, 1] < W[-2, 1]
    proc = cli("tools.schedule", "validate", "--no-check-files", out)
    assert proc.returncode == 0, proc.stderr


def test_budget_max_change_exclude_and_validate(synthetic_surrogate, synthetic_data, tmp_path):
    root, counts = synthetic_data
    target_tokens, max_epochs = 2 * sum(counts.values()), 3.0
    out = tmp_path / "sched.json"
    argv = ["--surrogate", synthetic_surrogate, "--out", out, "--target-tokens", target_tokens,
            "--tokens", root / "tokens.json", "--max-epochs", max_epochs, "--max-change", 0.3,
            "--candidates", 3000, "--top-k", 20, "--seed", 0]
    assert search.main(list(map(str, argv))) == 0
    _, W, sched = schedule_weights(out)
    scheduled = (W * 0.2 * target_tokens).sum(0)
    budget = max_epochs * np.array([counts[d] for d in SYN_DOMAINS])
    assert (scheduled <= budget * (1 + 1e-6)).all()
    assert scheduled[1] > 0.9 * budget[1]  # the searched schedule wants `hard`, up to its budget
    assert (np.abs(np.diff(W, axis=0)).sum(1) <= 0.3 + 1e-6).all()
    assert sched.stages[0].prefixes[0] == str(root / "easy_train_text_document")
    proc = cli("tools.schedule", "validate", out)  # with the .bin/.idx check
    assert proc.returncode == 0, proc.stderr
    # same seed, same file
    again = tmp_path / "again.json"
    assert search.main(list(map(str, argv[:3] + [again] + argv[4:]))) == 0
    assert json.loads(again.read_text())["stages"] == json.loads(out.read_text())["stages"]
    # an excluded domain gets weight 0 in every stage
    assert search.main(list(map(str, argv + ["--exclude", "filler", "--max-epochs", 10]))) == 0
    assert (schedule_weights(out)[1][:, 2] == 0).all()


def test_infeasible_budgets_name_the_domain(synthetic_surrogate, synthetic_data, tmp_path):
    root, counts = synthetic_data
    base = ["--surrogate", synthetic_surrogate, "--out", tmp_path / "s.json", "--tokens", root / "tokens.json",
            "--candidates", 2000, "--top-k", 10]
    # the budgets of all domains together are below the run: every domain named
    proc = cli("tools.search", *base, "--target-tokens", 10 * sum(counts.values()), "--max-epochs", 2)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "hard" in proc.stderr, proc.stderr
    # stage 0 (the prior, fixed) alone overdraws the scarce domain
    proc = cli("tools.search", *base, "--target-tokens", sum(counts.values()), "--max-epochs", 1, "--prior", "uniform")
    assert proc.returncode == 2 and "domain 'hard'" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    with pytest.raises(UserError, match="--exclude: unknown domain"):
        search.main(list(map(str, base + ["--target-tokens", 1e6, "--exclude", "nope"])))
    with pytest.raises(UserError, match="fitted for 5 stages"):
        search.main(list(map(str, base + ["--target-tokens", 1e6, "--stages", 3])))


def test_project_to_caps_keeps_simplex_and_caps():
    rng = np.random.default_rng(0)
    W = rng.dirichlet(np.ones(5), size=1000)
    caps = np.array([0.1, 0.5, 1.0, 0.05, 0.6])
    P = project_to_caps(W, caps)
    assert (P <= caps + 1e-12).all() and np.allclose(P.sum(1), 1.0) and (P >= 0).all()
    untouched = (W <= caps).all(1)
    assert np.allclose(P[untouched], W[untouched])


def test_static_regmix_search_on_real_data(tmp_path):
    sur = tmp_path / "sur"
    assert fit.main(["--mixtures", os.path.join(REGMIX, "train_mixture_1m.csv"),
                     "--losses", os.path.join(REGMIX, "train_pile_loss_1m.csv"), "--target", PILE_CC,
                     "--targets", PILE_CC, "--folds", "0", "--out", str(sur)]) == 0
    out = tmp_path / "regmix.json"
    assert search.main(["--surrogate", str(sur), "--out", str(out), "--stages", "1", "--target-tokens", "25e9",
                        "--top-k", "100", "--seed", "0", "--candidates", "10000"]) == 0
    sched = MixtureSchedule.load(str(out))
    weights = sched.weights_dict(0)
    top = max(weights, key=weights.get)
    print(f"\nstatic RegMix search (10k candidates, top-100): Pile-CC {weights['train_the_pile_pile_cc']:.4f} "
          f"(RegMix 1B published: 0.8701)")
    assert top == "train_the_pile_pile_cc" and weights[top] > 0.6
    assert cli("tools.schedule", "validate", "--no-check-files", out).returncode == 0
