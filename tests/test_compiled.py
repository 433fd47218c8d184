"""Compiled surrogate prediction (lleaves): LightGBM's predictions within 1e-9, the same search, a checked cache."""
import os

import numpy as np
import pytest

from megatron_ext import surrogate as surrogate_module
from megatron_ext.mixture_search import SearchConfig, dirichlet
from megatron_ext.surrogate import COMPILED, Surrogate
from test_fit import write_synthetic_sweep
from tools.search import rollout
from tools.surrogate import FitConfig, LGBMSettings, fit_surrogate, trajectory_table

pytest.importorskip("lleaves")


@pytest.fixture(scope="module")
def small_surrogate(tmp_path_factory):
    """A 4-stage first-drop surrogate with 40 trees per model (compiles in about a second)."""
    root = tmp_path_factory.mktemp("compiled")
    write_synthetic_sweep(str(root / "sweep"), runs=48, evals=4)
    table = trajectory_table(str(root / "sweep"), stages=4, targets=["target"], model="first-drop")
    fit_surrogate(table, FitConfig(lgbm=LGBMSettings(num_iterations=40, min_data_in_leaf=3)),
                  {"objective": "target"}).save(str(root / "sur"))
    return str(root / "sur")


def lightgbm_only(folder: str) -> Surrogate:
    s = Surrogate.load(folder)
    s.compiled = dict.fromkeys(s.model_files())  # None: LightGBM predicts
    return s


def search(s: Surrogate):
    prior = np.full(3, 1 / 3)
    cfg = SearchConfig(stages=4, target_tokens=1e9, top_k=20, seed=0, candidates=3000)
    return rollout(s, cfg, prior, np.full(3, np.inf))


def test_compiled_on_first_use_predicts_as_lightgbm(small_surrogate, monkeypatch):
    monkeypatch.setattr(surrogate_module, "COMPILE_AFTER_ROWS", 2000)  # the 3000-candidate search compiles
    fast = Surrogate.load(small_surrogate)
    assert fast.compiled == {}
    result = search(fast)
    assert sorted(fast.compiled) == ["first_00.txt", "lgbm_00.txt"]
    assert all(c is not None for c in fast.compiled.values())
    assert len(os.listdir(os.path.join(small_surrogate, COMPILED))) == 4  # an object and its record per model
    slow = lightgbm_only(small_surrogate)
    reference = search(slow)
    np.testing.assert_allclose(result.weights, reference.weights, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.predicted, reference.predicted, rtol=0, atol=1e-9)
    # a new load uses the cache; predictions within 1e-9 and the same top-k on fresh candidates
    cached = Surrogate.load(small_surrogate)
    assert all(c is not None for c in cached.compiled.values()) and len(cached.compiled) == 2
    W = dirichlet(np.random.default_rng(1), np.ones(3), 5000)
    for progress, state in ((0.0, np.nan), (0.5, 3.0)):
        a = cached.predict_next("target", progress, W, None if progress == 0 else W.mean(0), state)
        b = slow.predict_next("target", progress, W, None if progress == 0 else W.mean(0), state)
        assert np.abs(a - b).max() <= 1e-9
        assert set(np.argsort(a, kind="stable")[:50]) == set(np.argsort(b, kind="stable")[:50])


def test_damaged_cache_falls_back_to_lightgbm(small_surrogate, capsys, monkeypatch):
    Surrogate.load(small_surrogate).compile()
    folder = os.path.join(small_surrogate, COMPILED)
    obj = sorted(n for n in os.listdir(folder) if n.startswith("lgbm_") and n.endswith(".o"))[0]
    with open(os.path.join(folder, obj), "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 64)
    record = sorted(n for n in os.listdir(folder) if n.startswith("first_") and n.endswith(".json"))[0]
    with open(os.path.join(folder, record), "w") as f:
        f.write("{not json")
    s = Surrogate.load(small_surrogate)
    assert s.compiled == {}  # both rejected: LightGBM predicts until a compile replaces them
    err = capsys.readouterr().err
    assert err.count("does not match its record") == 2
    reference = lightgbm_only(small_surrogate)
    W = dirichlet(np.random.default_rng(2), np.ones(3), 100)
    np.testing.assert_array_equal(s.predict_next("target", 0.5, W, W.mean(0), 3.0),
                                  reference.predict_next("target", 0.5, W, W.mean(0), 3.0))
    assert sorted(s.compile()) == ["first_00.txt", "lgbm_00.txt"]  # recompiled and re-cached
    assert len(Surrogate.load(small_surrogate).compiled) == 2
    monkeypatch.setattr(surrogate_module, "compile_host", lambda: None)  # no lleaves: LightGBM, no compile
    s = Surrogate.load(small_surrogate)
    assert s.compile() == {} and set(s.compiled.values()) == {None}
