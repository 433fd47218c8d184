"""ScheduledBlendedDataset: megatron-core's BlendedDataset with weights that change per stage.

Megatron's `BlendedDataset` maps a global sample index to (dataset, sample within it) with two arrays
filled by the greedy C++ routine `helpers_cpp.build_blending_indices`. Here stage s covers global
samples [start_s, start_{s+1}); the same routine fills that slice with the stage's weights (zero-weight
domains left out), and each domain's sample counter carries over from the earlier stages, so a blend
change never replays a domain's samples. A one-stage schedule gives exactly Megatron's arrays.

The per-domain datasets are megatron-core `GPTDataset`s built through `BlendedMegatronDatasetBuilder`
(mmap, `path_to_cache`, rank-0-first building), sized to what the schedule draws from each domain.
"""
import hashlib
import json
import logging
import math
import os
from bisect import bisect_right
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from megatron.core.datasets import helpers
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import normalize

from megatron_ext.atomic import atomic_path, atomic_write
from megatron_ext.schedule import MixtureSchedule, ScheduleError, domain_name

logger = logging.getLogger(__name__)

STATE_FORMAT = "regmixd.ScheduledBlendedDataset/1"
_CHUNK = 1 << 22  # elements per chunk when remapping indices: bounds temporary memory to ~32 MB

# (domain indices, num_samples for each) -> one dataset per index; lets the dataset (re)size domains
DatasetBuilder = Callable[[list[int], list[int]], list]


def megatron_normalize(weights: Sequence[float]) -> list[float]:
    """The weights Megatron's greedy sees: the builder normalizes the blend, then BlendedDataset
    normalizes again; repeating both keeps the float values (and so tie-breaks) bit-identical."""
    return normalize(normalize(list(weights)))


def blend_stage(dataset_index: np.ndarray, dataset_sample_index: np.ndarray, weights: np.ndarray,
                offsets: np.ndarray) -> np.ndarray:
    """Fill two array slices with Megatron's greedy blend of one stage; return per-domain counts.

    `weights` has one entry per domain (zeros are left out of the blend); domain d's samples are
    numbered from `offsets[d]` on. The C++ helper writes in place into the slices (they are views).
    """
    active = np.flatnonzero(weights > 0)
    length = dataset_index.shape[0]
    helpers.build_blending_indices(dataset_index, dataset_sample_index,
                                   megatron_normalize(weights[active]), len(active), length, False)
    if len(active) < len(weights) or np.any(offsets[active] != 0):
        lut = active.astype(np.int16)
        for a in range(0, length, _CHUNK):
            local = dataset_index[a:a + _CHUNK]
            local[:] = lut[local]
            dataset_sample_index[a:a + _CHUNK] += offsets[local]
    return stage_counts(dataset_index, dataset_sample_index, weights, offsets)


def stage_counts(dataset_index: np.ndarray, dataset_sample_index: np.ndarray, weights: Sequence[float],
                 offsets: np.ndarray) -> np.ndarray:
    """Samples each domain has in a slice blended with `weights`, domain d counting on from `offsets[d]`.

    The greedy numbers a domain's samples consecutively, so its count is its last sample index + 1 -
    offset: found by scanning back from the end in doubling windows until every domain with a
    weight was seen (about 1 / smallest weight samples), not by a pass over the whole slice."""
    counts = np.zeros(len(offsets), dtype=np.int64)
    unseen = np.asarray(weights) > 0
    end, window = dataset_index.shape[0], 4096
    while end > 0 and unseen.any():
        begin = max(0, end - window)
        ids, last = np.unique(dataset_index[begin:end][::-1], return_index=True)
        new = unseen[ids]
        ids, at = ids[new], end - 1 - last[new]
        counts[ids] = dataset_sample_index[at] + 1 - offsets[ids]
        unseen[ids] = False
        end, window = begin, window * 2
    return counts


