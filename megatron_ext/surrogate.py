"""The fitted mixture surrogate, as the offline search and the online controller query it.

A surrogate folder (written by `tools.fit`) holds one LightGBM model per target plus a ridge baseline
and `meta.json`. Two modes:
- static (RegMix): mixture → loss at the end of the run;
- trajectory (RegMix-D): on the grid t_1 < ... < t_K = 1 (`meta["grid"]`), the transition
  (progress t_l, the mixture over [t_l, t_{l+1}), [cumulative shares over [0, t_l)], [the target's own
  loss at t_l]) → the target's loss at t_{l+1}.

The feature encoding lives here once (`encode_features`): `tools.surrogate` builds the training
table with it and the search / controller build their queries with it, so both see the same columns.
Fitting and cross-validation live in `tools.surrogate`.
"""
import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from megatron_ext.atomic import atomic_write
from megatron_ext.errors import UserError


# ---------------------------------------------------------------- the feature encoding

def piecewise_average(starts, weights, a: float, b: float) -> np.ndarray:
    """Time-average over [a, b) of a piecewise-constant mixture (stage starts [S], weights [S, D])."""
    starts = np.asarray(starts, float)
    ends = np.append(starts[1:], np.inf)
    overlap = np.clip(np.minimum(ends, b) - np.maximum(starts, a), 0, None)
    return overlap @ np.asarray(weights, float) / (b - a)


def feature_names(domains, mode: str, history: bool = False) -> list[str]:
    """The common feature columns (without the loss state): static = the mixture; trajectory adds progress
    first and, with `history`, the cumulative shares."""
    if mode == "static":
        return list(domains)
    return ["progress"] + [f"w:{d}" for d in domains] + ([f"cum:{d}" for d in domains] if history else [])


def encode_features(names, domains, progress: float | np.ndarray, W: np.ndarray,
                    history: np.ndarray | None) -> np.ndarray:
    """Rows of common features, in `names`' order, for mixtures W [n, D] over the segment starting at `progress`.

    `history` is the cumulative (time-averaged) mixture over [0, progress): one vector [D] shared by all
    rows, or [n, D]; None before any stage (progress 0), where the history is taken to be the segment's own
    mixture. A static surrogate's names are the domains themselves."""
    W = np.asarray(W, float)
    n = len(W)
    index = {d: i for i, d in enumerate(domains)}
    hist = W if history is None else np.broadcast_to(np.asarray(history, float), W.shape)
    cols = []
    for name in names:
        kind, _, domain = name.partition(":")
        if name == "progress":
            cols.append(np.broadcast_to(np.asarray(progress, float), (n,)))
        elif kind == "w" and domain in index:
            cols.append(W[:, index[domain]])
        elif kind == "cum" and domain in index:
            cols.append(hist[:, index[domain]])
        elif name in index:  # static: the mixture weight itself
            cols.append(W[:, index[name]])
        else:
            raise UserError(f"unknown surrogate feature {name!r}")
    return np.column_stack(cols) if cols else np.zeros((n, 0))


def nonembedding_parameters(num_layers: int, hidden_size: int, num_attention_heads: int, ffn_hidden_size: int,
                            num_query_groups: int | None = None, kv_channels: int | None = None) -> int:
    """Non-embedding parameters of the launcher's LLaMA-like GPTModel (no biases, SwiGLU, RMSNorm):
    what the online controller's (P_target / P_proxy)^beta loss scaling compares."""
    groups = num_query_groups or num_attention_heads
    d = kv_channels or hidden_size // num_attention_heads
    attention = hidden_size * (num_attention_heads + 2 * groups) * d + num_attention_heads * d * hidden_size
    mlp = hidden_size * 2 * ffn_hidden_size + ffn_hidden_size * hidden_size
    return num_layers * (attention + mlp + 2 * hidden_size) + hidden_size


# ---------------------------------------------------------------- models

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


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


class Surrogate:
    """Fitted models per target plus the metadata the search needs (domains, grid, features, prior data).

    meta keys the search and the controller read: mode, domains, targets, objective, features, has_state,
    predict_drop, first_stage, stages (K), grid ([t_1..t_K], fractions of the run; static: [1.0]),
    initial_loss ({target: the proxies' mean loss at t_1}), mean_mixture, proxies,
    proxy_nonembedding_params (int or None)."""

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

    @property
    def grid(self) -> list[float]:
        """The evaluation points t_1..t_K (fractions of the run); stage j spans [t_j, t_{j+1}), t_0 = 0."""
        return self.meta.get("grid") or [(l + 1) / self.stages for l in range(self.stages)]

    @property
    def stage_starts(self) -> list[float]:
        """Where each of the K stages starts: 0, t_1, ..., t_{K-1}."""
        return [0.0] + list(self.grid[:-1])

    @property
    def common_features(self) -> list[str]:
        return [n for n in self.meta["features"] if n != "loss_start"]

    def encode(self, progress, W: np.ndarray, history: np.ndarray | None) -> np.ndarray:
        return encode_features(self.common_features, self.domains, progress, W, history)

    def predict(self, target: str, X: np.ndarray, state=None, kind: str = "lgbm") -> np.ndarray:
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

    def predict_next(self, target: str, progress: float, W: np.ndarray, history: np.ndarray | None,
                     state=None, kind: str = "lgbm") -> np.ndarray:
        """The target's loss at the grid point after `progress` for mixtures W [n, D] run from `progress`,
        given the cumulative mixture `history` over [0, progress) and the loss `state` at `progress`
        (NaN: unknown). Static surrogates ignore progress, history and state."""
        return self.predict(target, self.encode(progress, W, history), state, kind)

    def start_state(self, targets=None) -> dict:
        """The offline rollout's loss at t_1 per target: the proxies' mean (the paper); NaN when the
        surrogate models stage 0 itself (`first_stage`: the search starts at progress 0, loss unknown)."""
        targets = targets or self.targets
        if self.meta.get("first_stage"):
            return {t: float("nan") for t in targets}
        return {t: float(self.meta["initial_loss"].get(t, np.nan)) for t in targets}

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
