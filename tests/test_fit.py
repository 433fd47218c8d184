"""tools.surrogate / tools.fit: grouped CV, the real RegMix proof, sweep tables, CLI behaviour.

Also home of the synthetic sweep generator used by test_search.py and benchmarks/bench_fit_search.py:
a known loss process whose best mixture changes over training.
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ext.errors import UserError
from tools import fit
from tools.surrogate import (FitConfig, TrajectoryFeatures, fit_surrogate, grouped_folds, spearman,
                             static_table, trajectory_table)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGMIX = os.path.join(ROOT, "tests", "data", "regmix")
PILE_CC = "metric/the_pile_pile_cc_val_loss"
SYN_DOMAINS = ("easy", "hard", "filler")


# ---------------------------------------------------------------- the synthetic generator

def _efficiency(n: np.ndarray, domains: int = 3) -> np.ndarray:
    """Tokens of each domain → effective tokens per unit of progress, as a function of the state n.

    `easy` pays early and saturates, `hard` pays once the model knows something, `filler` (and any
    further domain, at its own flat rate) does not change: the best mixture moves from easy to hard."""
    flat = [0.5] + [0.2 + 0.4 * ((7 * i) % 10) / 10 for i in range(domains - 3)]
    return np.stack([1.6 * np.exp(-n / 0.4), 0.3 + 0.9 * (1 - np.exp(-n / 0.4))] + [f + 0 * n for f in flat], -1)


def synthetic_domains(count: int = 3) -> tuple:
    return SYN_DOMAINS + tuple(f"extra{i}" for i in range(count - 3))


def synthetic_losses(starts, weights, points, steps: int = 400):
    """True losses at progress `points` for schedules `weights` [R, K, D] (D >= 3) with stage starts [K].

    Target loss: a power law in effective tokens n (dn/dt = Σ_d w_d e_d(n)); domain d's loss: a power law
    in its own tokens seen (plus a little transfer from n). Returns (target [R, P], domains [R, P, D])."""
    weights = np.asarray(weights, float)
    R, _, D = weights.shape
    n, seen = np.zeros(R), np.zeros((R, D))
    points = list(points)
    target, domains = np.zeros((R, len(points))), np.zeros((R, len(points), D))
    for i in range(steps):
        t = i / steps
        k = int(np.searchsorted(starts, t, side="right") - 1)
        w = weights[:, k]
        n = n + (w * _efficiency(n, D)).sum(-1) / steps
        seen = seen + w / steps
        for p, at in enumerate(points):
            if abs((i + 1) / steps - at) < 0.5 / steps:
                target[:, p] = 2 + 3 * (1 + 5 * n) ** -0.5
                domains[:, p] = 1.5 + 4 * (1 + 20 * seen + 5 * n[:, None]) ** -0.4
    return target, domains


def write_synthetic_sweep(folder: str, runs: int = 128, evals: int = 10, seed: int = 0, noise: float = 0.002,
                          domains: int = 3):
    """Static random mixtures (Dirichlet(1)) of the generator, evaluated at progress i/evals: tools.collect's CSVs."""
    rng = np.random.default_rng(seed)
    names = synthetic_domains(domains)
    W = rng.dirichlet(np.ones(domains), size=runs)
    points = np.arange(1, evals + 1) / evals
    target, losses = synthetic_losses([0.0], W[:, None, :], points)
    target = target + rng.normal(0, noise, target.shape)
    losses = losses + rng.normal(0, noise, losses.shape)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "trajectories.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["run", "iteration", "tokens", "progress", "stage", "domain", "loss", "target"])
        for r in range(runs):
            for p, at in enumerate(points):
                it = int(round(at * 1000))
                for d, name in enumerate(names):
                    out.writerow([f"r{r:04d}", it, it * 4096, at, 0, name, losses[r, p, d], target[r, p]])
    with open(os.path.join(folder, "mixtures.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["run", "stage", "start", "domain", "weight"])
        for r in range(runs):
            for d, name in enumerate(names):
                out.writerow([f"r{r:04d}", 0, 0.0, name, W[r, d]])
    return W


# ---------------------------------------------------------------- tests

def test_grouped_folds_never_split_a_run():
    runs = np.repeat([f"r{i}" for i in range(23)], 4)
    folds = grouped_folds(runs, 5, seed=3)
    seen_in_test = np.concatenate([test for _, test in folds])
    assert sorted(seen_in_test) == list(range(len(runs)))  # every row tested exactly once
    for train, test in folds:
        assert not set(runs[train]) & set(runs[test])
    with pytest.raises(UserError, match="--folds"):
        grouped_folds(runs, 24, seed=0)


def test_trajectory_table_rows_follow_the_paper(tmp_path):
    write_synthetic_sweep(str(tmp_path), runs=6, evals=10)
    table = trajectory_table(str(tmp_path), stages=5)
    # M x N rows (N = K - 1 transitions), features (t_l, mixture) + the target's own loss at t_l
    assert len(table.Y) == 6 * 4
    assert table.features == ["progress", "w:easy", "w:hard", "w:filler"] and table.has_state
    assert table.targets == ["target", *SYN_DOMAINS]
    run0 = table.runs == "r0000"
    assert np.allclose(table.X[run0, 0], [0.2, 0.4, 0.6, 0.8])
    # the loss state of transition l is the label of transition l - 1 (same run, same target)
    assert np.allclose(table.state[run0][1:], table.Y[run0][:-1])
    ext = trajectory_table(str(tmp_path), stages=5, feats=TrajectoryFeatures(history=True, first_stage=True))
    assert len(ext.Y) == 6 * 5 and np.isnan(ext.state[ext.stage == 0]).all()
    with pytest.raises(UserError, match="no evaluation near progress"):
        trajectory_table(str(tmp_path), stages=7)
    with pytest.raises(UserError, match="--predict-drop"):
        trajectory_table(str(tmp_path), stages=5, feats=TrajectoryFeatures(first_stage=True, predict_drop=True))


def test_predict_drop_learns_the_change_and_predicts_the_loss(tmp_path):
    write_synthetic_sweep(str(tmp_path), runs=40, evals=5)
    table = trajectory_table(str(tmp_path), stages=5, feats=TrajectoryFeatures(predict_drop=True), targets=["target"])
    assert np.allclose(table.label(0), table.Y[:, 0] - table.state[:, 0]) and (table.label(0) < 0).all()
    surrogate = fit_surrogate(table, FitConfig(), {"objective": "target"})
    pred = surrogate.predict("target", table.X, table.state[:, 0])  # back on the loss scale
    assert np.abs(pred - table.Y[:, 0]).mean() < 0.01 * np.abs(table.label(0)).mean() + 0.01


def test_dynamic_proxies_give_history_features(tmp_path):
    write_synthetic_sweep(str(tmp_path), runs=2, evals=4)
    with open(tmp_path / "mixtures.csv", "a") as f:  # run r0001 switches to all-hard at half time
        f.write("r0001,1,0.5,easy,0\nr0001,1,0.5,hard,1\nr0001,1,0.5,filler,0\n")
    table = trajectory_table(str(tmp_path), stages=4, feats=TrajectoryFeatures(history=True))
    rows = table.X[table.runs == "r0001"]
    assert np.allclose(rows[:, 1:4][-1], [0, 1, 0])          # the stage's own mixture after the switch
    assert not np.allclose(rows[:, 4:7][-1], [0, 1, 0])      # history still remembers the first half
    assert np.allclose(rows[:, 1:4][0], rows[:, 4:7][0])     # before the switch: history = mixture


def test_regmix_real_data_spearman(capsys):
    """The issue's proof: fit on RegMix's 512 proxies, rank the 256 held-out mixtures by Pile-CC loss."""
    train = static_table(os.path.join(REGMIX, "train_mixture_1m.csv"),
                         os.path.join(REGMIX, "train_pile_loss_1m.csv"), [PILE_CC])
    test = static_table(os.path.join(REGMIX, "test_mixture_1m.csv"),
                        os.path.join(REGMIX, "test_pile_loss_1m.csv"), [PILE_CC])
    surrogate = fit_surrogate(train, FitConfig(), {"objective": PILE_CC})
    rho = spearman(surrogate.predict(PILE_CC, test.X), test.Y[:, 0])
    rho_ridge = spearman(surrogate.predict(PILE_CC, test.X, kind="ridge"), test.Y[:, 0])
    with capsys.disabled():
        print(f"\nRegMix 1M Pile-CC, 256 held-out mixtures: LightGBM spearman {rho:.4f}, ridge {rho_ridge:.4f}")
    assert rho >= 0.98
    assert rho > rho_ridge


def test_fit_cli_static_writes_surrogate_and_predicts(tmp_path):
    out = tmp_path / "sur"
    args = ["--mixtures", os.path.join(REGMIX, "train_mixture_1m.csv"),
            "--losses", os.path.join(REGMIX, "train_pile_loss_1m.csv"), "--target", PILE_CC,
            "--targets", f"{PILE_CC},metric/the_pile_github_val_loss", "--out", str(out),
            "--folds", "3", "--num-iterations", "200"]
    assert fit.main(args) == 0
    for name in ("meta.json", "ridge.json", "lgbm_00.txt", "lgbm_01.txt", "cv.json", "cv.md", "pred_vs_obs.png"):
        assert (out / name).is_file(), name
    cv = json.loads((out / "cv.json").read_text())
    assert cv["grouped_by"] == "run" and cv["folds"] == 3
    assert cv["targets"][PILE_CC]["lgbm"]["all"]["spearman"] > 0.9
    assert "| " + PILE_CC in (out / "cv.md").read_text()
    pred = tmp_path / "pred.csv"
    assert fit.main(["predict", "--surrogate", str(out), "--mixtures", os.path.join(REGMIX, "test_mixture_1m.csv"),
                     "--out", str(pred)]) == 0
    rows = list(csv.reader(open(pred)))
    assert rows[0] == ["index", "prediction"] and len(rows) == 257
    observed = static_table(os.path.join(REGMIX, "test_mixture_1m.csv"),
                            os.path.join(REGMIX, "test_pile_loss_1m.csv"), [PILE_CC]).Y[:, 0]
    assert spearman(np.array([float(r[1]) for r in rows[1:]]), observed) > 0.95
    # deterministic: refitting gives byte-identical models
    assert fit.main(args[:-6] + ["--out", str(tmp_path / "again"), "--folds", "0", "--num-iterations", "200",
                                 "--targets", f"{PILE_CC},metric/the_pile_github_val_loss"]) == 0
    assert (out / "lgbm_00.txt").read_text() == (tmp_path / "again" / "lgbm_00.txt").read_text()


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("id,a,b\n1,0.5,0.5\n")
    for argv, needle in [
        (["--mixtures", str(bad), "--losses", str(bad), "--target", "a", "--out", str(tmp_path / "o")], "'index'"),
        (["--mixtures", os.path.join(REGMIX, "train_mixture_1m.csv"),
          "--losses", os.path.join(REGMIX, "train_pile_loss_1m.csv"), "--target", "nope",
          "--out", str(tmp_path / "o")], "nope"),
        (["--sweep", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "no such file"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "tools.fit", *argv], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and needle in proc.stderr and proc.stderr.count("\n") == 1
