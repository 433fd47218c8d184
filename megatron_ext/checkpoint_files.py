"""The on-disk layout of a `--save` directory, without torch: names, pruning and disk use.

Megatron-LM's layout: `<save>/iter_0000100/` per checkpoint and `<save>/latest_checkpointed_iteration.txt`
naming the latest. A save is written as `iter_XXXXXXX.tmp/` and renamed when complete, so a `.tmp`
folder is always a killed save. The sweep (which must start fast) and the launcher share these helpers.
"""
import os
import re
import shutil

from megatron_ext.errors import UserError
from megatron_ext.text_files import read_text

TRACKER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d{7,})$")
_ITER_TMP = re.compile(r"^iter_(\d{7,})\.tmp$")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str):
    """The iteration in `<root>/latest_checkpointed_iteration.txt`, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = read_text(path, "checkpoint tracker").strip()
    if not text.isdigit():
        raise UserError(f"{path}: expected an iteration number, got {text[:40]!r}")
    return int(text)


def checkpoint_iterations(root: str) -> list:
    """Iterations of the complete `iter_*` folders under `root`, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER.match, os.listdir(root)) if m)


def remove_stale_saves(root: str) -> None:
    """Delete every `iter_*.tmp` (saves killed before their rename), whatever their iteration.

    Only the owner of `root` calls this (the launcher holds its lock), so no save is in flight."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if _ITER_TMP.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def prune_checkpoints(root: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (the tracker's among them), delete older ones;
    `keep` <= 0 keeps them all (Megatron-LM's behaviour)."""
    if keep <= 0:
        return
    latest = latest_iteration(root)
    older = [i for i in checkpoint_iterations(root) if i != latest]
    for iteration in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def remove_checkpoints(root: str) -> None:
    """Delete every checkpoint of a finished run: the tracker first, so no reader follows it into a
    half-deleted folder."""
    tracker = os.path.join(root, TRACKER)
    if os.path.exists(tracker):
        os.remove(tracker)
    remove_stale_saves(root)
    for iteration in checkpoint_iterations(root):
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def disk_usage(path: str) -> int:
    """Bytes of every file under `path` (the allocated blocks, as `du`), 0 when it does not exist."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:  # removed while we walk (a running launcher prunes)
                continue
            total += st.st_blocks * 512
    return total
