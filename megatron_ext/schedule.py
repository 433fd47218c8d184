"""The data-mixture schedule: one Megatron blend per training stage (`sched.json`).

A schedule is what Megatron-LM's `--per-split-data-args-path` accepts for the train split, once per
stage, with a stage start. It is the contract between the search (which writes it), the sweep
(one per proxy) and the launcher (which follows it through `ScheduledBlendedDataset`).
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from megatron_ext.atomic import atomic_write
from megatron_ext.errors import UserError
from megatron_ext.text_files import read_json_file, read_text

SCHEDULE_VERSION = 1
UNITS = ("fraction", "samples", "iterations", "tokens")
_TOP_KEYS = {"version", "unit", "stages", "valid", "provenance"}
_STAGE_KEYS = {"start", "train"}


class ScheduleError(UserError):
    """A malformed or inconsistent schedule (one line naming the stage and field)."""


def domain_name(prefix: str) -> str:
    """`data/tok/web_email_train_text_document` -> `web_email` (ARCHITECTURE.md, "Domain names")."""
    name = os.path.basename(prefix.rstrip("/"))
    for suffix in ("_text_document", "_train", "_valid"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


@dataclass
class Stage:
    """One stage: from `start` (in the schedule's unit) on, blend `prefixes` with relative `weights`."""
    start: float
    weights: list[float]
    prefixes: list[str]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parse_weight(raw, where: str) -> float:
    """A blend weight: a JSON number or a numeric string (Megatron's lists are strings)."""
    if not (_is_number(raw) or isinstance(raw, str)):
        raise ScheduleError(f"{where}: weight {raw!r} is not a number")
    try:
        w = float(raw)
    except ValueError:
        raise ScheduleError(f"{where}: weight {raw!r} is not a number") from None
    except OverflowError:
        raise ScheduleError(f"{where}: weight {raw!r} is not finite") from None
    if not math.isfinite(w):
        raise ScheduleError(f"{where}: weight {raw!r} is not finite")
    if w < 0:
        raise ScheduleError(f"{where}: weight {raw!r} is negative")
    return w


def parse_blend(blend, where: str, weights_required: bool = True) -> tuple[list[float], list[str]]:
    """Megatron's blend forms -> (weights, prefixes).

    Accepts `[w1, p1, w2, p2, ...]`, the same as one whitespace-separated string, or a lone prefix
    (weight 1). Unweighted lists of several prefixes (Megatron weighs those by dataset size) are
    accepted only where `weights_required` is False (validation sets), each with weight 1.
    """
    if isinstance(blend, str):
        items = blend.split()
    elif isinstance(blend, list):
        items = blend
    else:
        raise ScheduleError(f"{where}: expected a blend list [w1, p1, ...] or string, got {type(blend).__name__}")
    if not items:
        raise ScheduleError(f"{where}: the blend is empty")
    unweighted = not any(_looks_number(x) for x in items)
    if len(items) == 1 or (unweighted and not weights_required):
        weights, prefixes = [1.0] * len(items), list(items)
    elif unweighted:
        raise ScheduleError(f"{where}: {len(items)} prefixes without weights; expected weight, prefix pairs")
    elif len(items) % 2 == 1:
        raise ScheduleError(f"{where}: odd-length blend list ({len(items)} items); expected weight, prefix pairs")
    else:
        weights = [_parse_weight(w, where) for w in items[0::2]]
        prefixes = list(items[1::2])
    for p in prefixes:
        if not isinstance(p, str) or not p.strip():
            raise ScheduleError(f"{where}: prefix {p!r} is not a non-empty path string")
        if _looks_number(p):
            raise ScheduleError(f"{where}: prefix {p!r} looks like a weight; expected weight, prefix pairs")
    prefixes = [p.strip() for p in prefixes]
    if len(set(prefixes)) != len(prefixes):
        twice = next(p for p in prefixes if prefixes.count(p) > 1)
        raise ScheduleError(f"{where}: prefix {twice} appears twice")
    return weights, prefixes


def _looks_number(x) -> bool:
    if _is_number(x):
        return True
    if not isinstance(x, str):
        return False
    try:
        float(x)
        return True
    except ValueError:
        return False


class MixtureSchedule:
    """Stages of Megatron blends, a unit for their starts, an optional validation blend, provenance."""

    def __init__(self, unit: str, stages: list[Stage], valid: Optional[tuple[list[float], list[str]]] = None,
                 provenance: Optional[dict] = None):
        self.unit = unit
        self.stages = stages
        self.valid = valid
        self.provenance = provenance if provenance is not None else {}
        self._check_structure()

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str, base_dir: Optional[str] = None) -> "MixtureSchedule":
        """Read and structurally validate `sched.json` (files are checked by `validate`)."""
        d = read_json_file(path, "schedule", ScheduleError)
        return cls.from_dict(d, base_dir=base_dir)

    @classmethod
    def from_dict(cls, d, base_dir: Optional[str] = None) -> "MixtureSchedule":
        """Parse the JSON object; relative prefixes are joined to `base_dir` when given (else kept,
        relative to the working directory as Megatron's `--data-path` is)."""
        if not isinstance(d, dict):
            raise ScheduleError(f"schedule: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(map(str, d)) - _TOP_KEYS)
        if unknown:
            raise ScheduleError(f"schedule: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
        if "version" not in d:
            raise ScheduleError("schedule: missing 'version'")
        if d["version"] != SCHEDULE_VERSION or isinstance(d["version"], bool):
            raise ScheduleError(f"schedule: version {d['version']!r} is not supported (expected {SCHEDULE_VERSION})")
        if "unit" not in d:
            raise ScheduleError("schedule: missing 'unit'")
        unit = d["unit"]
        if not isinstance(unit, str) or unit not in UNITS:
            raise ScheduleError(f"schedule: unknown unit {unit!r} (expected one of {', '.join(UNITS)})")
        raw_stages = d.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise ScheduleError("schedule: 'stages' must be a non-empty list")
        stages = []
        for i, raw in enumerate(raw_stages):
            where = f"stage {i}"
            if not isinstance(raw, dict):
                raise ScheduleError(f"{where}: expected an object with 'start' and 'train'")
            unknown = sorted(set(map(str, raw)) - _STAGE_KEYS)
            if unknown:
                raise ScheduleError(f"{where}: unknown key {unknown[0]!r} (allowed: start, train)")
            for key in ("start", "train"):
                if key not in raw:
                    raise ScheduleError(f"{where}: missing '{key}'")
            weights, prefixes = parse_blend(raw["train"], f"{where} train")
            stages.append(Stage(start=raw["start"], weights=weights, prefixes=_join(prefixes, base_dir)))
        valid = None
        if d.get("valid") is not None:
            weights, prefixes = parse_blend(d["valid"], "valid", weights_required=False)
            valid = (weights, _join(prefixes, base_dir))
        provenance = d.get("provenance", {})
        if provenance is None:
            provenance = {}
        if not isinstance(provenance, dict):
            raise ScheduleError("provenance: expected a JSON object")
        return cls(unit, stages, valid, provenance)

    @classmethod
    def from_data_path(cls, args: list[str]) -> "MixtureSchedule":
        """Megatron's `--data-path w1 p1 w2 p2 ...` (or one prefix): a one-stage schedule."""
        if isinstance(args, str):
            args = [args]
        items = [tok for a in args for tok in str(a).split()]
        weights, prefixes = parse_blend(items, "--data-path")
        return cls("fraction", [Stage(0.0, weights, prefixes)], provenance={"made_by": "--data-path"})

    @classmethod
    def from_data_args_path(cls, path: str) -> "MixtureSchedule":
        """Megatron's `--data-args-path`: a text file holding the `--data-path` blend."""
        items = read_text(path, "data args", ScheduleError).split()
        weights, prefixes = parse_blend(items, f"{path}")
        return cls("fraction", [Stage(0.0, weights, prefixes)], provenance={"made_by": "--data-args-path"})

    @classmethod
    def from_per_split_data_args_path(cls, path: str) -> "MixtureSchedule":
        """Megatron's `--per-split-data-args-path`: JSON {"train": blend, "valid": blend, "test": blend}.

        The test blend is not used by regmixd (it evaluates on each domain's valid split)."""
        d = read_json_file(path, "per-split data args", ScheduleError)
        if not isinstance(d, dict) or d.get("train") is None:
            raise ScheduleError(f"{path}: expected a JSON object with a 'train' blend")
        unknown = sorted(set(map(str, d)) - {"train", "valid", "test"})
        if unknown:
            raise ScheduleError(f"{path}: unknown key {unknown[0]!r} (allowed: train, valid, test)")
        weights, prefixes = parse_blend(d["train"], f"{path} train")
        valid = parse_blend(d["valid"], f"{path} valid", weights_required=False) if d.get("valid") else None
        return cls("fraction", [Stage(0.0, weights, prefixes)], valid,
                   provenance={"made_by": "--per-split-data-args-path"})

    # ---------------------------------------------------------------- checks
    def _check_structure(self) -> None:
        if self.unit not in UNITS:
            raise ScheduleError(f"schedule: unknown unit {self.unit!r} (expected one of {', '.join(UNITS)})")
        if not self.stages:
            raise ScheduleError("schedule: 'stages' must be a non-empty list")
        names = {}
        previous = None
        for i, stage in enumerate(self.stages):
            where = f"stage {i}"
            start = stage.start
            if not _is_number(start):
                raise ScheduleError(f"{where} start: {start!r} is not a number")
            if not math.isfinite(_float_or_inf(start)):
                raise ScheduleError(f"{where} start: {start!r} is not finite")
            if start < 0:
                raise ScheduleError(f"{where} start: {start!r} is negative")
            if i == 0 and start != 0:
                raise ScheduleError(f"{where} start: the first stage must start at 0, not {start!r}")
            if self.unit == "fraction" and start >= 1:
                raise ScheduleError(f"{where} start: {start!r} is past the end of training (fraction must be < 1)")
            if self.unit in ("samples", "iterations") and start != int(start):
                raise ScheduleError(f"{where} start: {start!r} {self.unit} is not a whole number")
            if previous is not None and start <= previous:
                raise ScheduleError(f"{where} start: {start!r} does not increase "
                                    f"(previous stage starts at {previous!r})")
            previous = start
            if len(stage.weights) != len(stage.prefixes):
                raise ScheduleError(f"{where} train: {len(stage.weights)} weights for {len(stage.prefixes)} prefixes")
            for w in stage.weights:
                if not _is_number(w) or not math.isfinite(_float_or_inf(w)) or w < 0:
                    raise ScheduleError(f"{where} train: weight {w!r} must be a finite number >= 0")
            if sum(stage.weights) <= 0:
                raise ScheduleError(f"{where} train: all weights are 0")
            if len(set(stage.prefixes)) != len(stage.prefixes):
                raise ScheduleError(f"{where} train: a prefix appears twice")
            for p in stage.prefixes:
                other = names.setdefault(domain_name(p), p)
                if other != p:
                    raise ScheduleError(f"{where} train: prefixes {other} and {p} name the same domain "
                                        f"{domain_name(p)!r}")
        if self.valid is not None:
            weights, prefixes = self.valid
            if len(weights) != len(prefixes):
                raise ScheduleError(f"valid: {len(weights)} weights for {len(prefixes)} prefixes")

    def validate(self, check_files: bool = True) -> None:
        """Check the structure again and, with `check_files`, that every prefix has `.bin` and `.idx`."""
        self._check_structure()
        if not check_files:
            return
        for i, stage in enumerate(self.stages):
            for p in stage.prefixes:
                _check_prefix_files(p, f"stage {i} train")
        if self.valid is not None:
            for p in self.valid[1]:
                _check_prefix_files(p, "valid")

    # ---------------------------------------------------------------- queries
    @property
    def prefixes(self) -> list[str]:
        """Every train prefix, in order of first appearance over the stages."""
        out = []
        for stage in self.stages:
            for p in stage.prefixes:
                if p not in out:
                    out.append(p)
        return out

    @property
    def domains(self) -> list[str]:
        return [domain_name(p) for p in self.prefixes]

    def stage_weight_vectors(self) -> list[list[float]]:
        """Per stage, the raw weights aligned with `prefixes` (0 for a prefix the stage omits).

        Left unnormalized so the dataset can normalize exactly as megatron-core does (bit-identical
        greedy blending needs the same float operations)."""
        order = {p: k for k, p in enumerate(self.prefixes)}
        out = []
        for stage in self.stages:
            row = [0.0] * len(order)
            for w, p in zip(stage.weights, stage.prefixes):
                row[order[p]] = float(w)
            out.append(row)
        return out

    def weights_dict(self, stage: int) -> dict[str, float]:
        """Normalized per-domain weights of `stage`, over all the schedule's domains."""
        if not 0 <= stage < len(self.stages):
            raise ScheduleError(f"stage {stage} does not exist (the schedule has {len(self.stages)})")
        row = self.stage_weight_vectors()[stage]
        total = sum(row)
        return {name: w / total for name, w in zip(self.domains, row)}

    def resolve(self, train_samples: int, global_batch_size: int, seq_length: int) -> list[int]:
        """Stage starts as global sample indices, rounded to whole global batches (iteration boundaries)."""
        if train_samples <= 0 or global_batch_size <= 0 or seq_length <= 0:
            raise ScheduleError(f"resolve: train_samples={train_samples}, global_batch_size={global_batch_size} "
                                f"and seq_length={seq_length} must be positive")
        scale = {"fraction": train_samples, "samples": 1, "iterations": global_batch_size,
                 "tokens": 1.0 / seq_length}[self.unit]
        starts = []
        for i, stage in enumerate(self.stages):
            sample = stage.start * scale
            iteration = math.floor(sample / global_batch_size + 0.5)
            start = iteration * global_batch_size
            if start >= train_samples:
                raise ScheduleError(f"stage {i} start: {stage.start!r} {self.unit} is past the end of training "
                                    f"({train_samples} samples)")
            if starts and start <= starts[-1]:
                raise ScheduleError(f"stage {i} start: {stage.start!r} {self.unit} falls on the same iteration as "
                                    f"stage {i - 1} (global batch {global_batch_size})")
            starts.append(start)
        return starts

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict:
        d = {"version": SCHEDULE_VERSION, "unit": self.unit,
             "stages": [{"start": s.start, "train": _blend_list(s.weights, s.prefixes)} for s in self.stages]}
        if self.valid is not None:
            d["valid"] = _blend_list(*self.valid)
        d["provenance"] = self.provenance
        return d

    def save(self, path: str) -> None:
        """Write `sched.json` atomically (temp file + os.replace)."""
        atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n", fsync=True)

    def sha256(self) -> str:
        """Hash of what decides the data (unit, starts, blends, valid), not of the provenance."""
        d = self.to_dict()
        d.pop("provenance")
        for stage in d["stages"]:
            stage["start"] = float(stage["start"])  # 0 and 0.0 are the same start
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def table(self) -> str:
        """A per-stage table of normalized weights (rows: domains, columns: stages)."""
        rows = [list(self.weights_dict(i).values()) for i in range(len(self.stages))]
        header = ["domain"] + [f"stage {i} @{_fmt_start(s.start)}" for i, s in enumerate(self.stages)]
        body = [[name] + [f"{rows[j][k]:.4f}" for j in range(len(rows))] for k, name in enumerate(self.domains)]
        widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                 for r in [header] + body]
        return "\n".join([f"unit: {self.unit}   stages: {len(self.stages)}   sha256: {self.sha256()[:16]}"] + lines)


def _float_or_inf(x) -> float:
    try:
        return float(x)
    except OverflowError:
        return math.inf


def _fmt_start(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _blend_list(weights, prefixes) -> list:
    out = []
    for w, p in zip(weights, prefixes):
        out += [float(w), p]
    return out


def _join(prefixes: list[str], base_dir: Optional[str]) -> list[str]:
    if base_dir is None:
        return prefixes
    return [p if os.path.isabs(p) else os.path.join(base_dir, p) for p in prefixes]


def _check_prefix_files(prefix: str, where: str) -> None:
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise ScheduleError(f"{where}: {prefix}{ext} does not exist")
