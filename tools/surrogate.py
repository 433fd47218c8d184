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
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_ext.atomic import atomic_path, atomic_write
from megatron_ext.errors import UserError
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


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


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


def _piecewise_average(starts: np.ndarray, weights: np.ndarray, a: float, b: float) -> np.ndarray:
    """Time-average of a piecewise-constant mixture (stage starts, rows of weights) over [a, b)."""
    ends = np.append(starts[1:], np.inf)
    overlap = np.clip(np.minimum(ends, b) - np.maximum(starts, a), 0, None)
    return overlap @ weights / (b - a)


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
    names = ["progress"] + [f"w:{d}" for d in domains] + ([f"cum:{d}" for d in domains] if feats.history else [])
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
            row = [a, *_piecewise_average(starts, W, a, b)]
            if feats.history:
                row += list(_piecewise_average(starts, W, 0.0, a) if l else _piecewise_average(starts, W, a, b))
            X.append(row)
            S.append(at[l - 1] if l else np.full(len(cols), np.nan))
            Y.append(at[l])
            runs.append(run)
            stage.append(l)
    mean_mix = np.mean([_piecewise_average(*mixtures[r], 0.0, 1.0) for r in trajectories], axis=0)
    return Table(mode="trajectory", domains=domains, targets=targets, features=names, X=np.array(X),
                 state=np.array(S) if feats.loss_state else None, Y=np.array(Y), runs=np.array(runs),
                 stage=np.array(stage), stages=stages,
                 initial_loss=dict(zip(targets, np.mean(first, axis=0).tolist())), mean_mixture=mean_mix.tolist(),
                 proxies=len(trajectories), predict_drop=feats.predict_drop,
                 data_sha256=sha256_files([os.path.join(sweep_dir, "trajectories.csv"),
                                           os.path.join(sweep_dir, "mixtures.csv")]))


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
class Ridge:
    """Standardized closed-form ridge; NaN inputs (an unknown loss state) are replaced by the training mean."""
    mean: list
    scale: list
    coef: list
    intercept: float

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, alpha: float) -> "Ridge":
        mean = np.nan_to_num(np.nanmean(X, 0)) if len(X) else np.zeros(X.shape[1])
        Z = np.where(np.isnan(X), mean, X) - mean
        scale = Z.std(0)
        scale[scale == 0] = 1.0
        Z /= scale
        coef = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (y - y.mean()))
        return cls(mean.tolist(), scale.tolist(), coef.tolist(), float(y.mean()))

    def predict(self, X: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean)
        Z = (np.where(np.isnan(X), mean, X) - mean) / np.asarray(self.scale)
        return Z @ np.asarray(self.coef) + self.intercept


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

class Surrogate:
    """Fitted models per target plus the metadata the search needs (domains, features, stages, prior data)."""

    def __init__(self, meta: dict, boosters: dict, ridges: dict):
        self.meta, self.boosters, self.ridges = meta, boosters, ridges
        self.threads = 1  # LightGBM prediction threads (the search raises it)

    @property
    def domains(self) -> list[str]:
        return self.meta["domains"]

    @property
    def targets(self) -> list[str]:
        return self.meta["targets"]

    @property
    def stages(self) -> int:
        return self.meta["stages"]

    @classmethod
    def fit(cls, table: Table, cfg: FitConfig, extra_meta: dict | None = None) -> "Surrogate":
        boosters, ridges = {}, {}
        for j, target in enumerate(table.targets):
            X = table.design(j)
            boosters[target] = fit_lgbm(X, table.label(j), cfg.lgbm)
            ridges[target] = Ridge.fit(X, table.label(j), cfg.ridge_alpha)
        meta = {"version": 1, "mode": table.mode, "domains": table.domains, "targets": table.targets,
                "features": table.feature_names(), "has_state": table.has_state,
                "predict_drop": table.predict_drop,
                "first_stage": bool((table.stage == 0).any()) and table.mode == "trajectory",
                "stages": table.stages, "proxies": table.proxies, "rows": int(len(table.Y)),
                "initial_loss": table.initial_loss, "mean_mixture": table.mean_mixture,
                "data_sha256": table.data_sha256, "lgbm": asdict(cfg.lgbm),
                "ridge_alpha": cfg.ridge_alpha, **(extra_meta or {})}
        return cls(meta, boosters, ridges)

    def predict(self, target: str, X: np.ndarray, state: np.ndarray | None = None, kind: str = "lgbm") -> np.ndarray:
        """X: common features [n, F]; state: the target's loss at the start (trajectory surrogates with a state)."""
        if target not in self.targets:
            raise UserError(f"the surrogate has no target {target!r}; it has: {', '.join(self.targets)}")
        if self.meta["has_state"]:
            state = np.broadcast_to(np.asarray(state, float).reshape(-1), (len(X),))
            X = np.hstack([X, state[:, None]])
        if kind == "lgbm":
            out = self.boosters[target].predict(X, num_threads=self.threads)
        else:
            out = self.ridges[target].predict(X)
        return out + state if self.meta.get("predict_drop") else out

    def save(self, out: str) -> None:
        """Models first, meta.json last (its presence marks a complete surrogate); every file atomically."""
        os.makedirs(out, exist_ok=True)
        files = []
        for i, target in enumerate(self.targets):
            name = f"lgbm_{i:02d}.txt"
            atomic_write(os.path.join(out, name), self.boosters[target].model_to_string())
            files.append(name)
        ridges = {t: asdict(r) for t, r in self.ridges.items()}
        atomic_write(os.path.join(out, "ridge.json"), json.dumps(ridges, indent=1))
        meta = dict(self.meta, model_files=files)
        atomic_write(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
        self.meta = meta

    @classmethod
    def load(cls, folder: str) -> "Surrogate":
        import lightgbm as lgb
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{folder}: not a surrogate folder (no meta.json)")
        with open(meta_path) as f:
            meta = json.load(f)
        with open(os.path.join(folder, "ridge.json")) as f:
            ridges = {t: Ridge(**r) for t, r in json.load(f).items()}
        boosters = {t: lgb.Booster(model_file=os.path.join(folder, name))
                    for t, name in zip(meta["targets"], meta["model_files"])}
        surrogate = cls(meta, boosters, ridges)
        surrogate.meta["sha256"] = sha256_files([meta_path, os.path.join(folder, "ridge.json")] +
                                                [os.path.join(folder, n) for n in meta["model_files"]])
        return surrogate


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