class ScheduledBlendedDataset(torch.utils.data.Dataset):
    """Global sample index -> (domain, sample of that domain), with per-stage Megatron blending.

    Args:
        domains: domain names, one per per-domain dataset.
        stage_starts: global sample index where each stage starts (first 0, strictly increasing).
        stage_weights: per stage, one raw weight per domain (0 leaves the domain out of the stage).
        train_samples: samples the run asks for; the length is Megatron's rounding of it
            (the last stage draws ceil(remaining * w_d) from each domain d, summed).
        build_datasets: (domain indices, num_samples) -> per-domain datasets (`GPTDataset`s).
        schedule_sha256: hash of the schedule the stages came from (checked on resume).
        cache_dir: where each stage's index arrays are cached, keyed by what determines them.
        surplus: Megatron's `mid_level_dataset_surplus` on per-domain dataset sizes.
        reserve_samples: build every domain's dataset for at least this many samples, so stages a
            controller appends later rarely need a bigger (re-shuffled) dataset.
    """

    def __init__(self, domains: list[str], stage_starts: list[int], stage_weights: list[list[float]],
                 train_samples: int, build_datasets: DatasetBuilder, *, schedule_sha256: str = "",
                 cache_dir: Optional[str] = None, surplus: float = 0.005, reserve_samples: int = 0):
        if not domains or len(domains) >= np.iinfo(np.int16).max:
            raise ScheduleError(f"dataset: {len(domains)} domains (need 1 to 32766)")
        if train_samples <= 0:
            raise ScheduleError(f"dataset: train_samples={train_samples} must be positive")
        self._domains = list(domains)
        self.train_samples = int(train_samples)
        self.schedule_sha256 = schedule_sha256
        self.cache_dir = cache_dir
        self.surplus = surplus
        self.reserve_samples = int(reserve_samples)
        self._build_datasets = build_datasets
        starts, weights = self._checked_stages(stage_starts, stage_weights)
        self.size = self._size_for(starts, weights)
        self.dataset_index = np.empty(self.size, dtype=np.int16)
        self.dataset_sample_index = np.empty(self.size, dtype=np.int64)
        self._starts, self._weights = starts, weights
        self._counts = np.zeros((len(starts), len(domains)), dtype=np.int64)
        self._blend_from(0)
        self.datasets: list = [None] * len(domains)
        self.dataset_num_samples: list[Optional[int]] = [None] * len(domains)
        self._ensure_datasets(self._planned_num_samples())

    # ---------------------------------------------------------------- torch Dataset
    def __getstate__(self) -> dict:
        # DataLoader workers only read samples; the dataset builder (a closure) need not travel
        return {**self.__dict__, "_build_datasets": None}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        dataset_id = self.dataset_index[idx]
        dataset_sample_id = self.dataset_sample_index[idx]
        return {"dataset_id": dataset_id, **self.datasets[dataset_id][dataset_sample_id]}

    # ---------------------------------------------------------------- queries
    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    @property
    def stage_starts(self) -> list[int]:
        return list(self._starts)

    def stage_of(self, idx: int) -> int:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} is outside [0, {self.size})")
        return bisect_right(self._starts, idx) - 1

    def stage_weights(self, stage: int) -> dict[str, float]:
        """Normalized per-domain weights of `stage`."""
        return dict(zip(self._domains, normalize(self._weights[stage])))

    def weights_at(self, idx: int) -> dict[str, float]:
        return self.stage_weights(self.stage_of(idx))

    def realized_counts(self) -> np.ndarray:
        """[n_stages, n_domains]: samples each stage draws from each domain."""
        return self._counts.copy()

    # ---------------------------------------------------------------- controller
    def append_stage(self, start_sample: int, weights: Union[dict, Sequence[float]]) -> None:
        """Start a new stage at `start_sample` (to the end of the run); earlier samples stay as they are."""
        vector = self._weight_vector(weights, f"append_stage at {start_sample}")
        if isinstance(start_sample, bool) or not isinstance(start_sample, (int, np.integer)):
            raise ScheduleError(f"append_stage: start {start_sample!r} is not an integer sample index")
        if not self._starts[-1] < start_sample < self.train_samples:
            raise ScheduleError(f"append_stage: start {start_sample} must lie after the last stage's start "
                                f"{self._starts[-1]} and before the end of training {self.train_samples}")
        last = len(self._starts) - 1
        a = self._starts[last]
        self._counts[last] = stage_counts(self.dataset_index[a:start_sample], self.dataset_sample_index[a:start_sample],
                                          self._weights[last], self._counts[:last].sum(axis=0))
        self._starts = self._starts + [int(start_sample)]
        self._weights = self._weights + [vector]
        self._counts = np.vstack([self._counts, np.zeros(len(self._domains), dtype=np.int64)])
        self._blend_from(last + 1)
        self._ensure_datasets(self.dataset_num_samples)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Everything that rebuilds the index arrays and per-domain datasets of this run (plain types)."""
        return {"format": STATE_FORMAT, "schedule_sha256": self.schedule_sha256, "domains": self.domains,
                "size": self.size, "stage_starts": self.stage_starts,
                "stage_weights": [list(map(float, w)) for w in self._weights],
                "dataset_num_samples": list(self.dataset_num_samples),
                "realized_counts": self._counts.tolist()}

    def load_state_dict(self, sd: dict, override: bool = False, resume_sample: Optional[int] = None) -> None:
        """Rebuild this run's arrays from a checkpoint's state.

        Without `override` the checkpoint must come from the same schedule (hash and length); its
        stages, appended ones included, are adopted. With `override` the checkpoint's stages stay as
        they were before `resume_sample` and this dataset's (new) schedule applies from there on,
        every domain's counter continuing.
        """
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ScheduleError(f"data state: not a {STATE_FORMAT} state")
        try:
            old_domains = list(sd["domains"])
            old_starts = [int(s) for s in sd["stage_starts"]]
            old_weights = [list(map(float, w)) for w in sd["stage_weights"]]
            old_num_samples = list(sd["dataset_num_samples"])
            old_size, old_counts = int(sd["size"]), np.asarray(sd["realized_counts"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ScheduleError(f"data state: malformed ({exc})") from None
        missing = [d for d in old_domains if d not in self._domains]
        if missing:
            raise ScheduleError(f"data state: the checkpoint draws from domain {missing[0]!r}, "
                                f"which the schedule lacks")
        where = [self._domains.index(d) for d in old_domains]

        def remap(row):
            out = [0.0] * len(self._domains)
            for k, value in zip(where, row):
                out[k] = value
            return out

        old_weights = [remap(w) for w in old_weights]
        num_samples = list(self.dataset_num_samples)
        for k, n in zip(where, old_num_samples):
            num_samples[k] = n
        if not override:
            if sd["schedule_sha256"] != self.schedule_sha256 or old_size != self.size:
                raise ScheduleError(
                    f"data schedule differs from the checkpoint's (sha256 {str(sd['schedule_sha256'])[:12]}, "
                    f"{old_size} samples; now {self.schedule_sha256[:12]}, {self.size} samples); "
                    f"pass --override-data-schedule to apply the new one from the resume point")
            starts, weights = old_starts, old_weights
        else:
            if resume_sample is None or not 0 <= resume_sample <= min(old_size, self.size):
                raise ScheduleError(f"data state: override needs a resume sample in [0, "
                                    f"{min(old_size, self.size)}], got {resume_sample!r}")
            keep = [s for s in range(len(old_starts)) if old_starts[s] < resume_sample]
            starts = [old_starts[s] for s in keep]
            weights = [old_weights[s] for s in keep]
            if resume_sample < self.size:
                active = bisect_right(self._starts, resume_sample) - 1
                later = range(active + 1, len(self._starts))
                starts += [int(resume_sample)] + [self._starts[s] for s in later]
                weights += [self._weights[active]] + [self._weights[s] for s in later]
        self._starts, self._weights = self._checked_stages(starts, weights)
        self._counts = np.zeros((len(self._starts), len(self._domains)), dtype=np.int64)
        self._blend_from(0)
        if not override and not np.array_equal(self._counts, np.asarray(
                [remap(c) for c in old_counts.tolist()], dtype=np.int64)):
            raise ScheduleError("data state: rebuilt per-stage counts differ from the checkpoint's "
                                "(different megatron-core blending?)")
        self._ensure_datasets(num_samples)

    # ---------------------------------------------------------------- internals
    def _weight_vector(self, weights, where: str) -> list[float]:
        if isinstance(weights, dict):
            unknown = [d for d in weights if d not in self._domains]
            if unknown:
                raise ScheduleError(f"{where}: unknown domain {unknown[0]!r}")
            vector = [weights.get(d, 0.0) for d in self._domains]
        else:
            vector = list(weights)
            if len(vector) != len(self._domains):
                raise ScheduleError(f"{where}: {len(vector)} weights for {len(self._domains)} domains")
        try:
            vector = [float(w) for w in vector]
        except (TypeError, ValueError):
            raise ScheduleError(f"{where}: weights must be numbers") from None
        if not all(math.isfinite(w) and w >= 0 for w in vector):
            raise ScheduleError(f"{where}: weights must be finite and >= 0")
        if sum(vector) <= 0:
            raise ScheduleError(f"{where}: all weights are 0")
        return vector

    def _checked_stages(self, starts, weights) -> tuple[list[int], list[list[float]]]:
        if not starts or len(starts) != len(weights):
            raise ScheduleError(f"dataset: {len(starts)} stage starts for {len(weights)} weight rows")
        starts = [int(s) for s in starts]
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ScheduleError(f"dataset: stage starts {starts} must begin at 0 and increase")
        if starts[-1] >= self.train_samples:
            raise ScheduleError(f"dataset: stage start {starts[-1]} is past the end ({self.train_samples})")
        return starts, [self._weight_vector(w, f"stage {s}") for s, w in enumerate(weights)]

    def _stage_lengths_planned(self, starts) -> list[int]:
        """Samples each stage is planned for (the last runs to `train_samples`, as Megatron sizes)."""
        return [b - a for a, b in zip(starts, starts[1:] + [self.train_samples])]

    @staticmethod
    def _per_domain_target(weights: list[float], length: int) -> np.ndarray:
        """Megatron's per-dataset target: ceil(length * w) with the builder's normalized weights."""
        w = np.asarray(weights)
        active = np.flatnonzero(w > 0)
        out = np.zeros(len(w), dtype=np.int64)
        out[active] = [int(math.ceil(length * x)) for x in normalize(w[active])]
        return out

    def _size_for(self, starts, weights) -> int:
        length = self.train_samples - starts[-1]
        return starts[-1] + int(self._per_domain_target(weights[-1], length).sum())

    def _planned_num_samples(self) -> list[int]:
        target = sum(self._per_domain_target(w, n)
                     for w, n in zip(self._weights, self._stage_lengths_planned(self._starts)))
        return [max(int(math.ceil(int(t) * (1 + self.surplus))), self.reserve_samples) for t in target]

    def _blend_from(self, first: int) -> None:
        """(Re)build the arrays of stages `first`.. ; counters carry over from the stages before."""
        offsets = self._counts[:first].sum(axis=0)
        ends = self._starts[1:] + [self.size]
        for s in range(first, len(self._starts)):
            a, b = self._starts[s], ends[s]
            self._counts[s] = self._load_or_blend(a, b, np.asarray(self._weights[s]), offsets)
            offsets = offsets + self._counts[s]

    def _load_or_blend(self, a: int, b: int, weights: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        di, dsi = self.dataset_index[a:b], self.dataset_sample_index[a:b]
        if not self.cache_dir:
            return blend_stage(di, dsi, weights, offsets)
        description = json.dumps({"class": type(self).__name__, "format": STATE_FORMAT,
                                  "weights": [repr(float(w)) for w in weights], "length": b - a,
                                  "offsets": [int(o) for o in offsets]}, sort_keys=True)
        key = hashlib.sha256(description.encode()).hexdigest()[:32]
        path = lambda suffix: os.path.join(self.cache_dir, f"{key}-{type(self).__name__}-{suffix}")
        files = [path("description.json"), path("dataset_index.npy"), path("dataset_sample_index.npy")]
        if all(map(os.path.isfile, files)):
            try:
                with open(files[0], encoding="utf-8") as f:
                    counts = np.asarray(json.load(f)["counts"], dtype=np.int64)
                di[:] = np.load(files[1], mmap_mode="r")
                dsi[:] = np.load(files[2], mmap_mode="r")
                return counts
            except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:  # damaged by hand: rebuild
                logger.warning("index cache entry %s is damaged (%s): rebuilding it", files[0], exc)
        counts = blend_stage(di, dsi, weights, offsets)
        for file, array in ((files[1], di), (files[2], dsi)):
            with atomic_path(file, suffix=".npy") as tmp:
                np.save(tmp, array, allow_pickle=False)
        # written last: its presence marks a complete entry
        atomic_write(files[0], json.dumps({**json.loads(description), "counts": counts.tolist()}))
        return counts

    def _ensure_datasets(self, wanted: list[Optional[int]]) -> None:
        """Build the datasets whose size differs from `wanted`, growing any the blend would overrun.

        Growing a domain's dataset changes its epoch count, so Megatron re-shuffles it: logged."""
        totals = self._counts.sum(axis=0)
        planned = self._planned_num_samples()
        wanted = [planned[d] if n is None else int(n) for d, n in enumerate(wanted)]
        todo = [d for d in range(len(wanted)) if wanted[d] != self.dataset_num_samples[d]]
        for _ in range(2):  # once at the wanted sizes, once more for any dataset still too short
            if todo:
                built = self._build_datasets(todo, [wanted[d] for d in todo])
                for d, ds in zip(todo, built):
                    self.datasets[d], self.dataset_num_samples[d] = ds, wanted[d]
            todo = [d for d in range(len(wanted))
                    if self.datasets[d] is not None and len(self.datasets[d]) < totals[d]]
            for d in todo:
                wanted[d] = int(math.ceil(int(totals[d]) * (1 + self.surplus)))
                logger.warning("domain %s: the schedule draws %d samples, more than its dataset's %d; "
                               "rebuilding it for %d (its epochs are re-shuffled)",
                               self._domains[d], totals[d], len(self.datasets[d]), wanted[d])
        if todo:
            d = todo[0]
            raise ScheduleError(f"domain {self._domains[d]}: dataset has {len(self.datasets[d])} samples, "
                                f"the schedule draws {totals[d]}")


class CacheCheckedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset, except that a damaged index cache entry is rebuilt, not fatal.

    GPTDataset writes its cache (`<hash>-<class>-<split>-{description.txt,document_index.npy,
    sample_index.npy,shuffle_index.npy}`) in place with `numpy.save`, so a killed write leaves a
    truncated `.npy` that every later run would load and fail on. Before megatron-core looks at its
    cache, this subclass opens each entry the way GPTDataset will (`numpy.load`, mmap) and deletes an
    entry that does not load whole, so megatron-core builds it again. The arrays are megatron-core's.
    """

    def _build_document_sample_shuffle_indices(self):
        if not (self.config.defer_npy_index_mmap or self.config.fast_cache_load or self.config.mock):
            drop_damaged_cache_entry(self._cache_files())
        return super()._build_document_sample_shuffle_indices()

    def _cache_files(self) -> list[str]:
        """The four cache files, at the paths GPTDataset._build_document_sample_shuffle_indices uses."""
        folder = self.config.path_to_cache or os.path.join(self.dataset.path_prefix, "cache",
                                                           f"{type(self).__name__}_indices")
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        return [os.path.join(folder, f"{base}-{affix}") for affix in
                ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy")]


def drop_damaged_cache_entry(files: list[str]) -> bool:
    """Delete a complete cache entry (description + `.npy` files) whose arrays do not load; True if dropped."""
    if not all(map(os.path.isfile, files)):
        return False   # absent or partial: megatron-core rebuilds it anyway
    try:
        for file in files[1:]:
            np.load(file, allow_pickle=True, mmap_mode="r")
        return False
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("index cache entry %s is damaged (%s): rebuilding it", files[0], exc)
    for file in files:
        try:
            os.remove(file)
        except FileNotFoundError:
            pass
    return True


def gpt_dataset_config(*, seed: int, seq_length: int, tokenizer, train_prefixes: list[str],
                       valid_prefixes: list[str], cache_dir: Optional[str] = None, **config_kwargs) -> GPTDatasetConfig:
    """Megatron's per-split GPTDatasetConfig for our files (each prefix is wholly train or valid)."""
    defaults = dict(reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    defaults.update(config_kwargs)
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer, path_to_cache=cache_dir,
        blend_per_split=[(train_prefixes, None), (valid_prefixes, None) if valid_prefixes else None, None],
        **defaults)


