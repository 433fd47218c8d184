"""pretrain_regmixd.py under torchrun with two gloo processes: TP=2, DP=2 and PP=2 against one process.

TP=2 and DP=2 start from the same weights as one process (CPU initialization draws every weight
from one CPU generator; `--make-vocab-size-divisible-by 64` under TP=2 keeps the padded vocabulary
equal to one process's default 128).
PP=2 initializes each stage from a different RNG stream, so it resumes the single-process
checkpoint of iteration 5 through dist_checkpointing (which reshards it to two stages) and is
compared on iterations 6-10.
"""
import os
import shutil

import pytest

from test_launcher import TINY, corpus, launch, losses  # noqa: F401  (corpus is a fixture)


@pytest.fixture(scope="module")
def reference(corpus):  # noqa: F811
    root, data, sched = corpus
    save = str(root / "reference")
    r = launch(TINY + ["--train-iters", "10", "--data-schedule", sched, "--eval-interval", "10",
                       "--save", save, "--save-interval", "5"])
    assert r.returncode == 0, r.stderr[-3000:]
    return root, sched, save, losses(save)


# TP=2 pads the vocabulary to a multiple of 64 × 2, one process (default 128 × 1) to the same 640
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"],
                                    []], ids=["tp2", "dp2"])
def test_two_processes_match_one(reference, layout):
    root, sched, _, expected = reference
    save = str(root / ("dist_" + ("tp2" if layout else "dp2")))
    r = launch(TINY + layout + ["--train-iters", "10", "--exit-interval", "5", "--data-schedule", sched,
                                "--eval-interval", "5", "--save", save], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(save)
    assert len(got) == 5
    assert got == pytest.approx(expected[:5], abs=1e-4)


def test_pipeline_parallel_resumes_resharded_checkpoint(reference):
    root, sched, ref_save, expected = reference
    save = str(root / "pp2")
    os.makedirs(save)
    shutil.copytree(os.path.join(ref_save, "iter_0000005"), os.path.join(save, "iter_0000005"))
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("5\n")
    r = launch(TINY + ["--pipeline-model-parallel-size", "2", "--train-iters", "10", "--data-schedule", sched,
                       "--eval-interval", "10", "--save", save, "--load", save], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(save)
    assert len(got) == 5
    assert got == pytest.approx(expected[5:], abs=1e-4)
