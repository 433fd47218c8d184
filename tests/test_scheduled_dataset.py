"""ScheduledBlendedDataset: Megatron equality, per-stage shares, no repeats, resume, override, controller."""
import json
import logging

import numpy as np
import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

from fixtures import make_domains
from megatron_ext.schedule import MixtureSchedule, ScheduleError
from megatron_ext.scheduled_dataset import (ScheduledBlendedDataset, build_train_valid_datasets,
                                            gpt_dataset_config)

VOCAB = 512
SEQ = 32
NAMES = ("web", "code", "books", "wiki")


@pytest.fixture(scope="module")
def tok():
    return NullTokenizer(VOCAB)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tok"))
    data = make_domains(root, domains=NAMES[:3], n_docs=600, vocab_size=VOCAB)
    # wiki is small (about 76 samples of 32 tokens per epoch), so schedules can exhaust it
    data.update(make_domains(root, domains=NAMES[3:], n_docs=40, doc_len=(60, 61), vocab_size=VOCAB, seed=1))
    return data


def schedule(data, stages, unit="fraction"):
    return MixtureSchedule.from_dict({"version": 1, "unit": unit, "stages": [
        {"start": start, "train": [x for name, w in blend.items() for x in (w, data[name]["train"])]}
        for start, blend in stages]})


class FakeDomain:
    """A stand-in per-domain dataset: sample k of domain d is (d, k); counts its builds."""

    def __init__(self, d, n):
        self.d, self.n = d, n

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        if not 0 <= k < self.n:
            raise IndexError(k)
        return {"tokens": np.array([self.d, k])}


class FakeBuilder:
    def __init__(self):
        self.calls = []

    def __call__(self, ids, num_samples):
        self.calls.append((list(ids), list(num_samples)))
        return [FakeDomain(d, n) for d, n in zip(ids, num_samples)]


def fake(starts, weights, train_samples, **kw):
    return ScheduledBlendedDataset([f"d{i}" for i in range(len(weights[0]))], starts, weights, train_samples,
                                   FakeBuilder(), **kw)


def reference_blend(starts, weights, size):
    """Megatron's greedy (helpers.cpp), restarted per stage, counters carried: plain Python."""
    weights = [np.asarray(w, dtype=np.float64) / np.sum(w) for w in weights]
    counters = np.zeros(len(weights[0]), dtype=np.int64)
    di, dsi = [], []
    for s, (a, b) in enumerate(zip(starts, starts[1:] + [size])):
        w, local = weights[s], np.zeros(len(counters))
        for n in range(b - a):
            errors = [w[d] * max(n, 1) - local[d] if w[d] > 0 else -np.inf for d in range(len(w))]
            d = int(np.argmax(errors))
            di.append(d)
            dsi.append(counters[d])
            local[d] += 1
            counters[d] += 1
    return np.array(di), np.array(dsi)


# --------------------------------------------------------------------------- Megatron equality
def test_one_stage_equals_megatron_blended_dataset(data, tok, tmp_path):
    weights = {"web": 0.45, "code": 0.3, "books": 0.2, "wiki": 0.05}
    sched = schedule(data, [(0, weights)])
    ours, _ = build_train_valid_datasets(sched, train_samples=1003, global_batch_size=1, seq_length=SEQ,
                                         seed=1234, tokenizer=tok, cache_dir=str(tmp_path / "ours"))
    prefixes = [data[n]["train"] for n in weights]
    config = gpt_dataset_config(seed=1234, seq_length=SEQ, tokenizer=tok, train_prefixes=prefixes, valid_prefixes=[],
                                cache_dir=None)  # BlendedDataset caching needs torch.distributed
    config.blend_per_split = [(prefixes, list(weights.values())), None, None]
    ref = BlendedMegatronDatasetBuilder(GPTDataset, [1003, None, None], lambda: True, config).build()[0]
    assert type(ref).__name__ == "BlendedDataset"
    assert len(ours) == len(ref)
    assert np.array_equal(ours.dataset_index, ref.dataset_index)
    assert np.array_equal(ours.dataset_sample_index, ref.dataset_sample_index)
    assert [d.num_samples for d in ours.datasets] == [d.num_samples for d in ref.datasets]
    for i in range(len(ref)):
        a, b = ours[i], ref[i]
        assert a["dataset_id"] == b["dataset_id"]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert np.array_equal(a[key], b[key]), (i, key)