def valid_prefixes_for(schedule: MixtureSchedule) -> list[str]:
    """The schedule's `valid` prefixes, else each train prefix's `<domain>_valid_text_document` sibling."""
    if schedule.valid is not None:
        return list(schedule.valid[1])
    out = []
    for prefix in schedule.prefixes:
        sibling = os.path.join(os.path.dirname(prefix), f"{domain_name(prefix)}_valid_text_document")
        if os.path.isfile(sibling + ".bin") and os.path.isfile(sibling + ".idx"):
            out.append(sibling)
    return out


def build_train_valid_datasets(schedule: MixtureSchedule, *, train_samples: int, global_batch_size: int,
                               seq_length: int, seed: int, tokenizer, cache_dir: Optional[str] = None,
                               valid_samples_per_domain: Optional[int] = None, reserve_samples_per_domain: int = 0,
                               is_built_on_rank: Optional[Callable[[], bool]] = None, **config_kwargs
                               ) -> tuple[ScheduledBlendedDataset, dict[str, GPTDataset]]:
    """The launcher's datasets: the scheduled train blend and one validation GPTDataset per domain.

    Validation datasets cover their whole file (one epoch unless `valid_samples_per_domain` asks
    for more), in Megatron's deterministic shuffled order: the same samples on every call.
    `config_kwargs` are GPTDatasetConfig fields (eod_mask_loss, create_attention_mask, ...).
    """
    schedule.validate(check_files=True)
    starts = schedule.resolve(train_samples, global_batch_size, seq_length)
    train_prefixes, valid_prefixes = schedule.prefixes, valid_prefixes_for(schedule)
    valid_names = [domain_name(p) for p in valid_prefixes]
    if len(set(valid_names)) != len(valid_names):
        raise ScheduleError(f"valid: two prefixes name the same domain ({valid_names})")
    config = gpt_dataset_config(seed=seed, seq_length=seq_length, tokenizer=tokenizer, train_prefixes=train_prefixes,
                                valid_prefixes=valid_prefixes, cache_dir=cache_dir, **config_kwargs)
    builder = BlendedMegatronDatasetBuilder(CacheCheckedGPTDataset, [train_samples, valid_samples_per_domain, None],
                                            is_built_on_rank or (lambda: True), config)
    train_split = [(0.0, 1.0), None, None]

    def build_train(domain_ids: list[int], num_samples: list[int]) -> list[GPTDataset]:
        # the builder's own per-prefix path: thread pool, rank 0 first, then the other ranks
        return builder._build_megatron_datasets_parallel(
            [train_prefixes[d] for d in domain_ids], train_split, [[n, None, None] for n in num_samples])[0]

    train = ScheduledBlendedDataset(
        schedule.domains, starts, schedule.stage_weight_vectors(), train_samples, build_train,
        schedule_sha256=schedule.sha256(), cache_dir=cache_dir, surplus=config.mid_level_dataset_surplus,
        reserve_samples=reserve_samples_per_domain)
    valid = {}
    if valid_prefixes:
        built = builder._build_megatron_datasets_parallel(
            valid_prefixes, [None, (0.0, 1.0), None], [[None, valid_samples_per_domain, None]] * len(valid_prefixes))[1]
        valid = dict(zip(valid_names, built))
    return train, valid
