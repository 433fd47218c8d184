"""tools.surrogate / tools.fit: grouped CV, the real RegMix proof, sweep tables, CLI behaviour.

Also home of the synthetic sweep generator used by test_search.py and benchmarks/bench_fit_search.py:
a known loss process whose best mixture changes over training.
"""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megatron_ext.errors import UserError
from megatron_ext.surrogate import Surrogate
from tools import fit, search
from tools.sweep import DEFAULT_COMMAND as SWEEP_COMMAND
from tools.surrogate import (FitConfig, LGBMSettings, TrajectoryFeatures, cross_validate, fit_surrogate,
                             grouped_folds, spearman, static_table, trajectory_table)

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
    # the old nearest-point rule took 0.2 for 1/6; evaluations must lie exactly on the grid now
    with pytest.raises(UserError, match=r"no evaluation at progress 0.166667 of the grid .* \(nearest: 0.1, 0.2\); "
                                        r"--stages that fit every run: 2, 5, 10;"):
        trajectory_table(str(tmp_path), stages=6)
    uneven = trajectory_table(str(tmp_path), grid=[0.1, 0.3, 0.6, 1.0], targets=["target"])
    rows = uneven.runs == "r0000"
    assert uneven.stages == 4 and np.allclose(uneven.X[rows, 0], [0.1, 0.3, 0.6])
    tenths = trajectory_table(str(tmp_path), stages=10, targets=["target"])
    assert np.allclose(uneven.run_losses["r0000"][:, 0], tenths.run_losses["r0000"][[0, 2, 5, 9], 0])
    for bad in ([0.5, 0.9], [0.5, 0.4, 1.0], [0.0, 1.0]):
        with pytest.raises(UserError, match="--grid"):
            trajectory_table(str(tmp_path), grid=bad)
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


def run_cli(module, *argv):
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=ROOT, capture_output=True, text=True)


def one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_grid_end_to_end_and_rollout_cv_entries(tmp_path):
    """--grid through fit → search → sched.json; cv.json has rollout/static/persistence per target."""
    sweep, sur = tmp_path / "sweep", tmp_path / "sur"
    write_synthetic_sweep(str(sweep), runs=24, evals=10)
    one_line_error(run_cli("tools.fit", "--sweep", sweep, "--out", sur, "--stages", "4"),
                   "--stages that fit every run: 2, 5, 10")
    assert fit.main(["--sweep", str(sweep), "--out", str(sur), "--grid", "0.2,0.5,1", "--targets", "target,hard",
                     "--folds", "3", "--num-iterations", "100", "--no-plot"]) == 0
    meta = json.loads((sur / "meta.json").read_text())
    assert meta["grid"] == [0.2, 0.5, 1.0] and meta["model"] == "first-drop" and meta["stages"] == 3
    assert meta["proxy_nonembedding_params"] is None  # no runner.json around these CSVs
    cv = json.loads((sur / "cv.json").read_text())
    for target in ("target", "hard"):
        entry = cv["targets"][target]
        for kind in ("rollout", "static", "persistence"):
            assert set(entry[kind]) == {"spearman", "mae", "n"}, kind
        assert entry["rollout"]["n"] == entry["static"]["n"] == 24
        assert entry["persistence"]["n"] == 24 * 2  # two transitions with a known start loss per run
        assert entry["constant_folds"] == 0
    text = (sur / "cv.md").read_text()
    assert "rollout ρ" in text and ("does NOT beat the static fit" in text or "at least as well as" in text)
    out = tmp_path / "sched.json"
    argv = ["--surrogate", str(sur), "--out", str(out), "--target-tokens", "1e6", "--candidates", "2000",
            "--top-k", "20", "--no-plot"]
    assert search.main(argv + ["--grid", "0.2,0.5,1"]) == 0
    sched = json.loads(out.read_text())
    assert [s["start"] for s in sched["stages"]] == [0.0, 0.2, 0.5]
    assert sched["provenance"]["grid"] == [0.2, 0.5, 1.0] and sched["provenance"]["searched"] == [True] * 3
    with pytest.raises(UserError, match="--grid 0.25,0.5,1 differs from the surrogate's grid 0.2,0.5,1"):
        search.main(argv + ["--grid", "0.25,0.5,1"])