@pytest.mark.parametrize("seed", range(4))
def test_stagewise_cpp_blend_equals_reference_greedy(seed):
    rng = np.random.default_rng(seed)
    n_domains, size = 5, 600
    starts = [0] + sorted(rng.choice(np.arange(1, size - 100), size=3, replace=False).tolist())
    weights = rng.dirichlet(np.ones(n_domains), size=len(starts))
    weights[weights < 0.12] = 0  # zero weights leave a domain out of a stage
    weights[np.arange(len(starts)), rng.integers(0, n_domains, len(starts))] += 0.3
    ds = fake(starts, weights.tolist(), size)
    di, dsi = reference_blend(starts, weights.tolist(), len(ds))
    assert np.array_equal(ds.dataset_index, di)
    assert np.array_equal(ds.dataset_sample_index, dsi)


# --------------------------------------------------------------------------- shares and zero weights
@pytest.mark.parametrize("k", [1, 2, 8])
def test_realized_share_per_stage(k):
    rng = np.random.default_rng(k)
    n_domains, train_samples = 6, 40_000
    starts = [0] + sorted(rng.choice(np.arange(1, 4000), size=k - 1, replace=False) * 10)
    weights = rng.dirichlet(np.ones(n_domains) * 0.7, size=k)
    weights[rng.random(weights.shape) < 0.25] = 0.0
    weights[np.arange(k), rng.integers(0, n_domains, k)] += 0.05
    ds = fake(starts, weights.tolist(), train_samples)
    counts = ds.realized_counts()
    ends = starts[1:] + [len(ds)]
    assert counts.shape == (k, n_domains)
    for s, (a, b) in enumerate(zip(starts, ends)):
        stage = ds.dataset_index[a:b]
        assert np.array_equal(np.bincount(stage, minlength=n_domains), counts[s])
        share = weights[s] / weights[s].sum()
        assert np.all(np.abs(counts[s] - share * (b - a)) <= 1.0), (s, counts[s], share * (b - a))
        assert np.all(counts[s][weights[s] == 0] == 0)
        assert ds.stage_of(a) == s and ds.stage_of(b - 1) == s
        assert ds.weights_at(a) == pytest.approx(dict(zip(ds.domains, share)))


def test_counts_of_sparse_domains_match_the_arrays():
    """Counts come from a backward scan that stops once every weighted domain was seen: domains drawn
    a few times in a long stage (far from its end) or a cut stage still get their exact counts."""
    ds = fake([0, 30_000], [[1, 1, 1e-3, 1e-6, 0], [0, 1, 2e-4, 1, 1]], 60_000)
    ds.append_stage(45_000, [1, 0, 1e-5, 1, 0])
    starts = ds.stage_starts
    for s, (a, b) in enumerate(zip(starts, starts[1:] + [len(ds)])):
        assert np.array_equal(ds.realized_counts()[s], np.bincount(ds.dataset_index[a:b], minlength=5)), s
    assert 0 < ds.realized_counts()[:, 2].min() <= 2  # domain 2 is sparse in every stage


# --------------------------------------------------------------------------- no repeats
def one_epoch(gpt) -> int:
    return (int(gpt.dataset.sequence_lengths.sum()) - 1) // SEQ


def test_no_repeats_across_stage_changes_until_exhaustion(data, tok):
    # wiki is drawn a little in stage 0 and more in stage 2: between 1 and 1.8 of its epochs in all
    sched = schedule(data, [(0, {"web": 1, "code": 1, "wiki": 0.05}), (0.3, {"web": 1, "books": 1}),
                            (0.6, {"code": 1, "books": 1, "wiki": 0.2})])
    ds, _ = build_train_valid_datasets(sched, train_samples=2400, global_batch_size=8, seq_length=SEQ, seed=7,
                                       tokenizer=tok)
    for d, name in enumerate(ds.domains):
        drawn = ds.dataset_sample_index[ds.dataset_index == d]
        assert np.array_equal(drawn, np.arange(len(drawn))), name  # counters continue across stages
        if name != "wiki":
            assert len(drawn) <= one_epoch(ds.datasets[d])
            tokens = {tuple(ds.datasets[d][int(k)]["tokens"].tolist()) for k in drawn}
            assert len(tokens) == len(drawn), name  # distinct samples
    wiki = ds.domains.index("wiki")
    gpt, n = ds.datasets[wiki], one_epoch(ds.datasets[wiki])
    drawn = ds.dataset_sample_index[ds.dataset_index == wiki]
    stage0 = ds.realized_counts()[0, wiki]
    assert 0 < stage0 < n < len(drawn) < 1.8 * n  # Megatron keeps this short final epoch separate
    assert sorted(gpt.shuffle_index[drawn[:n]].tolist()) == list(range(n))  # the first epoch exactly once
    assert np.all(gpt.shuffle_index[drawn[n:]] >= n)  # only then samples of the second epoch


# --------------------------------------------------------------------------- resume and override
STAGES = [(0, {"web": 3, "code": 1}), (0.25, {"web": 1, "books": 2, "wiki": 1}), (0.7, {"code": 1, "wiki": 1})]


