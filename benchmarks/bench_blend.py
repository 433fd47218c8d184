"""ScheduledBlendedDataset (1 and 8 stages) next to megatron-core's BlendedDataset: build time of the
blend index, random-access __getitem__ rate, peak memory of the build. Prints ratios from one run and
ends with the line `scheduled/megatron build speed ratio: X.XX (target >= 0.95)` (1 stage vs megatron).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_blend            # 17 domains, 12.2M samples
    .venv/bin/python -m benchmarks.bench_blend --samples 100000 --fetches 2000   # quick look

Both sides use the same per-domain GPTDatasets (synthetic Megatron .bin/.idx files, built once through
BlendedMegatronDatasetBuilder conventions), so the figures compare only what differs: the index build
and the index lookup in front of GPTDataset.__getitem__ (which dominates a fetch, as in Megatron).
A build is the constructor, with no index cache on either side (megatron-core's BlendedDataset only
writes one under torch.distributed): megatron-core hashes its description, fills zeroed arrays with
the C++ helper and checks per-dataset counts with numpy.unique; ours checks the stages, fills the
arrays with the same helper, counts per domain and checks dataset sizes. The "C++ helper" row is that
shared call alone, on the 1-stage weights: the floor of both builds.
"""
import argparse
import gc
import logging
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from fixtures import write_token_dataset  # noqa: E402
from megatron.core.datasets import helpers  # noqa: E402
from megatron.core.datasets.blended_dataset import BlendedDataset  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset  # noqa: E402
from megatron.core.datasets.utils import normalize  # noqa: E402
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer  # noqa: E402

from megatron_ext.scheduled_dataset import ScheduledBlendedDataset, gpt_dataset_config  # noqa: E402

VOCAB = 50000