def test_damaged_surrogate_is_refused_in_one_line(tmp_path):
    sweep, sur = tmp_path / "sweep", tmp_path / "sur"
    write_synthetic_sweep(str(sweep), runs=12, evals=4)
    assert fit.main(["--sweep", str(sweep), "--out", str(sur), "--stages", "4", "--targets", "target",
                     "--folds", "0", "--num-iterations", "50", "--no-plot"]) == 0
    assert Surrogate.load(str(sur)).meta["trees"]["lgbm_00.txt"] == 50
    search_argv = ["tools.search", "--surrogate", sur, "--out", tmp_path / "s.json", "--target-tokens", "1e6",
                   "--candidates", "500", "--top-k", "5", "--no-plot"]
    model = sur / "lgbm_00.txt"
    text = model.read_text()
    header = text[:text.index("Tree=0")]
    model.write_text(header)  # cut after its header: LightGBM would load it and predict 0.0
    one_line_error(run_cli(*search_argv), "lgbm_00.txt: sha256 differs from meta.json")
    # even with a matching checksum (meta.json edited by hand), the tree count gives it away
    meta = json.loads((sur / "meta.json").read_text())
    meta["files_sha256"]["lgbm_00.txt"] = hashlib.sha256(header.encode()).hexdigest()
    (sur / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="lgbm_00.txt: 0 trees, meta.json says 50"):
        Surrogate.load(str(sur))
    os.remove(sur / "first_ridge.json")
    with pytest.raises(UserError, match="first_ridge.json: missing"):
        Surrogate.load(str(sur))
    (sur / "meta.json").write_text("{")
    with pytest.raises(UserError, match="not a surrogate's meta.json"):
        Surrogate.load(str(sur))


def test_small_sweeps_grow_trees_and_constant_models_are_refused(tmp_path):
    assert LGBMSettings().for_rows(512).min_data_in_leaf == 20   # RegMix-sized data: its settings
    assert LGBMSettings().for_rows(32).min_data_in_leaf == 3
    sweep = tmp_path / "sweep"
    write_synthetic_sweep(str(sweep), runs=8, evals=5)           # the demo's size: 8 proxies
    table = trajectory_table(str(sweep), stages=5, targets=["target"], model="first-drop")
    report = cross_validate(table, FitConfig(folds=4, lgbm=LGBMSettings(num_iterations=100)))
    assert report["targets"]["target"]["constant_folds"] == 0
    assert report["targets"]["target"]["rollout"]["spearman"] > 0.5
    table.Y[:] = 3.0  # labels that do not vary: LightGBM can only fit a constant
    table.run_losses = {r: np.full_like(v, 3.0) for r, v in table.run_losses.items()}
    with pytest.raises(UserError, match="constant model for target"):
        fit_surrogate(table, FitConfig(lgbm=LGBMSettings(num_iterations=20)))


def test_default_model_ranks_held_out_runs_at_least_as_well_as_static(tmp_path, capsys):
    """Rollout CV on the generator (evaluated every tenth, fitted on fifths): first-drop against the
    paper's model and a static fit of each run's mixture → final loss, on the same folds."""
    write_synthetic_sweep(str(tmp_path), runs=128, evals=10)
    result = {}
    for model in ("first-drop", "reference"):
        table = trajectory_table(str(tmp_path), stages=5, targets=["target"], model=model)
        result[model] = cross_validate(table, FitConfig())["targets"]["target"]
    default, reference = result["first-drop"], result["reference"]
    with capsys.disabled():
        print(f"\nrollout CV, 128 generator proxies, 5 stages: first-drop spearman "
              f"{default['rollout']['spearman']:.4f} (MAE {default['rollout']['mae']:.4f}), reference "
              f"{reference['rollout']['spearman']:.4f} (MAE {reference['rollout']['mae']:.4f}), static LightGBM "
              f"{default['static']['spearman']:.4f} (MAE {default['static']['mae']:.4f}), static ridge "
              f"{default['static_ridge']['spearman']:.4f}; one-step MAE first-drop {default['one_step']['mae']:.4f}, "
              f"reference {reference['one_step']['mae']:.4f}, persistence {default['persistence']['mae']:.4f}")
    assert default["rollout"]["spearman"] >= default["static"]["spearman"] - 0.01
    assert default["rollout"]["spearman"] > reference["rollout"]["spearman"] + 0.02
    assert default["one_step"]["mae"] < default["persistence"]["mae"]