def test_resume_gives_the_uninterrupted_sequence(data, tok):
    sched = schedule(data, STAGES)
    kw = dict(train_samples=1200, global_batch_size=8, seq_length=SEQ, seed=3, tokenizer=tok)
    run, _ = build_train_valid_datasets(sched, **kw)
    run.append_stage(960, {"books": 1, "web": 1})  # a controller stage, part of the run's state
    consumed = 520
    state = json.loads(json.dumps(run.state_dict()))  # plain types: survives any serializer
    restarted, _ = build_train_valid_datasets(sched, **kw)
    restarted.load_state_dict(state)
    assert restarted.stage_starts == run.stage_starts == [0, 304, 840, 960]
    assert np.array_equal(restarted.dataset_index, run.dataset_index)
    assert np.array_equal(restarted.dataset_sample_index, run.dataset_sample_index)
    assert np.array_equal(restarted.realized_counts(), run.realized_counts())
    for i in range(consumed, len(run)):
        assert np.array_equal(restarted[i]["tokens"], run[i]["tokens"]), i


def test_changed_schedule_is_refused_without_override(data, tok):
    kw = dict(train_samples=1200, global_batch_size=8, seq_length=SEQ, seed=3, tokenizer=tok)
    run, _ = build_train_valid_datasets(schedule(data, STAGES), **kw)
    changed = STAGES[:2] + [(0.7, {"code": 2, "wiki": 1})]
    other, _ = build_train_valid_datasets(schedule(data, changed), **kw)
    with pytest.raises(ScheduleError, match="differs from the checkpoint.*--override-data-schedule"):
        other.load_state_dict(run.state_dict())
    longer, _ = build_train_valid_datasets(schedule(data, STAGES), **{**kw, "train_samples": 1600})
    with pytest.raises(ScheduleError, match="differs from the checkpoint"):
        longer.load_state_dict(run.state_dict())


def test_override_keeps_the_past_and_applies_the_new_schedule_from_the_resume_point(data, tok):
    kw = dict(train_samples=1200, global_batch_size=8, seq_length=SEQ, seed=3, tokenizer=tok)
    run, _ = build_train_valid_datasets(schedule(data, STAGES), **kw)
    new = [(0, {"web": 1}), (0.5, {"books": 1, "wiki": 3}), (0.8, {"web": 1, "code": 1})]
    resumed, _ = build_train_valid_datasets(schedule(data, new), **kw)
    resume = 400  # inside the old stage 1; the new schedule's stage 0 is active there
    with pytest.raises(ScheduleError, match="resume sample"):
        resumed.load_state_dict(run.state_dict(), override=True)
    resumed.load_state_dict(run.state_dict(), override=True, resume_sample=resume)
    assert resumed.stage_starts == [0, 304, 400, 600, 960]
    names = lambda ds: np.array(ds.domains)[ds.dataset_index]  # the two schedules order domains differently
    assert resumed.domains == ["web", "books", "wiki", "code"]
    assert np.array_equal(names(resumed)[:resume], names(run)[:resume])
    assert np.array_equal(resumed.dataset_sample_index[:resume], run.dataset_sample_index[:resume])
    for i in range(resume):
        assert np.array_equal(resumed[i]["tokens"], run[i]["tokens"])
    assert set(resumed.dataset_index[resume:600].tolist()) == {resumed.domains.index("web")}
    assert resumed.weights_at(700) == pytest.approx({"web": 0, "code": 0, "books": 0.25, "wiki": 0.75})
    # counters continue: each domain's first sample after the resume point follows its last before it
    for name in resumed.domains:
        before = run.dataset_sample_index[:resume][names(run)[:resume] == name]
        after = resumed.dataset_sample_index[resume:][names(resumed)[resume:] == name]
        assert len(after) and after[0] == len(before)
    # and it is exactly the dataset of those stages built directly
    direct = fake(resumed.stage_starts, [list(resumed.stage_weights(s).values()) for s in range(5)], 1200)
    assert np.array_equal(direct.dataset_index, resumed.dataset_index)
    assert np.array_equal(direct.dataset_sample_index, resumed.dataset_sample_index)


def test_override_grows_a_dataset_the_new_schedule_overruns(caplog):
    run = fake([0], [[1, 1]], 1000)
    assert [len(d) for d in run.datasets] == [503, 503]
    resumed = fake([0], [[1, 0.01]], 1000)
    builder = resumed._build_datasets
    builder.calls.clear()
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(run.state_dict(), override=True, resume_sample=100)
    assert resumed.dataset_num_samples[0] == int(np.ceil(resumed.realized_counts().sum(0)[0] * 1.005))
    assert "re-shuffled" in caplog.text
    assert builder.calls[0] == ([0, 1], [503, 503])  # first the checkpoint's own datasets


