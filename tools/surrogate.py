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
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_ext.atomic import atomic_path
from megatron_ext.errors import UserError
from megatron_ext.surrogate import (Ridge, Surrogate, encode_features, feature_names, piecewise_average,
                                    sha256_files)

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
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
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

    @property
    def has_state(self) -> bool:
        return self.state is not None

    def design(self, j: int, rows=slice(None)) -> np.ndarray:
        """The model input of target j."""
        if self.state is None:
            return self.X[rows]
        return np.hstack([self.X[rows], self.state[rows, j:j + 1]])

    def label(self, j: int, rows=slice(None)) -> np.ndarray:
        """What target j's model learns: the loss at the transition end, or its change with predict_drop."""
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


def trajectory_table(sweep_dir: str, stages: int, feats: TrajectoryFeatures = TrajectoryFeatures(),
                     targets=None) -> Table:
    """The transition rows on the grid t_l = l/K (each run's evaluation nearest to it, within 1/(4K))."""
    if stages < 2:
        raise UserError("--stages must be >= 2 for a trajectory surrogate (one stage: fit static CSVs)")
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
    grid = np.arange(1, stages + 1) / stages
    names = feature_names(domains, "trajectory", feats.history)
    X, S, Y, runs, stage = [], [], [], [], []
    first = []
    for run, (progress, losses, target) in trajectories.items():
        values = np.column_stack([target, losses])[:, cols]  # [evals, targets]
        nearest = np.abs(progress[None, :] - grid[:, None]).argmin(1)
        off = np.abs(progress[nearest] - grid)
        if (off > 0.25 / stages).any():
            raise UserError(f"run {run!r} has no evaluation near progress {grid[off.argmax()]:.4g} "
                            f"(needed for {stages} stages)")
        at = values[nearest]  # [K, targets]: losses at t_1..t_K
        starts, W = mixtures[run]
        first.append(at[0])
        for l in range(0 if feats.first_stage else 1, stages):
            a, b = l / stages, (l + 1) / stages
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
                 initial_loss=dict(zip(targets, np.mean(first, axis=0).tolist())), mean_mixture=mean_mix.tolist(),
                 proxies=len(trajectories), predict_drop=feats.predict_drop,
                 data_sha256=sha256_files([os.path.join(sweep_dir, "trajectories.csv"),
                                           os.path.join(sweep_dir, "mixtures.csv")]))


def proxy_nonembedding_params(sweep_dir: str) -> int | None:
    """The proxies' non-embedding parameter count from the sweep's runner.json (its launcher config and
    flags, parsed by the launcher's own parser); None when the sweep does not say (e.g. a custom command
    or CSVs without a sweep around them)."""
    from megatron_ext.arguments import parse_args
    from megatron_ext.surrogate import nonembedding_parameters
    from tools.sweep import RUNNER_JSON, RUNS, RunSettings, read_json, run_command, run_ids
    if read_json(os.path.join(sweep_dir, RUNNER_JSON)) is None:
        return None
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


def fit_lgbm(X: np.ndarray, y: np.ndarray, settings: LGBMSettings):
    import lightgbm as lgb
    return lgb.train(settings.params(), lgb.Dataset(X, y, params={"verbosity": -1}))


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


def cross_validate(table: Table, cfg: FitConfig) -> dict:
    """Out-of-fold predictions of both model kinds; metrics per target, overall and per transition."""
    folds = grouped_folds(table.runs, cfg.folds, cfg.cv_seed)
    oof = {kind: np.full(table.Y.shape, np.nan) for kind in MODEL_KINDS}
    for train, test in folds:
        for j in range(len(table.targets)):
            Xtr, Xte = table.design(j, train), table.design(j, test)
            offset = table.state[test, j] if table.predict_drop else 0.0  # metrics are on losses either way
            oof["lgbm"][test, j] = fit_lgbm(Xtr, table.label(j, train), cfg.lgbm).predict(Xte) + offset
            oof["ridge"][test, j] = Ridge.fit(Xtr, table.label(j, train), cfg.ridge_alpha).predict(Xte) + offset
    report = {"folds": cfg.folds, "grouped_by": "run", "targets": {}}
    for j, target in enumerate(table.targets):
        entry = {}
        for kind in MODEL_KINDS:
            entry[kind] = {"all": metrics(oof[kind][:, j], table.Y[:, j]),
                           "per_stage": {str(s): metrics(oof[kind][table.stage == s, j], table.Y[table.stage == s, j])
                                         for s in np.unique(table.stage)}}
        report["targets"][target] = entry
    report["oof"] = {kind: oof[kind].tolist() for kind in MODEL_KINDS}
    return report


def cv_markdown(report: dict) -> str:
    lines = [f"# Cross-validation ({report['folds']} folds grouped by run, no early stopping)", "",
             "| target | stage | model | spearman | pearson | MAE | n |", "|---|---|---|---|---|---|---|"]
    for target, entry in report["targets"].items():
        for kind in MODEL_KINDS:
            rows = [("all", entry[kind]["all"])]
            if len(entry[kind]["per_stage"]) > 1:
                rows += sorted(entry[kind]["per_stage"].items(), key=lambda kv: int(kv[0]))
            for stage, m in rows:
                lines.append(f"| {target} | {stage} | {kind} | {m['spearman']:.4f} | {m['pearson']:.4f} "
                             f"| {m['mae']:.4f} | {m['n']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the fitted surrogate

def fit_surrogate(table: Table, cfg: FitConfig, extra_meta: dict | None = None) -> Surrogate:
    """LightGBM + ridge per target on the whole table, with the metadata the search and controller read."""
    boosters, ridges = {}, {}
    for j, target in enumerate(table.targets):
        X = table.design(j)
        boosters[target] = fit_lgbm(X, table.label(j), cfg.lgbm)
        ridges[target] = Ridge.fit(X, table.label(j), cfg.ridge_alpha)
    meta = {"version": 1, "mode": table.mode, "domains": table.domains, "targets": table.targets,
            "features": table.feature_names(), "has_state": table.has_state,
            "predict_drop": table.predict_drop,
            "first_stage": bool((table.stage == 0).any()) and table.mode == "trajectory",
            "stages": table.stages, "grid": list(table.grid), "proxies": table.proxies, "rows": int(len(table.Y)),
            "initial_loss": table.initial_loss, "mean_mixture": table.mean_mixture,
            "data_sha256": table.data_sha256, "lgbm": asdict(cfg.lgbm),
            "ridge_alpha": cfg.ridge_alpha, "proxy_nonembedding_params": None, **(extra_meta or {})}
    return Surrogate(meta, boosters, ridges)


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