def test_proxy_parameter_count_from_the_sweep(tmp_path):
    """meta["proxy_nonembedding_params"] (the online controller's loss scaling) from runner.json."""
    from tools.surrogate import proxy_nonembedding_params
    sweep = tmp_path / "sweep"
    shutil.copytree(os.path.join(ROOT, "tests", "data", "trajectories", "small_sweep"), sweep)
    runner = json.loads((sweep / "runner.json").read_text())
    assert proxy_nonembedding_params(str(sweep)) is None  # a runner.json without the launcher settings
    runner.update(command=SWEEP_COMMAND, config="examples/proxy_1m.yaml", seed=1, save_interval=2, retries=0,
                  tokenizer=["--tokenizer-type", "NullTokenizer", "--vocab-size", "128"],
                  extra=["--lr-warmup-iters", "2"], cwd=ROOT)
    (sweep / "runner.json").write_text(json.dumps(runner))
    # 2 layers, hidden 256, 8 heads, FFN 512: 2 x (196,608 + 65,536 + 393,216 + 512) + 256 (checked once
    # against megatron-core's GPTModel, embeddings and output layer left out)
    assert proxy_nonembedding_params(str(sweep)) == 1_312_000


def test_cv_says_plainly_when_static_wins():
    from tools.surrogate import verdict
    worse = {"rollout": {"spearman": 0.71}, "static": {"spearman": 0.9}}
    assert "does NOT beat the static fit: rollout Spearman 0.7100 < static 0.9000" in verdict(worse)
    assert "at least as well" in verdict({"rollout": {"spearman": 0.95}, "static": {"spearman": 0.9}})
    assert "too few runs" in verdict({"rollout": {"spearman": float("nan")}, "static": {"spearman": 0.9}})


def test_real_proxy_sweep_fits_searches_and_predicts_within_bounds(tmp_path):
    """The project's own proxies (tests/data/demo_sweep, 6 runs x 6 evaluations, 12 domains): fit → CV → search.

    Regression check: with 4 training runs per fold, an unbounded ridge base extrapolated to one-step
    errors of 1.3 (losses ~6-7); inputs clipped to the training range keep it near the observed scale."""
    sur = tmp_path / "sur"
    assert fit.main(["--sweep", os.path.join(ROOT, "tests", "data", "demo_sweep"), "--out", str(sur),
                     "--stages", "6", "--targets", "target", "--folds", "3", "--num-iterations", "200",
                     "--no-plot"]) == 0
    entry = json.loads((sur / "cv.json").read_text())["targets"]["target"]
    assert entry["rollout"]["n"] == entry["static"]["n"] == 6 and entry["constant_folds"] == 0
    assert entry["one_step"]["mae"] < 0.3 and entry["rollout"]["mae"] < 1.0
    out = tmp_path / "sched.json"
    assert search.main(["--surrogate", str(sur), "--out", str(out), "--target-tokens", "1e9",
                        "--candidates", "2000", "--top-k", "20", "--no-plot"]) == 0
    sched = json.loads(out.read_text())
    assert len(sched["stages"]) == 6 and all(np.isfinite(sched["provenance"]["predicted_loss"]))


def test_default_model_ranks_real_proxies_at_least_as_well_as_static(tmp_path):
    """80 real proxies of the demo recipe (tests/data/gpu_sweep80: 96 steps of 16 x 128 tokens, 12 domains,
    swept on a GPU machine): rolled out from the mixture alone, the default trajectory model ranks held-out
    runs' final target loss at least as well as the static fit on the same folds (issue 9's bar).
    Printed as measured; the margin on this data is ~0.03, far above cross-platform LightGBM noise."""
    sur = tmp_path / "sur"
    assert fit.main(["--sweep", os.path.join(ROOT, "tests", "data", "gpu_sweep80"), "--out", str(sur),
                     "--stages", "6", "--targets", "target", "--no-plot"]) == 0
    entry = json.loads((sur / "cv.json").read_text())["targets"]["target"]
    print(f"\n80 real proxies, 5-fold rollout CV: default spearman {entry['rollout']['spearman']:.4f} "
          f"(MAE {entry['rollout']['mae']:.4f}), static LightGBM {entry['static']['spearman']:.4f} "
          f"(MAE {entry['static']['mae']:.4f}), persistence one-step MAE {entry['persistence']['mae']:.4f}, "
          f"default one-step MAE {entry['one_step']['mae']:.4f}")
    assert entry["rollout"]["n"] == entry["static"]["n"] == 80 and entry["constant_folds"] == 0
    assert entry["rollout"]["spearman"] >= entry["static"]["spearman"]
    assert entry["rollout"]["mae"] <= entry["static"]["mae"]
