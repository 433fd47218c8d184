"""Atomic, resumable checkpoints: megatron-core dist_checkpointing for model and optimizer.

Layout (as Megatron-LM): `<save>/iter_0000100/` and `<save>/latest_checkpointed_iteration.txt`.
`iter_*/` holds the dist_checkpointing shards of the model and optimizer (reshardable across TP/PP),
`regmixd_state.pt` (iteration, consumed samples, LR scheduler, dataset state, args) and
`rng_rank<r>.pt` (each rank's generators, restored only on the same world size).

Atomicity: every rank writes into `iter_XXXXXXX.tmp/`; after a barrier, rank 0 renames it to
`iter_XXXXXXX/` and only then replaces the tracker file, so a killed save leaves the previous
checkpoint as the latest one.
"""
import os
import random
import shutil

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_ext.atomic import atomic_write
from megatron_ext.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
STATE = "regmixd_state.pt"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core import tensor_parallel

    state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def sharded_state(model, optimizer=None, is_loading: bool = False) -> dict:
    """The dist_checkpointing view of the model (and optimizer, whose shards refer to the model's).
    `is_loading` makes the optimizer create its (lazily built) Adam state so there is a target."""
    state = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading)
    return state


def save_checkpoint(root: str, iteration: int, model, optimizer, extra: dict) -> None:
    """Write `iter_<iteration>` atomically; `extra` is this run's non-tensor state (rank 0 writes it)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_state(model, optimizer), tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(dict(extra, iteration=iteration), os.path.join(tmp, STATE))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(os.path.join(root, TRACKER), f"{iteration}\n", fsync=True)
    _barrier()


def latest_iteration(root: str):
    """The iteration in `<root>/latest_checkpointed_iteration.txt`, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise UserError(f"{path}: expected an iteration number, got {text[:40]!r}")
    return int(text)


def load_checkpoint(root: str, model, optimizer, load_optimizer: bool = True, load_rng: bool = True):
    """Load the latest checkpoint under `root` into model (and optimizer); returns its extra state
    (None when `root` has no checkpoint yet, so `--load` may point at a fresh `--save`).
    `load_rng=False` leaves this process's generators alone (loading another run's model)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise UserError(f"{root}: tracker names iteration {iteration} but {path} is missing")
    loaded = dist_checkpointing.load(sharded_state(model, optimizer if load_optimizer else None, is_loading=True), path)
    model.load_state_dict(loaded["model"])
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    extra = torch.load(os.path.join(path, STATE), weights_only=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if load_rng and extra.get("world_size") == _world_size() and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return extra


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def parallel_layout() -> dict:
    return {"world_size": _world_size(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size()}
