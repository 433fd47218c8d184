"""ScheduledBlendedDataset (1 and 8 stages) next to megatron-core's BlendedDataset: build time of the
blend index, random-access __getitem__ rate, peak memory of the build. Prints ratios from one run.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_blend            # 17 domains, 12.2M samples
    .venv/bin/python -m benchmarks.bench_blend --samples 100000 --fetches 2000   # quick look

Both sides use the same per-domain GPTDatasets (synthetic Megatron .bin/.idx files, built once through
BlendedMegatronDatasetBuilder conventions), so the figures compare only what differs: the index build
and the index lookup in front of GPTDataset.__getitem__ (which dominates a fetch, as in Megatron).
"""
import argparse
import gc
import logging
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from fixtures import write_token_dataset  # noqa: E402
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


def peak_mb(fn) -> float:
    gc.collect()
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    return peak / 2**20


def fetch_seconds(ds, indices) -> float:
    t = time.perf_counter()
    for i in indices:
        ds[i]
    return time.perf_counter() - t


def interleaved_fetch_rates(datasets: dict, indices: list, chunk: int = 250) -> dict:
    """Fetches/s per side, the sides taking turns every `chunk` fetches so load from other processes
    on a shared machine falls on all of them alike."""
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
    p.add_argument("--fetches", type=int, default=20000, help="random __getitem__ calls per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
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

    def scheduled(plan):
        return lambda: ScheduledBlendedDataset([f"dom{d}" for d in range(args.domains)], *plan, args.samples,
                                               lambda ids, _num_samples: [datasets[i] for i in ids])

    builders = {
        "megatron": lambda: BlendedDataset(datasets, megatron_weights, megatron_size, blend_config),
        "1 stage": scheduled(plans["1 stage"]),
        "8 stages": scheduled(plans["8 stages"]),
    }

    build_times = {k: [] for k in builders}
    rates = {k: [] for k in builders}
    built = {}
    rng = np.random.default_rng(0)
    for r in range(args.rounds):
        for name, make in builders.items():
            built.pop(name, None)
            built[name], t = timed(make)
            build_times[name].append(t)
        n = min(len(ds) for ds in built.values())
        indices = rng.integers(0, n, size=args.fetches).tolist()
        for name, value in interleaved_fetch_rates(built, indices).items():
            rates[name].append(value)
    same = (np.array_equal(built["megatron"].dataset_index, built["1 stage"].dataset_index)
            and np.array_equal(built["megatron"].dataset_sample_index, built["1 stage"].dataset_sample_index))
    del built
    peaks = {name: peak_mb(make) for name, make in builders.items()}

    med = {k: statistics.median(v) for k, v in build_times.items()}
    rate = {k: statistics.median(v) for k, v in rates.items()}
    print(f"blend: {args.domains} domains, {args.samples:,} samples, seq {args.seq_length}; "
          f"{args.rounds} alternating rounds, medians; {args.fetches:,} random fetches per round")
    print(f"{'':10s} {'build s':>9s} {'fetch/s':>10s} {'build peak MB':>14s}")
    for k in builders:
        print(f"{k:10s} {med[k]:9.3f} {rate[k]:10.0f} {peaks[k]:14.1f}")
    print(f"1-stage arrays identical to megatron-core BlendedDataset: {same}")
    print(f"build speed, 1 stage vs megatron: {med['megatron'] / med['1 stage']:.2f}x  (target >= 0.95x)")
    print(f"fetch speed, 1 stage vs megatron: {rate['1 stage'] / rate['megatron']:.2f}x  (target >= 0.95x)")
    print(f"build time, 8 stages vs 1 stage: {med['8 stages'] / med['1 stage']:.2f}x  (target <= 1.5x)")
    print(f"fetch speed, 8 stages vs megatron: {rate['8 stages'] / rate['megatron']:.2f}x")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
