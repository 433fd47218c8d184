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
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from megatron_ext.atomic import atomic_path, atomic_write
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
    """Standardized closed-form ridge; NaN inputs (an unknown loss state) are replaced by the training mean.

    With `bounded`, inputs are clipped to the training rows' range before predicting: a linear model
    fitted on a few proxies otherwise extrapolates without limit (a domain weight that barely varied in
    training is many standard deviations out for a new mixture); trees never leave the range."""
    mean: list
    scale: list
    coef: list
    intercept: float
    low: list | None = None
    high: list | None = None

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, alpha: float, bounded: bool = False) -> "Ridge":
        mean = np.nan_to_num(np.nanmean(X, 0)) if len(X) else np.zeros(X.shape[1])
        filled = np.where(np.isnan(X), mean, X)
        Z = filled - mean
        scale = Z.std(0)
        scale[scale == 0] = 1.0
        Z /= scale
        coef = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (y - y.mean()))
        low, high = (filled.min(0).tolist(), filled.max(0).tolist()) if bounded and len(X) else (None, None)
        return cls(mean.tolist(), scale.tolist(), coef.tolist(), float(y.mean()), low, high)

    def predict(self, X: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean)
        X = np.where(np.isnan(X), mean, X)
        if self.low is not None:
            X = np.clip(X, self.low, self.high)
        return (X - mean) / np.asarray(self.scale) @ np.asarray(self.coef) + self.intercept


MODELS = ("first-drop", "reference")


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


# ---------------------------------------------------------------- compiled prediction

COMPILED = "compiled"           # the surrogate folder's subfolder of lleaves objects (one per model file and host)
# lleaves' defaults without inlining: about 8-10x LightGBM's predict for ~15 CPU-s of compiling per 1000-tree
# model (inlining: 2.4-4.3x faster rows for ~55 CPU-s; docs/BENCHMARKS.md). Trees are summed in blocks of 34, so
# sums differ from LightGBM's in the last bits (1e-14), while one block (bit-identical) is only ~3x
LLEAVES_OPTIONS = {"finline": False, "fblocksize": 34}
COMPILE_AFTER_ROWS = 250_000    # LightGBM rows of one model after which compiling it pays off (ski rental)
PROBE_ROWS = 256                # rows checked against LightGBM before a compiled model is used
PROBE_TOLERANCE = 1e-9


def compile_host() -> dict | None:
    """What a compiled object depends on besides its model (versions, target, CPU); None without lleaves."""
    try:
        from importlib.metadata import version

        import llvmlite.binding as llvm
        llvm.initialize()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        try:
            features = llvm.get_host_cpu_features().flatten()
        except RuntimeError:
            features = ""
        return {"lleaves": version("lleaves"), "llvmlite": version("llvmlite"), "triple": llvm.get_process_triple(),
                "cpu": llvm.get_host_cpu_name(), "features": features, "options": LLEAVES_OPTIONS}
    except ImportError:
        return None


def probe_rows(model_file: str, n_features: int) -> np.ndarray:
    """Deterministic rows spread over each feature's training range (the model file's `feature_infos`)."""
    ranges = []
    with open(model_file) as f:
        for line in f:
            if line.startswith("feature_infos="):
                ranges = line.split("=", 1)[1].split()
            if line.startswith("Tree="):
                break
    rng = np.random.default_rng(0)
    X = np.zeros((PROBE_ROWS, n_features))
    for j, info in enumerate(ranges[:n_features]):
        if info.startswith("[") and ":" in info:
            lo, hi = (float(v) for v in info[1:-1].split(":"))
            X[:, j] = rng.uniform(lo, hi, PROBE_ROWS)
    return X


