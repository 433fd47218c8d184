"""The surrogate: proxy results → regression tables → LightGBM models (+ a ridge baseline), CV, save/load.

Two modes share one table layout (rows × common features, a per-target loss state, per-target labels):
- static (RegMix): mixture → loss at the end of the run;
- trajectory (RegMix-D): one row per proxy and transition t_l → t_{l+1} on a grid of K stages
  (t_l = l/K): (progress t_l, the mixture over the transition, [cumulative shares before t_l],
  [the target's own loss at t_l]) → the target's loss at t_{l+1}. With the defaults this is the paper's
  local transition model f_N(t_l, m, l_l) → l_{l+1} (N = K - 1 switch points, M × N rows).
The exact feature set is documented in docs/ARCHITECTURE.md.
"""
import csv
import io
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from megatron_ext.atomic import atomic_path
from megatron_ext.errors import UserError
from megatron_ext.surrogate import (Ridge, Surrogate, encode_features, feature_names, nonembedding_parameters,
                                    piecewise_average, sha256_files)
from megatron_ext.text_files import read_text

MODEL_KINDS = ("lgbm", "ridge")


# ---------------------------------------------------------------- small helpers

def save_figure(fig, path: str) -> None:
    """Save a matplotlib figure as a PNG atomically and close it (the plots of fit and search)."""
    import matplotlib.pyplot as plt
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)


def read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    rows = list(csv.reader(io.StringIO(read_text(path, "CSV file", newline=""))))
    if not rows:
        raise UserError(f"{path}: empty file")
    return rows[0], rows[1:]


