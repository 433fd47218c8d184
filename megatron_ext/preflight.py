"""Checks that run before any training: what would otherwise fail later, or silently, fails now in one line.

`preflight` is called by the launcher once the schedule and tokenizer exist and before the model is
built: output paths are writable directories, `--target-domain` names a validation domain, every token
file agrees with its `.idx` (header, sizes, dtype, token ids below the vocabulary, sampled cheaply),
and a `--load` checkpoint is readable and has the shape the flags build.
"""
import os
import struct

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

from megatron_ext.checkpoint_files import latest_iteration
from megatron_ext.checkpointing import (expected_model_shape, latest_checkpoint, read_state, recorded_shape,
                                        shape_mismatch)
from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule, domain_name
from megatron_ext.scheduled_dataset import valid_prefixes_for

_HEADER_BYTES = 34                 # magic (9) + version (8) + dtype code (1) + sequence and document counts (16)
FULL_SCAN_TOKENS = 1 << 24         # token files up to this size are scanned whole for the largest id
SAMPLE_WINDOWS, SAMPLE_TOKENS = 64, 1 << 16   # larger files: evenly spaced windows


def check_output_dir(flag: str, path: str) -> None:
    """`path` is (or can be made) a writable directory: not a file, not under a file, not read-only."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable")


def check_outputs(args) -> None:
    for flag, path in (("--save", args.save), ("--tensorboard-dir", args.tensorboard_dir),
                       ("--data-cache-path", args.data_cache_path)):
        if path:
            check_output_dir(flag, path)
    if args.trajectory_file:
        if os.path.isdir(args.trajectory_file):
            raise UserError(f"--trajectory-file {args.trajectory_file}: is a directory")
        if os.path.exists(args.trajectory_file) and not os.access(args.trajectory_file, os.W_OK):
            raise UserError(f"--trajectory-file {args.trajectory_file}: is not writable")
        check_output_dir("--trajectory-file", os.path.dirname(os.path.abspath(args.trajectory_file)))


def check_token_file(prefix: str, vocab_limit: int) -> None:
    """`prefix.idx` is a whole Megatron index, `prefix.bin` has exactly the tokens it describes, and
    every sampled token id lies in [0, vocab_limit)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES:
        raise UserError(f"{idx}: truncated ({idx_size} bytes, shorter than the index header)")
    if head[:9] != _INDEX_HEADER:
        raise UserError(f"{idx}: not a Megatron index file (bad magic bytes)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise UserError(f"{idx}: index version {version}, expected 1")
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except ValueError:
        raise UserError(f"{idx}: unknown token dtype code {code}") from None
    if dtype.kind not in "iu":
        raise UserError(f"{idx}: token dtype {dtype} is not an integer type")
    expected = _HEADER_BYTES + 12 * sequences + 8 * documents
    if idx_size not in (expected, expected + sequences):   # + one mode byte per sequence (multimodal)
        state = "truncated" if idx_size < expected else "longer than its header says"
        raise UserError(f"{idx}: {state} ({idx_size} bytes for {sequences} sequences and {documents} "
                        f"documents: expected {expected})")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_HEADER_BYTES, shape=(sequences,)) \
        if sequences else np.zeros(0, np.int32)
    pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=_HEADER_BYTES + 4 * sequences,
                         shape=(sequences,)) if sequences else np.zeros(0, np.int64)
    bin_size = os.path.getsize(bin_)
    want = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if sequences else 0
    if bin_size != want:
        raise UserError(f"{bin_}: {bin_size} bytes, its .idx describes {want} ({sequences} sequences of {dtype}): "
                        f"{'truncated' if bin_size < want else 'written with another dtype or index'}")
    if sequences and (int(pointers[0]) != 0 or int(lengths.min()) < 0):
        raise UserError(f"{idx}: damaged (negative lengths or a first pointer that is not 0)")
    tokens = bin_size // dtype.itemsize
    if not tokens:
        return
    data = np.memmap(bin_, dtype=dtype, mode="r")
    if tokens <= FULL_SCAN_TOKENS:
        windows = [data]
    else:
        starts = np.linspace(0, tokens - SAMPLE_TOKENS, SAMPLE_WINDOWS).astype(np.int64)
        windows = [data[s:s + SAMPLE_TOKENS] for s in starts]
    low, high = min(int(w.min()) for w in windows), max(int(w.max()) for w in windows)
    if low < 0 or high >= vocab_limit:
        bad = low if low < 0 else high
        raise UserError(f"{bin_}: token id {bad} is outside the tokenizer's vocabulary [0, {vocab_limit}) "
                        f"(tokenized with another tokenizer?)")


def check_token_data(schedule: MixtureSchedule, vocab_limit: int) -> None:
    """Every train and validation prefix the run reads (each checked once)."""
    for prefix in dict.fromkeys(schedule.prefixes + valid_prefixes_for(schedule)):
        check_token_file(prefix, vocab_limit)


def check_target_domain(target_domain, schedule: MixtureSchedule) -> None:
    if not target_domain:
        return
    names = sorted(domain_name(p) for p in valid_prefixes_for(schedule))
    if target_domain not in names:
        raise UserError(f"--target-domain {target_domain!r} is not one of the validation domains {names}")


def check_resume(load: str, wanted_shape: dict) -> None:
    """The latest checkpoint under `load` (if any) is complete and has the model shape the flags build."""
    if not load or not os.path.isdir(load) or latest_iteration(load) is None:
        return
    path = latest_checkpoint(load)
    mismatch = shape_mismatch(recorded_shape(read_state(path)), wanted_shape)
    if mismatch:
        raise UserError(f"--load {load}: checkpoint of another model ({mismatch})")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise UserError(f"--load {load}: checkpoint {path} is damaged (no dist_checkpointing .metadata)")


def preflight(args, schedule: MixtureSchedule, vocab_limit: int, padded_vocab: int) -> None:
    """Every check above; `vocab_limit` = token ids the tokenizer can produce, `padded_vocab` = the
    model's embedding rows."""
    check_outputs(args)
    check_target_domain(args.target_domain, schedule)
    check_token_data(schedule, vocab_limit)
    check_resume(args.load, expected_model_shape(args, padded_vocab))