# --------------------------------------------------------------------------- controller
def test_append_stage_keeps_realized_samples_and_checks_input():
    ds = fake([0, 300], [[1, 1, 0], [0, 1, 1]], 1000, reserve_samples=1000)
    before_di, before_dsi = ds.dataset_index[:600].copy(), ds.dataset_sample_index[:600].copy()
    ds.append_stage(600, {"d0": 1.0})
    assert ds.stage_starts == [0, 300, 600]
    assert np.array_equal(ds.dataset_index[:600], before_di)
    assert np.array_equal(ds.dataset_sample_index[:600], before_dsi)
    assert set(ds.dataset_index[600:].tolist()) == {0}
    assert ds.dataset_sample_index[600] == ds.realized_counts()[:2, 0].sum()
    assert ds.realized_counts()[1].sum() == 300
    assert len(ds._build_datasets.calls) == 1  # the reserve covers the new stage: nothing rebuilt
    bad_calls = [((600, [1, 1, 1]), "must lie after"), ((700, [1, 1]), "2 weights for 3 domains"),
                 ((700, {"zz": 1}), "unknown domain 'zz'"), ((700, [0, 0, 0]), "all weights are 0"),
                 ((700, [float("nan"), 1, 1]), "finite"), ((1000, [1, 1, 1]), "before the end of training")]
    for bad, message in bad_calls:
        with pytest.raises(ScheduleError, match=message):
            ds.append_stage(*bad)


def test_index_cache_is_reused(tmp_path):
    cache = str(tmp_path / "cache")
    first = fake([0, 500], [[1, 2], [3, 1]], 2000, cache_dir=cache)
    files = sorted(p.name for p in tmp_path.joinpath("cache").iterdir())
    assert len(files) == 6 and not any(f.startswith(".tmp") for f in files)
    for f in tmp_path.joinpath("cache").glob("*dataset_index.npy"):
        np.save(f, np.load(f)[::-1].copy())  # tamper: a cache hit must now show up in the arrays
    second = fake([0, 500], [[1, 2], [3, 1]], 2000, cache_dir=cache)
    assert not np.array_equal(second.dataset_index, first.dataset_index)
    third = fake([0, 500], [[1, 2], [3, 1]], 2000)
    assert np.array_equal(third.dataset_index, first.dataset_index)


# --------------------------------------------------------------------------- validation sets
def test_valid_datasets_cover_each_file_deterministically(data, tok):
    sched = schedule(data, [(0, {"web": 1, "code": 1})])
    kw = dict(train_samples=100, global_batch_size=4, seq_length=SEQ, seed=5, tokenizer=tok)
    _, valid = build_train_valid_datasets(sched, **kw)
    _, again = build_train_valid_datasets(sched, **kw)
    assert list(valid) == ["web", "code"]  # the siblings of the train prefixes
    for name, ds in valid.items():
        tokens = int(ds.dataset.sequence_lengths.sum())
        assert len(ds) == (tokens - 1) // SEQ  # one epoch of the whole valid file
        assert all(np.array_equal(ds[i]["tokens"], again[name][i]["tokens"]) for i in range(len(ds)))
    _, more = build_train_valid_datasets(sched, **kw, valid_samples_per_domain=3 * len(valid["web"]))
    assert len(more["web"]) >= 3 * len(valid["web"])


def test_truncated_index_cache_files_are_rebuilt(data, tok, tmp_path):
    """A killed cache write (ours or megatron-core's GPTDataset `.npy` files) leaves a truncated file;
    the next run rebuilds that entry and gets the same arrays instead of failing on it."""
    sched = schedule(data, [(0, {"web": 0.6, "wiki": 0.4}), (0.5, {"web": 0.2, "code": 0.8})])
    cache = tmp_path / "cache"

    def build():
        return build_train_valid_datasets(sched, train_samples=300, global_batch_size=1, seq_length=SEQ,
                                          seed=1234, tokenizer=tok, cache_dir=str(cache))

    first, valid = build()
    truncated = sorted(cache.glob("*.npy"))
    assert any("GPTDataset" in p.name for p in truncated) and any("ScheduledBlended" in p.name for p in truncated)
    for path in truncated:
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    second, valid2 = build()
    assert np.array_equal(first.dataset_index, second.dataset_index)
    assert np.array_equal(first.dataset_sample_index, second.dataset_sample_index)
    for a, b in zip(first.datasets, second.datasets):
        assert np.array_equal(a.shuffle_index, b.shuffle_index) and np.array_equal(a.sample_index, b.sample_index)
    assert all(np.load(p, allow_pickle=True, mmap_mode="r") is not None for p in truncated)   # whole again
    assert [np.asarray(valid2[d][0]["tokens"]).tolist() for d in valid2] == \
        [np.asarray(valid[d][0]["tokens"]).tolist() for d in valid]