def to_float(value: str, where: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise UserError(f"{where}: not a number: {value!r}") from None
    if not np.isfinite(out):
        raise UserError(f"{where}: not finite: {value!r}")
    return out


def read_indexed_table(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """RegMix's layout: an `index` column, then one numeric column per domain (or per loss)."""
    header, rows = read_csv(path)
    if header[0] != "index" or len(header) < 2:
        raise UserError(f"{path}: first column must be 'index', then one column per domain or loss")
    if len(set(header)) != len(header):
        raise UserError(f"{path}: duplicate column names")
    index, values = [], np.zeros((len(rows), len(header) - 1))
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise UserError(f"{path}: line {i + 2} has {len(row)} fields, expected {len(header)}")
        index.append(row[0])
        values[i] = [to_float(v, f"{path} line {i + 2}") for v in row[1:]]
    if len(set(index)) != len(index):
        raise UserError(f"{path}: duplicate index values")
    return header[1:], index, values


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 else float("nan")


# ---------------------------------------------------------------- the regression table

@dataclass
class Table:
    """Rows for the regressions. Target j's model sees `features` (+ `loss_start` = state[:, j] if has_state)."""
    mode: str                 # "static" | "trajectory"
    domains: list[str]
    targets: list[str]
    features: list[str]       # common feature names (without the loss state)
    X: np.ndarray             # [rows, features]
    state: np.ndarray | None  # [rows, targets] each target's loss at the transition start (NaN: unknown)
    Y: np.ndarray             # [rows, targets]
    runs: np.ndarray          # [rows] run id (the CV group)
    stage: np.ndarray         # [rows] transition index l (0 in static mode)
    stages: int               # K (1 in static mode)
    grid: list = field(default_factory=lambda: [1.0])  # t_1..t_K, fractions of the run (static: [1.0])
    initial_loss: dict = field(default_factory=dict)  # target → mean loss at t_1 over proxies (rollout start)
    mean_mixture: list = field(default_factory=list)   # the proxies' mean mixture (a prior choice)
    proxies: int = 0
    data_sha256: str = ""
    predict_drop: bool = False  # models learn the change over the transition (label − loss_start)
    model: str = "reference"    # "reference" (the paper; static) | "first-drop" (see megatron_ext.surrogate)
    run_losses: dict = field(default_factory=dict)  # run → losses at t_1..t_K [K, targets] (trajectory)
    schedules: dict = field(default_factory=dict)   # run → (stage starts [S], weights [S, D]) (trajectory)

    @property
    def has_state(self) -> bool:
        return self.state is not None

    def design(self, j: int, rows=slice(None)) -> np.ndarray:
        """The model input of target j."""
        if self.state is None:
            return self.X[rows]
        return np.hstack([self.X[rows], self.state[rows, j:j + 1]])

    def label(self, j: int, rows=slice(None)) -> np.ndarray:
        """What target j's model learns: the loss at the transition end, or its change with predict_drop
        (first-drop: the change wherever the start loss is known, the loss itself on first-segment rows)."""
        if self.model == "first-drop":
            state = self.state[rows, j]
            return np.where(np.isnan(state), self.Y[rows, j], self.Y[rows, j] - state)
        return self.Y[rows, j] - self.state[rows, j] if self.predict_drop else self.Y[rows, j]

    def feature_names(self) -> list[str]:
        return self.features + (["loss_start"] if self.has_state else [])


def static_table(mixtures_csv: str, losses_csv: str, targets=None) -> Table:
    """RegMix static pair: rows joined on `index`; every loss column (or `targets`) is a target."""
    domains, mix_index, W = read_indexed_table(mixtures_csv)
    loss_names, loss_index, L = read_indexed_table(losses_csv)
    position = {k: i for i, k in enumerate(loss_index)}
    missing = [k for k in mix_index if k not in position]
    if missing:
        raise UserError(f"{losses_csv}: no row for index {missing[0]} of {mixtures_csv}")
    L = L[[position[k] for k in mix_index]]
    if targets:
        unknown = [t for t in targets if t not in loss_names]
        if unknown:
            raise UserError(f"{losses_csv}: no column {unknown[0]!r}")
        L = L[:, [loss_names.index(t) for t in targets]]
        loss_names = list(targets)
    if (W < 0).any():
        raise UserError(f"{mixtures_csv}: negative mixture weight")
    n = len(mix_index)
    return Table(mode="static", domains=domains, targets=loss_names, features=list(domains), X=W, state=None,
                 Y=L, runs=np.array(mix_index), stage=np.zeros(n, int), stages=1,
                 mean_mixture=(W / W.sum(1, keepdims=True)).mean(0).tolist(), proxies=n,
                 data_sha256=sha256_files([mixtures_csv, losses_csv]))


@dataclass
class TrajectoryFeatures:
    """Which features a trajectory model gets (reference = the paper: progress, mixture, loss state)."""
    loss_state: bool = True     # the target's own loss at the transition start (paper: yes)
    history: bool = False       # cumulative domain shares over [0, t_l) (ours; constant on static proxies)
    first_stage: bool = False   # add the 0 → t_1 transition (loss state unknown = NaN) so stage 0 can be searched
    predict_drop: bool = False  # learn the loss change over the transition instead of the loss (needs loss_state)


def read_sweep(sweep_dir: str) -> tuple[dict, dict, list[str]]:
    """trajectories.csv + mixtures.csv → ({run: (progress[E], losses[E, D], target[E])}, {run: (starts, W)}, domains)."""
    traj_path = os.path.join(sweep_dir, "trajectories.csv")
    mix_path = os.path.join(sweep_dir, "mixtures.csv")
    header, rows = read_csv(traj_path)
    need = ["run", "iteration", "tokens", "progress", "stage", "domain", "loss", "target"]
    if header != need:
        raise UserError(f"{traj_path}: header must be {','.join(need)}")
    evals: dict = {}
    domains: list[str] = []
    for i, row in enumerate(rows):
        if len(row) != len(need):
            raise UserError(f"{traj_path}: line {i + 2} has {len(row)} fields, expected {len(need)}")
        run, _, _, progress, _, domain, loss, target = row
        where = f"{traj_path} line {i + 2}"
        if domain not in domains:
            domains.append(domain)
        e = evals.setdefault(run, {}).setdefault(to_float(progress, where), [{}, None])
        e[0][domain] = to_float(loss, where)
        e[1] = to_float(target, where)
    header, rows = read_csv(mix_path)
    need_mix = ["run", "stage", "start", "domain", "weight"]
    if header != need_mix:
        raise UserError(f"{mix_path}: header must be {','.join(need_mix)}")
    mix: dict = {}
    for i, row in enumerate(rows):
        if len(row) != len(need_mix):
            raise UserError(f"{mix_path}: line {i + 2} has {len(row)} fields, expected {len(need_mix)}")
        run, stage, start, domain, weight = row
        where = f"{mix_path} line {i + 2}"
        if domain not in domains:
            raise UserError(f"{where}: domain {domain!r} has no losses in {traj_path}")
        w = to_float(weight, where)
        if w < 0:
            raise UserError(f"{where}: negative weight")
        mix.setdefault(run, {}).setdefault(int(to_float(stage, where)), [to_float(start, where), {}])[1][domain] = w
    trajectories, mixtures = {}, {}
    for run in sorted(evals):
        if run not in mix:
            raise UserError(f"{mix_path}: no mixture for run {run!r}")
        progress = np.array(sorted(evals[run]))
        for p in progress:
            if set(evals[run][p][0]) != set(domains):
                raise UserError(f"{traj_path}: run {run!r} at progress {p} lacks some domain losses")
        losses = np.array([[evals[run][p][0][d] for d in domains] for p in progress])
        target = np.array([evals[run][p][1] for p in progress])
        trajectories[run] = (progress, losses, target)
        stages = [mix[run][s] for s in sorted(mix[run])]
        starts = np.array([s[0] for s in stages])
        if starts[0] != 0 or (np.diff(starts) <= 0).any():
            raise UserError(f"{mix_path}: run {run!r}: stage starts must begin at 0 and increase")
        W = np.array([[s[1].get(d, 0.0) for d in domains] for s in stages])
        if (W.sum(1) <= 0).any():
            raise UserError(f"{mix_path}: run {run!r} has a stage whose weights are all 0")
        mixtures[run] = (starts, W / W.sum(1, keepdims=True))
    if not trajectories:
        raise UserError(f"{traj_path}: no evaluations")
    return trajectories, mixtures, domains


GRID_TOLERANCE = 1e-6  # |evaluation progress − grid point| that counts as "on the grid"


def check_grid(grid) -> np.ndarray:
    """t_1 < ... < t_K = 1, all in (0, 1], K >= 2."""
    grid = np.asarray(grid, float)
    if len(grid) < 2 or not np.isfinite(grid).all() or grid[0] <= 0 or (np.diff(grid) <= 0).any() \
            or abs(grid[-1] - 1) > GRID_TOLERANCE:
        raise UserError(f"--grid {','.join(f'{t:g}' for t in grid)}: needs at least 2 increasing fractions "
                        "in (0, 1], the last = 1")
    return grid


def parse_grid(text: str) -> list[float]:
    """The --grid flag of fit and search: comma-separated fractions."""
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--grid {text}: comma-separated fractions expected, e.g. 0.1,0.3,0.6,1") from None


def grid_points(progress: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Index of the evaluation at each grid point (|Δprogress| <= GRID_TOLERANCE), or None if one is missing."""
    nearest = np.abs(progress[None, :] - grid[:, None]).argmin(1)
    return nearest if (np.abs(progress[nearest] - grid) <= GRID_TOLERANCE).all() else None


def fitting_stages(progress_sets: list) -> list[int]:
    """Every K in 2..20 whose uniform grid l/K lies on every run's evaluations."""
    return [k for k in range(2, 21)
            if all(grid_points(p, np.arange(1, k + 1) / k) is not None for p in progress_sets)]


def trajectory_table(sweep_dir: str, stages: int | None = None, feats: TrajectoryFeatures = TrajectoryFeatures(),
                     targets=None, grid=None, model: str = "reference") -> Table:
    """The transition rows on the grid (`grid` t_1..t_K, or t_l = l/K for `stages` K): every run must have
    an evaluation exactly (|Δprogress| <= 1e-6) at every grid point; transition l goes t_l → t_{l+1}.

    model "first-drop" adds the first segment (0 → t_1, loss state NaN) and the history shares."""
    if grid is None:
        if stages is None or stages < 2:
            raise UserError("--stages must be >= 2 for a trajectory surrogate (one stage: fit static CSVs)")
        grid = np.arange(1, stages + 1) / stages
    grid = check_grid(grid)
    stages = len(grid)
    if model == "first-drop":
        if feats.predict_drop or feats.first_stage or not feats.loss_state:
            raise UserError("--predict-drop, --first-stage and --no-loss-state are variants of --model reference; "
                            "first-drop already models the first segment and the drop")
        feats = TrajectoryFeatures(history=True, first_stage=True)
    if feats.predict_drop and (feats.first_stage or not feats.loss_state):
        raise UserError("--predict-drop needs the loss state and cannot be combined with --first-stage "
                        "(the loss at progress 0 is unknown)")
    trajectories, mixtures, domains = read_sweep(sweep_dir)
    all_targets = ["target"] + domains
    targets = list(targets) if targets else all_targets
    unknown = [t for t in targets if t not in all_targets]
    if unknown:
        raise UserError(f"unknown target {unknown[0]!r}; known: {', '.join(all_targets)}")
    cols = [all_targets.index(t) for t in targets]
    names = feature_names(domains, "trajectory", feats.history)
    points = np.concatenate([[0.0], grid])
    X, S, Y, runs, stage = [], [], [], [], []
    run_losses = {}
    for run, (progress, losses, target) in trajectories.items():
        values = np.column_stack([target, losses])[:, cols]  # [evals, targets]
        at = grid_points(progress, grid)
        if at is None:
            missing = grid[[grid_points(progress, grid[i:i + 1]) is None for i in range(stages)]][0]
            near = np.sort(progress[np.argsort(np.abs(progress - missing))[:2]])
            fit = fitting_stages([p for p, _, _ in trajectories.values()])
            raise UserError(f"run {run!r} has no evaluation at progress {missing:.6g} of the grid "
                            f"{','.join(f'{t:.4g}' for t in grid)} (nearest: {', '.join(f'{p:.6g}' for p in near)}); "
                            f"--stages that fit every run: {', '.join(map(str, fit)) or 'none'}; "
                            "or --grid t_1,...,t_K at evaluated fractions")
        at = values[at]  # [K, targets]: losses at t_1..t_K
        starts, W = mixtures[run]
        run_losses[run] = at
        for l in range(0 if feats.first_stage else 1, stages):
            a, b = points[l], points[l + 1]
            history = piecewise_average(starts, W, 0.0, a) if l else None
            X.append(encode_features(names, domains, a, piecewise_average(starts, W, a, b)[None], history)[0])
            S.append(at[l - 1] if l else np.full(len(cols), np.nan))
            Y.append(at[l])
            runs.append(run)
            stage.append(l)
    mean_mix = np.mean([piecewise_average(*mixtures[r], 0.0, 1.0) for r in trajectories], axis=0)
    return Table(mode="trajectory", domains=domains, targets=targets, features=names, X=np.array(X),
                 state=np.array(S) if feats.loss_state else None, Y=np.array(Y), runs=np.array(runs),
                 stage=np.array(stage), stages=stages, grid=grid.tolist(),
                 initial_loss=dict(zip(targets, np.mean(list(run_losses.values()), axis=0)[0].tolist())),
                 mean_mixture=mean_mix.tolist(), proxies=len(trajectories), predict_drop=feats.predict_drop,
                 model=model, run_losses=run_losses, schedules=mixtures,
                 data_sha256=sha256_files([os.path.join(sweep_dir, "trajectories.csv"),
                                           os.path.join(sweep_dir, "mixtures.csv")]))


def proxy_nonembedding_params(sweep_dir: str) -> int | None:
    """The proxies' non-embedding parameter count from the sweep's runner.json (its launcher config and
    flags, parsed by the launcher's own parser); None when the sweep does not say (e.g. a custom command
    or CSVs without a sweep around them)."""
    from tools.sweep import RUNNER_JSON, RUNS, RunSettings, read_json, run_command, run_ids
    if read_json(os.path.join(sweep_dir, RUNNER_JSON)) is None:
        return None
    from megatron_ext.arguments import parse_args  # imports megatron-core: only when there is a runner.json
    try:
        settings = RunSettings.load(sweep_dir)
        if settings.config and not os.path.isabs(settings.config):
            settings.config = os.path.join(settings.cwd, settings.config)
        argv = run_command(settings, os.path.join(sweep_dir, RUNS, run_ids(sweep_dir)[0]))
        args = parse_args(argv[2:])  # argv: python, launcher, flags
    except (UserError, TypeError, IndexError, OSError):
        return None
    return nonembedding_parameters(args.num_layers, args.hidden_size, args.num_attention_heads,
                                   args.ffn_hidden_size, args.num_query_groups)


# ---------------------------------------------------------------- models

@dataclass
class LGBMSettings:
    """RegMix's notebook settings (gbdt, lr 1e-2, 1000 rounds, seed 42), made deterministic; no early stopping."""
    learning_rate: float = 0.01
    num_iterations: int = 1000
    num_leaves: int = 31
    min_data_in_leaf: int = 20
    seed: int = 42
    num_threads: int = 1

    def params(self) -> dict:
        return {"objective": "regression", "boosting_type": "gbdt", "learning_rate": self.learning_rate,
                "num_iterations": self.num_iterations, "num_leaves": self.num_leaves,
                "min_data_in_leaf": self.min_data_in_leaf, "seed": self.seed, "num_threads": self.num_threads,
                "deterministic": True, "force_col_wise": True, "verbosity": -1}


    def for_rows(self, rows: int) -> "LGBMSettings":
        """Settings for a fit on `rows` rows: min_data_in_leaf at most a tenth of them (at least 2), so a small
        sweep or a CV fold still grows trees (with 20 per leaf and < 40 rows LightGBM fits a constant)."""
        return replace(self, min_data_in_leaf=min(self.min_data_in_leaf, max(2, rows // 10)))


def fit_lgbm(X: np.ndarray, y: np.ndarray, settings: LGBMSettings):
    import lightgbm as lgb
    return lgb.train(settings.for_rows(len(y)).params(), lgb.Dataset(X, y, params={"verbosity": -1}))


@dataclass
class FitConfig:
    folds: int = 5
    cv_seed: int = 0
    ridge_alpha: float = 1.0
    lgbm: LGBMSettings = field(default_factory=LGBMSettings)


def grouped_folds(runs: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds over runs (all rows of a run land in the same test fold): list of (train rows, test rows)."""
    unique = np.unique(runs)
    if k < 2 or k > len(unique):
        raise UserError(f"--folds must be between 2 and the number of runs ({len(unique)}), got {k}")
    order = np.random.default_rng(seed).permutation(unique)
    fold_of = {run: i % k for i, run in enumerate(order)}
    fold = np.array([fold_of[r] for r in runs])
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)]


def metrics(pred: np.ndarray, obs: np.ndarray) -> dict:
    return {"spearman": spearman(pred, obs), "pearson": pearson(pred, obs),
            "mae": float(np.abs(pred - obs).mean()), "n": int(len(obs))}


def is_constant(pred: np.ndarray) -> bool:
    return len(pred) > 1 and float(np.ptp(pred)) <= 1e-12 * max(1.0, float(np.abs(pred).max()))


def fit_surrogate(table: Table, cfg: FitConfig, extra_meta: dict | None = None, rows=None,
                  strict: bool = True) -> Surrogate:
    """The table's model per target on `rows` (default: all), with the metadata the search and the controller
    read. A model that predicts one constant on its own training rows is a UserError when `strict`, else
    listed in meta["constant"] (cross-validation folds)."""
    rows = np.arange(len(table.Y)) if rows is None else np.asarray(rows)
    boosters, ridges, first_boosters, first_ridges, constant = {}, {}, {}, {}, []
    first = rows[table.stage[rows] == 0] if table.model == "first-drop" else rows[:0]
    later = rows[table.stage[rows] > 0] if table.model == "first-drop" else rows
    for j, target in enumerate(table.targets):
        if table.model == "first-drop":
            # ridge base + LightGBM on its residuals, for the first segment's loss and for each drop
            for part, part_rows, ridge_out, booster_out in (("first segment", first, first_ridges, first_boosters),
                                                            ("transitions", later, ridges, boosters)):
                X = table.X[part_rows] if part == "first segment" else table.design(j, part_rows)
                y = table.label(j, part_rows)
                ridge_out[target] = Ridge.fit(X, y, cfg.ridge_alpha, bounded=True)
                base = ridge_out[target].predict(X)
                booster_out[target] = fit_lgbm(X, y - base, cfg.lgbm)
                if is_constant(base + booster_out[target].predict(X)):
                    constant.append(f"{target} ({part}, {len(y)} rows)")
        else:
            X, y = table.design(j, rows), table.label(j, rows)
            boosters[target] = fit_lgbm(X, y, cfg.lgbm)
            ridges[target] = Ridge.fit(X, y, cfg.ridge_alpha)
            if is_constant(boosters[target].predict(X)):
                constant.append(f"{target} ({len(y)} rows)")
    if constant and strict:
        raise UserError(f"LightGBM fitted a constant model for {', '.join(constant)}: too few rows or labels "
                        "that do not vary; collect more proxies or lower --min-data-in-leaf")
    used = sorted(set(table.runs[rows].tolist()))
    initial = table.initial_loss
    if table.run_losses:  # the rollout's start: the mean loss at t_1 of the runs fitted on
        initial = dict(zip(table.targets, np.mean([table.run_losses[r][0] for r in used], axis=0).tolist()))
    min_leaf = {"first segment": cfg.lgbm.for_rows(len(first)).min_data_in_leaf,
                "transitions": cfg.lgbm.for_rows(len(later)).min_data_in_leaf}
    meta = {"version": 2, "mode": table.mode, "model": table.model, "domains": table.domains,
            "targets": table.targets, "features": table.feature_names(), "has_state": table.has_state,
            "predict_drop": table.predict_drop,
            "first_stage": bool((table.stage == 0).any()) and table.mode == "trajectory",
            "stages": table.stages, "grid": list(table.grid), "proxies": len(used), "rows": int(len(rows)),
            "initial_loss": initial, "mean_mixture": table.mean_mixture,
            "data_sha256": table.data_sha256, "lgbm": asdict(cfg.lgbm),
            "lgbm_min_data_in_leaf_used": min_leaf if table.model == "first-drop" else min_leaf["transitions"],
            "ridge_alpha": cfg.ridge_alpha, "proxy_nonembedding_params": None, "constant": constant,
            **(extra_meta or {})}
    return Surrogate(meta, boosters, ridges, first_boosters, first_ridges)


def static_features(table: Table, runs) -> np.ndarray:
    """Each run's token-weighted (time-averaged) mixture over the whole run: the static model's input."""
    return np.array([piecewise_average(*table.schedules[r], 0.0, 1.0) for r in runs])


def cross_validate(table: Table, cfg: FitConfig) -> dict:
    """Grouped K-fold CV (all of a run in one fold), the fitted model refitted per fold.

    Per target: one-step metrics of the model and its ridge baseline (overall and per transition); for
    trajectory tables also `persistence` (l_l + the training folds' mean drop of that transition),
    `rollout` (each held-out run's final loss, rolled out over its own schedule from the search's start)
    and `static` / `static_ridge` (a static LightGBM / ridge fit of the run's time-averaged mixture →
    final loss on the same folds)."""
    folds = grouped_folds(table.runs, cfg.folds, cfg.cv_seed)
    T = len(table.targets)
    oof = {kind: np.full(table.Y.shape, np.nan) for kind in MODEL_KINDS}
    persistence = np.full(table.Y.shape, np.nan)
    trajectory = table.mode == "trajectory"
    run_ids = sorted(table.run_losses)
    run_index = {r: i for i, r in enumerate(run_ids)}
    final = np.array([table.run_losses[r][-1] for r in run_ids]) if trajectory else None
    rollout = {kind: np.full((len(run_ids), T), np.nan) for kind in ("rollout", "static", "static_ridge")}
    constant_folds = {t: 0 for t in table.targets}
    for train, test in folds:
        s = fit_surrogate(table, cfg, rows=train, strict=False)
        for c in s.meta["constant"]:
            constant_folds[c.split(" (")[0]] += 1
        for j, target in enumerate(table.targets):
            state = table.state[test, j] if table.has_state else None
            for kind in MODEL_KINDS:
                oof[kind][test, j] = s.predict(target, table.X[test], state, kind)
        if not trajectory:
            continue
        later = train[table.stage[train] > 0]
        for l in np.unique(table.stage[test]):
            if l == 0:
                continue
            rows = test[table.stage[test] == l]
            drop = (table.Y[later] - table.state[later])[table.stage[later] == l].mean(0) if table.has_state else 0
            persistence[rows] = (table.state[rows] if table.has_state else np.nan) + drop
        train_runs, test_runs = sorted(set(table.runs[train])), sorted(set(table.runs[test]))
        Xs_train, Xs_test = static_features(table, train_runs), static_features(table, test_runs)
        idx_test = [run_index[r] for r in test_runs]
        for j, target in enumerate(table.targets):
            for r, i in zip(test_runs, idx_test):
                rollout["rollout"][i, j] = s.rollout(target, *table.schedules[r])[-1]
            y = final[[run_index[r] for r in train_runs], j]
            rollout["static"][idx_test, j] = fit_lgbm(Xs_train, y, cfg.lgbm).predict(Xs_test)
            rollout["static_ridge"][idx_test, j] = Ridge.fit(Xs_train, y, cfg.ridge_alpha).predict(Xs_test)
    report = {"folds": cfg.folds, "grouped_by": "run", "model": table.model, "targets": {}}
    for j, target in enumerate(table.targets):
        entry = {}
        for kind in MODEL_KINDS:
            entry[kind] = {"all": metrics(oof[kind][:, j], table.Y[:, j]),
                           "per_stage": {str(s): metrics(oof[kind][table.stage == s, j], table.Y[table.stage == s, j])
                                         for s in np.unique(table.stage)}}
        entry["constant_folds"] = constant_folds[target]
        if trajectory:
            known = ~np.isnan(persistence[:, j])
            entry["persistence"] = short_metrics(persistence[known, j], table.Y[known, j])
            entry["one_step"] = short_metrics(oof["lgbm"][known, j], table.Y[known, j])
            for kind in ("rollout", "static", "static_ridge"):
                entry[kind] = short_metrics(rollout[kind][:, j], final[:, j])
        report["targets"][target] = entry
    report["oof"] = {kind: oof[kind].tolist() for kind in MODEL_KINDS}
    return report


def short_metrics(pred: np.ndarray, obs: np.ndarray) -> dict:
    return {"spearman": spearman(pred, obs), "mae": float(np.abs(pred - obs).mean()) if len(obs) else float("nan"),
            "n": int(len(obs))}


def verdict(entry: dict) -> str:
    """One plain sentence: does the trajectory model's rollout rank held-out runs at least as well as static?"""
    r, s = entry["rollout"]["spearman"], entry["static"]["spearman"]
    if not np.isfinite(r) or not np.isfinite(s):
        return "too few runs to compare the rollout with the static fit"
    if r >= s:
        return f"the rollout ranks held-out runs at least as well as the static fit ({r:.4f} >= {s:.4f})"
    return f"the trajectory model does NOT beat the static fit: rollout Spearman {r:.4f} < static {s:.4f}"


def cv_markdown(report: dict) -> str:
    lines = [f"# Cross-validation ({report['folds']} folds grouped by run, model {report.get('model', 'reference')}, "
             "no early stopping)", ""]
    entries = report["targets"]
    if any("rollout" in e for e in entries.values()):
        lines += ["## Final loss of held-out runs (what the search ranks)", "",
                  "Rollout: each held-out run's own schedule rolled out from the search's start; static: its "
                  "time-averaged mixture → final loss (LightGBM, ridge) on the same folds. One step: the next "
                  "grid point's loss from the observed one, against persistence (observed + mean drop).", "",
                  "| target | rollout ρ | rollout MAE | static ρ | static MAE | static ridge ρ | one-step MAE "
                  "| persistence MAE | runs |", "|---|---|---|---|---|---|---|---|---|"]
        for target, e in entries.items():
            lines.append(f"| {target} | {e['rollout']['spearman']:.4f} | {e['rollout']['mae']:.4f} "
                         f"| {e['static']['spearman']:.4f} | {e['static']['mae']:.4f} "
                         f"| {e['static_ridge']['spearman']:.4f} | {e['one_step']['mae']:.4f} "
                         f"| {e['persistence']['mae']:.4f} | {e['rollout']['n']} |")
        lines.append("")
        lines += [f"- {target}: {verdict(e)}." for target, e in entries.items()]
        lines.append("")
    flagged = [f"{t} ({e['constant_folds']} of {report['folds']} folds)" for t, e in entries.items()
               if e["constant_folds"]]
    if flagged:
        lines += [f"**Warning: constant LightGBM models in CV folds for {', '.join(flagged)}: too few rows; "
                  "their metrics are not results.**", ""]
    lines += ["## One step (every row)", "", "| target | stage | model | spearman | pearson | MAE | n |",
              "|---|---|---|---|---|---|---|"]
    for target, entry in entries.items():
        for kind in MODEL_KINDS:
            rows = [("all", entry[kind]["all"])]
            if len(entry[kind]["per_stage"]) > 1:
                rows += sorted(entry[kind]["per_stage"].items(), key=lambda kv: int(kv[0]))
            for stage, m in rows:
                lines.append(f"| {target} | {stage} | {kind} | {m['spearman']:.4f} | {m['pearson']:.4f} "
                             f"| {m['mae']:.4f} | {m['n']} |")
    return "\n".join(lines) + "\n"


def plot_predicted_vs_observed(table: Table, report: dict, path: str) -> None:
    """One panel per target (up to 16): out-of-fold LightGBM and ridge predictions against observations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(len(table.targets), 16)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= n:
            ax.axis("off")
            continue
        obs = table.Y[:, j]
        for kind, color in (("ridge", "tab:gray"), ("lgbm", "tab:blue")):
            pred = np.asarray(report["oof"][kind])[:, j]
            rho = report["targets"][table.targets[j]][kind]["all"]["spearman"]
            ax.scatter(obs, pred, s=4, alpha=0.5, color=color, label=f"{kind} ρ={rho:.3f}")
        lo, hi = float(np.min(obs)), float(np.max(obs))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(table.targets[j][-40:], fontsize=8)
        ax.set_xlabel("observed", fontsize=7)
        ax.set_ylabel("predicted (out of fold)", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