def make_data(root: str, n_domains: int, docs: int, doc_tokens: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    prefixes = []
    for d in range(n_domains):
        prefix = os.path.join(root, f"dom{d:02d}_train_text_document")
        if not os.path.exists(prefix + ".idx"):
            lengths = rng.integers(doc_tokens // 2, doc_tokens * 3 // 2, size=docs)
            write_token_dataset(prefix, (rng.integers(0, VOCAB, size=n) for n in lengths), VOCAB)
        prefixes.append(prefix)
    return prefixes


def stage_plan(n_domains: int, n_stages: int, samples: int, seed: int):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(n_domains, 0.8), size=n_stages)
    if n_stages > 1:
        weights[rng.random(weights.shape) < 0.2] = 0.0  # some domains off in some stages
        weights[:, 0] += 0.01
    starts = [int(samples * s / n_stages) for s in range(n_stages)]
    return starts, weights.tolist()


def timed(fn):
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def timed_cpu(fn):
    """(result, wall s, CPU s of this process): builds are single-threaded, so CPU time is their
    work without the time other processes on a shared machine take the core away."""
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def peak_mb(fn) -> float:
    gc.collect()
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    return peak / 2**20


def fetch_seconds(ds, indices) -> float:
    """CPU seconds of this process for the fetches (single-threaded, from a warm page cache)."""
    t = time.process_time()
    for i in indices:
        ds[i]
    return time.process_time() - t


def interleaved_fetch_rates(datasets: dict, indices: list, chunk: int = 250) -> dict:
    """Fetches per CPU second per side, the sides taking turns every `chunk` fetches so load from
    other processes on a shared machine (cache and memory contention) falls on all of them alike."""
    seconds = dict.fromkeys(datasets, 0.0)
    names = list(datasets)
    for k, a in enumerate(range(0, len(indices), chunk)):
        part = indices[a:a + chunk]
        order = names[k % len(names):] + names[:k % len(names)]  # rotate who goes first
        for name in order:
            fetch_seconds(datasets[name], part)  # untimed: every side then reads from a warm page cache
        for name in order:
            seconds[name] += fetch_seconds(datasets[name], part)
    return {name: len(indices) / s for name, s in seconds.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=12_207_031, help="train samples (25B tokens at 2048)")
    p.add_argument("--domains", type=int, default=17)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--docs-per-domain", type=int, default=400)
    p.add_argument("--doc-tokens", type=int, default=2000)
    p.add_argument("--fetches", type=int, default=10000, help="random __getitem__ calls per round")
    p.add_argument("--build-rounds", type=int, default=7, help="alternating build rounds; medians are reported")
    p.add_argument("--rounds", type=int, default=3, help="alternating fetch rounds; medians are reported")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "regmixd_bench_blend"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("megatron").setLevel(logging.ERROR)  # "cannot save indexes without a cache" x rounds
    os.makedirs(args.workdir, exist_ok=True)

    prefixes = make_data(os.path.join(args.workdir, "tok"), args.domains, args.docs_per_domain, args.doc_tokens, 0)
    tok = NullTokenizer(VOCAB)
    config = gpt_dataset_config(seed=1234, seq_length=args.seq_length, tokenizer=tok, train_prefixes=prefixes,
                                valid_prefixes=[], cache_dir=os.path.join(args.workdir, "cache"))
    plans = {"megatron": stage_plan(args.domains, 1, args.samples, 1)}
    plans["1 stage"] = plans["megatron"]
    plans["8 stages"] = stage_plan(args.domains, 8, args.samples, 2)

    # per-domain GPTDatasets large enough for both plans (identical for every side)
    def need(starts, weights):
        ends = starts[1:] + [args.samples]
        return sum(np.array([math.ceil((b - a) * x) if x > 0 else 0 for x in normalize(w)])
                   for a, b, w in zip(starts, ends, weights))
    sizes = np.maximum(need(*plans["1 stage"]), need(*plans["8 stages"]))
    sizes = [int(math.ceil(n * (1 + config.mid_level_dataset_surplus))) + 1 for n in sizes]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [args.samples, None, None], lambda: True, config)
    datasets, t_gpt = timed(lambda: builder._build_megatron_datasets_parallel(
        prefixes, [(0.0, 1.0), None, None], [[n, None, None] for n in sizes])[0])
    print(f"per-domain GPTDatasets: {args.domains} x ~{int(np.mean(sizes)):,} samples, built/loaded in {t_gpt:.1f} s "
          f"(shared by all sides)")

    blend_config = gpt_dataset_config(seed=1234, seq_length=args.seq_length, tokenizer=tok, train_prefixes=prefixes,
                                      valid_prefixes=[], cache_dir=None)
    # what BlendedMegatronDatasetBuilder hands BlendedDataset: normalized weights, size sum(ceil(N * w))
    megatron_weights = normalize(plans["megatron"][1][0])
    megatron_size = sum(math.ceil(args.samples * w) for w in megatron_weights)

    def scheduled(plan, cache_dir=None):
        return lambda: ScheduledBlendedDataset([f"dom{d}" for d in range(args.domains)], *plan, args.samples,
                                               lambda ids, _num_samples: [datasets[i] for i in ids], cache_dir=cache_dir)

    def helper_only():
        dataset_index = np.empty(megatron_size, dtype=np.int16)
        dataset_sample_index = np.empty(megatron_size, dtype=np.int64)
        helpers.build_blending_indices(dataset_index, dataset_sample_index, normalize(megatron_weights),
                                       args.domains, megatron_size, False)
        return dataset_index, dataset_sample_index

    # index cache hits: megatron-core writes its cache only on rank 0 of a process group
    index_cache = os.path.join(args.workdir, "index_cache")
    shutil.rmtree(index_cache, ignore_errors=True)
    rendezvous = os.path.join(args.workdir, "rendezvous")
    if os.path.exists(rendezvous):
        os.remove(rendezvous)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    cached_config = gpt_dataset_config(seed=1234, seq_length=args.seq_length, tokenizer=tok, train_prefixes=prefixes,
                                       valid_prefixes=[], cache_dir=index_cache)

    builders = {
        "megatron": lambda: BlendedDataset(datasets, megatron_weights, megatron_size, blend_config),
        "1 stage": scheduled(plans["1 stage"]),
        "8 stages": scheduled(plans["8 stages"]),
        "C++ helper": helper_only,
        "megatron, cache hit": lambda: BlendedDataset(datasets, megatron_weights, megatron_size, cached_config),
        "1 stage, cache hit": scheduled(plans["1 stage"], index_cache),
    }
    names = list(builders)
    for name in ("megatron, cache hit", "1 stage, cache hit"):
        builders[name]()  # writes the cache entry

    build_times = {k: [] for k in builders}
    build_cpu = {k: [] for k in builders}
    built = {}
    for r in range(args.build_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            built.pop(name, None)
            built[name], t, c = timed_cpu(builders[name])
            build_times[name].append(t)
            build_cpu[name].append(c)
    for name in ("C++ helper", "megatron, cache hit", "1 stage, cache hit"):
        del built[name]
    rates = {k: [] for k in built}
    rng = np.random.default_rng(0)
    n = min(len(ds) for ds in built.values())
    for r in range(args.rounds):
        indices = rng.integers(0, n, size=args.fetches).tolist()
        for name, value in interleaved_fetch_rates(built, indices).items():
            rates[name].append(value)
    same = (np.array_equal(built["megatron"].dataset_index, built["1 stage"].dataset_index)
            and np.array_equal(built["megatron"].dataset_sample_index, built["1 stage"].dataset_sample_index))
    del built
    peaks = {name: peak_mb(make) for name, make in builders.items()}

    med = {k: statistics.median(v) for k, v in build_times.items()}
    cpu = {k: statistics.median(v) for k, v in build_cpu.items()}
    rate = {k: statistics.median(v) for k, v in rates.items()}
    print(f"blend: {args.domains} domains, {args.samples:,} samples, seq {args.seq_length}; medians of "
          f"{args.build_rounds} alternating build rounds and {args.rounds} fetch rounds of {args.fetches:,} random fetches")
    print(f"{'':19s} {'build s':>9s} {'build CPU s':>12s} {'fetch/CPU s':>12s} {'build peak MB':>14s}")
    for k in builders:
        fetch = f"{rate[k]:12.0f}" if k in rate else f"{'-':>12s}"
        print(f"{k:19s} {med[k]:9.3f} {cpu[k]:12.3f} {fetch} {peaks[k]:14.1f}")
    floor = cpu["C++ helper"]
    print(f"build CPU s beyond the shared C++ helper: megatron {cpu['megatron'] - floor:+.3f}, "
          f"1 stage {cpu['1 stage'] - floor:+.3f}")
    print(f"1-stage arrays identical to megatron-core BlendedDataset: {same}")
    print(f"fetch speed, 1 stage vs megatron: {rate['1 stage'] / rate['megatron']:.2f}x  (target >= 0.95x)")
    print(f"build time, 8 stages vs 1 stage: {cpu['8 stages'] / cpu['1 stage']:.2f}x CPU, "
          f"{med['8 stages'] / med['1 stage']:.2f}x wall  (target <= 1.5x)")
    print(f"build speed, 1 stage vs megatron, wall: {med['megatron'] / med['1 stage']:.2f}x")
    print(f"cache-hit load speed, 1 stage vs megatron: {cpu['megatron, cache hit'] / cpu['1 stage, cache hit']:.2f}x CPU "
          f"(megatron maps its .npy lazily; ours copies them into the run's preallocated arrays)")
    print(f"fetch speed, 8 stages vs megatron: {rate['8 stages'] / rate['megatron']:.2f}x")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"scheduled/megatron build speed ratio: {cpu['megatron'] / cpu['1 stage']:.2f} (target >= 0.95)")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
