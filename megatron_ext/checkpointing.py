"""Atomic, resumable checkpoints: megatron-core dist_checkpointing for model and optimizer.

Layout (as Megatron-LM): `<save>/iter_0000100/` and `<save>/latest_checkpointed_iteration.txt`.
`iter_*/` holds the dist_checkpointing shards of the model and optimizer (reshardable across TP/PP),
`regmixd_state.pt` (iteration, consumed samples, LR scheduler, dataset state, args) and
`rng_rank<r>.pt` (each rank's generators, restored only on the same world size).

Atomicity: every rank writes into `iter_XXXXXXX.tmp/`; after a barrier, rank 0 renames it to
`iter_XXXXXXX/` and only then replaces the tracker file, so a killed save leaves the previous
checkpoint as the latest one. Each save first removes every `iter_*.tmp` left by killed saves, and
with `keep` > 0 deletes all but the newest `keep` checkpoints once the new one is the latest.

Compatibility: `regmixd_state.pt` records the model's shape (`MODEL_SHAPE_FIELDS`); loading a
checkpoint of another shape, or one that cannot be read, is a one-line UserError, not a traceback.
"""
import os
import pickle
import random
import shutil

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from megatron_ext.atomic import atomic_write
from megatron_ext.checkpoint_files import (TRACKER, checkpoint_dir, latest_iteration, prune_checkpoints,
                                           remove_stale_saves)
from megatron_ext.errors import UserError
from megatron_ext.ownership import checkpoint_writes_die_with_launcher

STATE = "regmixd_state.pt"
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
# what a damaged or foreign checkpoint raises while being read (torch.distributed.checkpoint's
# CheckpointException, which wraps a shard's read error, derives from BaseException)
_UNREADABLE = (CheckpointingException, TorchCheckpointException, OSError, EOFError, pickle.UnpicklingError,
               RuntimeError, KeyError, ValueError)


def model_shape(model) -> dict:
    """The shape a GPTModel's parameters follow (config fields and the padded vocabulary)."""
    return {**{f: getattr(model.config, f) for f in MODEL_SHAPE_FIELDS}, "padded_vocab_size": model.vocab_size}


def expected_model_shape(args, padded_vocab: int) -> dict:
    """`model_shape` of the model the launcher's flags will build (before building it)."""
    return {**{f: getattr(args, f) for f in MODEL_SHAPE_FIELDS}, "padded_vocab_size": padded_vocab}


def recorded_shape(state: dict) -> dict:
    """The model shape a checkpoint's state records (older checkpoints: the fields of its args)."""
    if "model_shape" in state:
        return state["model_shape"]
    args = state.get("args") or {}
    return {f: args[f] for f in MODEL_SHAPE_FIELDS if args.get(f) is not None}


def shape_mismatch(saved: dict, wanted: dict) -> str:
    """'' when compatible, else the first differing field as '--flag X in the checkpoint, Y now'."""
    for key, value in wanted.items():
        if key in saved and saved[key] != value:
            return f"--{key.replace('_', '-')} {saved[key]} in the checkpoint, {value} now"
    return ""


def read_state(path: str) -> dict:
    """A checkpoint folder's `regmixd_state.pt`; a missing or damaged one is a one-line UserError."""
    file = os.path.join(path, STATE)
    try:
        state = torch.load(file, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} is incomplete: no {STATE}") from None
    except _UNREADABLE as exc:
        raise UserError(f"checkpoint {path} is damaged: {STATE} unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "iteration" not in state:
        raise UserError(f"checkpoint {path} is damaged: {STATE} is not a regmixd state")
    return state


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


def save_checkpoint(root: str, iteration: int, model, optimizer, extra: dict, keep: int = 0) -> None:
    """Write `iter_<iteration>` atomically; `extra` is this run's non-tensor state (rank 0 writes it).
    `keep` > 0: afterwards only the newest `keep` checkpoints remain."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        remove_stale_saves(root)  # saves killed earlier, of any iteration
        os.makedirs(tmp)
    _barrier()
    checkpoint_writes_die_with_launcher()
    dist_checkpointing.save(sharded_state(model, optimizer), tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(dict(extra, iteration=iteration, model_shape=model_shape(model)), os.path.join(tmp, STATE))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(os.path.join(root, TRACKER), f"{iteration}\n", fsync=True)
        prune_checkpoints(root, keep)
    _barrier()


def load_checkpoint(root: str, model, optimizer, load_optimizer: bool = True, load_rng: bool = True):
    """Load the latest checkpoint under `root` into model (and optimizer); returns its extra state
    (None when `root` has no checkpoint yet, so `--load` may point at a fresh `--save`, and for a
    model-only checkpoint, whose run starts fresh from its weights).
    `load_rng=False` leaves this process's generators alone (loading another run's model)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = latest_checkpoint(root)
    extra = read_state(path)
    mismatch = shape_mismatch(recorded_shape(extra), model_shape(model))
    if mismatch:
        raise UserError(f"--load {root}: checkpoint of another model ({mismatch})")
    model_only = bool(extra.get("model_only"))  # tools.import_hf: weights only; the run starts fresh
    try:
        loaded = dist_checkpointing.load(
            sharded_state(model, optimizer if load_optimizer and not model_only else None, is_loading=True), path)
        model.load_state_dict(loaded["model"])
        if model_only:
            if optimizer is not None:
                optimizer.reload_model_params()  # fp32 main copies of bf16/fp16 params
            return None
        if load_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
    except _UNREADABLE as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"--load {root}: cannot load checkpoint {path} (damaged or from another model: "
                        f"{type(exc).__name__}: {first})") from None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if load_rng and extra.get("world_size") == _world_size() and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return extra


def latest_checkpoint(root: str) -> str:
    """The folder the tracker names; a tracker naming a missing folder is a one-line UserError."""
    iteration = latest_iteration(root)
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise UserError(f"{root}: tracker names iteration {iteration} but {path} is missing")
    return path


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def parallel_layout() -> dict:
    return {"world_size": _world_size(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size()}