class CompiledModel:
    """One LightGBM model file as lleaves machine code for this host, cached in `folder/compiled/` under a key of
    the model's sha256 and `compile_host()`. A model is used only if its object's sha256 matches its record and
    its predictions match LightGBM's within PROBE_TOLERANCE on probe rows; otherwise LightGBM predicts."""

    def __init__(self, model, path: str):
        self.model, self.path = model, path

    def predict(self, X: np.ndarray, threads: int) -> np.ndarray:
        return self.model.predict(X, n_jobs=threads)

    @staticmethod
    def cache_paths(folder: str, name: str, model_sha256: str, host: dict) -> tuple[str, str, str]:
        """(object, record, key) for model file `name`: one object per model and host, side by side."""
        key = hashlib.sha256(json.dumps({"model": model_sha256, **host}, sort_keys=True).encode()).hexdigest()
        stem = os.path.join(folder, COMPILED, f"{os.path.splitext(name)[0]}.{key[:16]}")
        return stem + ".o", stem + ".json", key

    @classmethod
    def load(cls, folder: str, name: str, model_sha256: str, booster, host: dict) -> "CompiledModel | None":
        """The cached object, or None: absent (silently), or stale or damaged (with a note)."""
        obj, record, key = cls.cache_paths(folder, name, model_sha256, host)
        if not os.path.isfile(record):
            return None
        try:
            with open(record) as f:
                info = json.load(f)
            ok = info["key"] == key and os.path.isfile(obj) and sha256_file(obj) == info["object_sha256"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            ok = False
        if not ok:
            print(f"note: {obj}: the compiled model does not match its record {record}; LightGBM predicts",
                  file=sys.stderr)
            return None
        return cls.checked(cls.lleaves(os.path.join(folder, name), obj), obj, os.path.join(folder, name), booster)

    @classmethod
    def build(cls, folder: str, name: str, model_sha256: str, booster, host: dict) -> "CompiledModel | None":
        """Compile the model file and cache the object (kept in memory only when the folder is read-only)."""
        obj, record, key = cls.cache_paths(folder, name, model_sha256, host)
        source = os.path.join(folder, name)
        try:
            with atomic_path(obj, suffix=".o") as tmp:
                os.unlink(tmp)  # lleaves writes its object only to a path where no file exists
                model = cls.lleaves(source, tmp)
                digest = sha256_file(tmp)
            atomic_write(record, json.dumps({"key": key, "object_sha256": digest, "model": name, "host": host},
                                            indent=1))
        except UserError as exc:
            print(f"note: {exc}; the compiled model is not cached", file=sys.stderr)
            model, obj = cls.lleaves(source, None), source
        return cls.checked(model, obj, source, booster)

    @staticmethod
    def lleaves(model_file: str, cache: str | None):
        import lleaves
        model = lleaves.Model(model_file=model_file)
        model.compile(cache=cache, **LLEAVES_OPTIONS)
        return model

    @classmethod
    def checked(cls, model, path: str, model_file: str, booster) -> "CompiledModel | None":
        """The model if it predicts LightGBM's values on probe rows, else None (with a note)."""
        X = probe_rows(model_file, booster.num_feature())
        diff = np.abs(model.predict(X, n_jobs=1) - booster.predict(X, num_threads=1)).max()
        if not diff <= PROBE_TOLERANCE:
            print(f"note: {path}: compiled predictions differ from LightGBM's by {diff:.3g}; LightGBM predicts",
                  file=sys.stderr)
            return None
        return cls(model, path)


class Surrogate:
    """Fitted models per target plus the metadata the search needs (domains, grid, features, prior data).

    meta keys the search and the controller read: mode, model, domains, targets, objective, features,
    has_state, predict_drop, first_stage, stages (K), grid ([t_1..t_K], fractions of the run; static:
    [1.0]), initial_loss ({target: the proxies' mean loss at t_1}), mean_mixture, proxies,
    proxy_nonembedding_params (int or None).

    Models (`meta["model"]`): `reference` (the paper, and every static surrogate): one LightGBM per
    target, l_{l+1} = f(t_l, m, [cum], l_l) (`boosters`; `ridges` is the ridge baseline beside it).
    `first-drop`: the loss at t_1 from the first segment's mixture (`first_ridges` + `first_boosters`
    on the ridge's residuals), then each transition's drop l_{l+1} − l_l (`ridges` + `boosters` on the
    residuals). Rows whose loss state is NaN (progress 0: nothing observed yet) go to the first model."""

    def __init__(self, meta: dict, boosters: dict, ridges: dict, first_boosters: dict | None = None,
                 first_ridges: dict | None = None):
        self.meta, self.boosters, self.ridges = meta, boosters, ridges
        self.first_boosters, self.first_ridges = first_boosters or {}, first_ridges or {}
        self.threads = 1  # prediction threads (the search raises it)
        self.folder = None  # where the model files are (set by save/load): compiled models are cached there
        self.compiled = {}  # {model file: CompiledModel, or None where compiling failed or is unavailable}
        self.lightgbm_rows = {}  # {model file: rows LightGBM predicted} (compiling pays off after COMPILE_AFTER_ROWS)

    @property
    def model(self) -> str:
        return self.meta.get("model", "reference")

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

    def model_file(self, target: str, first: bool = False) -> str:
        return f"{'first' if first else 'lgbm'}_{self.targets.index(target):02d}.txt"

    def model_files(self) -> dict:
        """{file name: LightGBM booster} in target order."""
        files = {}
        for target in self.targets:
            files[self.model_file(target)] = self.boosters[target]
            if self.first_boosters:
                files[self.model_file(target, first=True)] = self.first_boosters[target]
        return files

    def compile(self, names=None) -> dict:
        """Compile the model files `names` (default: all) for this host and cache them in the folder;
        {name: seconds} of those compiled now. Without lleaves or a folder (unsaved), LightGBM keeps predicting."""
        host = compile_host()
        files, took = self.model_files(), {}
        for name in names or files:
            if name in self.compiled:
                continue
            if host is None or self.folder is None:
                self.compiled[name] = None
                continue
            start = time.perf_counter()
            self.compiled[name] = CompiledModel.build(self.folder, name, self.meta["files_sha256"][name], files[name],
                                                      host)
            took[name] = time.perf_counter() - start
        return took

    def _lgbm(self, name: str, X: np.ndarray) -> np.ndarray:
        """Model file `name`'s prediction: compiled where it is, compiled on the call that takes LightGBM's rows
        for it past COMPILE_AFTER_ROWS (a search of that size pays the compile back), else LightGBM's."""
        if name not in self.compiled:
            self.lightgbm_rows[name] = self.lightgbm_rows.get(name, 0) + len(X)
            if self.lightgbm_rows[name] >= COMPILE_AFTER_ROWS:
                self.compile([name])
        compiled = self.compiled.get(name)
        if compiled is not None:
            return compiled.predict(X, self.threads)
        return self.model_files()[name].predict(X, num_threads=self.threads)

    def predict(self, target: str, X: np.ndarray, state=None, kind: str = "lgbm") -> np.ndarray:
        """X: common features [n, F]; state: the target's loss at the start ([n] or a scalar; NaN: unknown).

        kind "lgbm" is the fitted model; "ridge" its ridge baseline (first-drop: the ridge parts alone)."""
        if target not in self.targets:
            raise UserError(f"the surrogate has no target {target!r}; it has: {', '.join(self.targets)}")
        X = np.asarray(X, float)
        if self.model == "first-drop":
            state = np.broadcast_to(np.asarray(state, float).reshape(-1), (len(X),))
            first = np.isnan(state)
            out = np.empty(len(X))
            Xs = np.hstack([X, state[:, None]])
            if (~first).any():
                rows = Xs[~first]
                out[~first] = state[~first] + self.ridges[target].predict(rows) + (
                    self._lgbm(self.model_file(target), rows) if kind == "lgbm" else 0.0)
            if first.any():
                rows = X[first]
                out[first] = self.first_ridges[target].predict(rows) + (
                    self._lgbm(self.model_file(target, first=True), rows) if kind == "lgbm" else 0.0)
            return out
        if self.meta["has_state"]:
            state = np.broadcast_to(np.asarray(state, float).reshape(-1), (len(X),))
            X = np.hstack([X, state[:, None]])
        out = self._lgbm(self.model_file(target), X) if kind == "lgbm" else self.ridges[target].predict(X)
        return out + state if self.meta.get("predict_drop") else out

    def predict_next(self, target: str, progress: float, W: np.ndarray, history: np.ndarray | None,
                     state=None, kind: str = "lgbm") -> np.ndarray:
        """The target's loss at the grid point after `progress` for mixtures W [n, D] run from `progress`,
        given the cumulative mixture `history` over [0, progress) and the loss `state` at `progress`
        (NaN: unknown, e.g. at progress 0). Static surrogates ignore progress, history and state."""
        return self.predict(target, self.encode(progress, W, history), state, kind)

    def start_state(self, targets=None) -> dict:
        """Where the offline rollout starts: {target: loss at t_1} = the proxies' mean (the paper), or NaN
        at progress 0 when the surrogate models the first segment itself (the search then chooses it)."""
        targets = targets or self.targets
        if self.meta.get("first_stage"):
            return {t: float("nan") for t in targets}
        return {t: float(self.meta["initial_loss"].get(t, np.nan)) for t in targets}

    def rollout(self, target: str, starts, weights, kind: str = "lgbm") -> np.ndarray:
        """Predicted losses at t_1..t_K for one schedule (stage starts, weights [S, D]), each transition fed
        the loss predicted for its start, from `start_state` (what the offline search does)."""
        points = [0.0] + list(self.grid)
        loss = self.start_state([target])[target]
        out = []
        for l in range(len(self.grid)):
            a, b = points[l], points[l + 1]
            if l or self.meta.get("first_stage"):
                history = piecewise_average(starts, weights, 0.0, a) if l else None
                segment = piecewise_average(starts, weights, a, b)[None]
                loss = float(self.predict_next(target, a, segment, history, loss, kind)[0])
            out.append(loss)
        return np.array(out)

    # ------------------------------------------------------------ files

    def save(self, out: str) -> None:
        """Models first, meta.json last (its presence marks a complete surrogate); every file atomically.
        meta.json records each model file's sha256 and tree count, checked by `load`."""
        os.makedirs(out, exist_ok=True)
        boosters = self.model_files()
        files = {name: b.model_to_string() for name, b in boosters.items()}
        ridge_files = {"ridge.json": self.ridges}
        if self.first_ridges:
            ridge_files["first_ridge.json"] = self.first_ridges
        for name, text in files.items():
            atomic_write(os.path.join(out, name), text)
        for name, ridges in ridge_files.items():
            atomic_write(os.path.join(out, name), json.dumps({t: asdict(r) for t, r in ridges.items()}, indent=1))
        meta = dict(self.meta, model_files=[n for n in files if n.startswith("lgbm_")],
                    first_model_files=[n for n in files if n.startswith("first_")],
                    trees={n: boosters[n].num_trees() for n in files},
                    files_sha256={n: sha256_file(os.path.join(out, n)) for n in [*files, *ridge_files]})
        atomic_write(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
        self.meta, self.folder, self.compiled = meta, out, {}

    @classmethod
    def load(cls, folder: str) -> "Surrogate":
        """Read a surrogate folder; any missing, altered, truncated or unparsable file is one UserError."""
        import lightgbm as lgb
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{folder}: not a surrogate folder (no meta.json)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            sums = meta["files_sha256"]
            names = list(meta["model_files"]) + list(meta.get("first_model_files", []))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{meta_path}: not a surrogate's meta.json (unreadable, or written by an older "
                            "tools.fit without file checksums: refit)") from None
        unchecked = [n for n in names if n not in sums]
        if unchecked:
            raise UserError(f"{meta_path}: no sha256 for model file {unchecked[0]!r} (refit the surrogate)")
        for name, digest in sums.items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise UserError(f"{path}: missing (the surrogate folder is incomplete)")
            if sha256_file(path) != digest:
                raise UserError(f"{path}: sha256 differs from meta.json (the file was changed or truncated)")

        def ridges(name):
            with open(os.path.join(folder, name)) as f:
                return {t: Ridge(**r) for t, r in json.load(f).items()}

        def booster(name):
            path = os.path.join(folder, name)
            if name not in sums:
                raise UserError(f"{path}: no checksum in meta.json")
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
            # LightGBM aborts or segfaults on some damaged files and predicts 0.0 from a header alone:
            # check the structure before it parses anything
            trees = text.count("\nTree=")
            if trees != meta["trees"][name] or "end of trees" not in text:
                raise UserError(f"{path}: {trees} trees, meta.json says {meta['trees'][name]}, or no end of "
                                "trees: damaged model")
            try:
                b = lgb.Booster(model_str=text)
            except lgb.basic.LightGBMError as exc:
                raise UserError(f"{path}: not a LightGBM model ({str(exc).splitlines()[0]})") from None
            probe = b.predict(np.zeros((1, b.num_feature())), num_threads=1)
            if b.num_trees() != trees or not np.isfinite(probe).all():
                raise UserError(f"{path}: {b.num_trees()} trees parsed of {trees}, or a non-finite prediction: "
                                "damaged model")
            return b

        targets = meta["targets"]
        surrogate = cls(meta, {t: booster(n) for t, n in zip(targets, meta["model_files"])}, ridges("ridge.json"),
                        {t: booster(n) for t, n in zip(targets, meta.get("first_model_files", []))},
                        ridges("first_ridge.json") if "first_ridge.json" in sums else None)
        surrogate.meta["sha256"] = sha256_files([meta_path] + [os.path.join(folder, n) for n in sorted(sums)])
        surrogate.folder = folder
        host = compile_host()
        for name, b in surrogate.model_files().items() if host else ():
            compiled = CompiledModel.load(folder, name, sums[name], b, host)
            if compiled is not None:
                surrogate.compiled[name] = compiled
        return surrogate
