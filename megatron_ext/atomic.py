"""Atomic file writes: write a temp file in the destination's folder, then `os.replace` it into place.

Readers, and a run killed half-way, see the old file or the new one, never half of one; the temp lives
in the same folder so the rename stays on one filesystem. Every module writes its outputs through this.
"""
import contextlib
import os
import secrets

from megatron_ext.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False):
    """Yield a fresh temp path next to `path` (creating the folder) for the caller to write.

    On success the temp replaces `path` (after an fsync if asked); on any exception it is removed and
    the exception re-raised. The temp file exists already, empty, with the mode a plain `open()` gives
    (0666 & ~umask: outputs are shared); `suffix` keeps an extension that np.save or savefig look at.
    A destination that cannot be written (under a file, read-only, a directory) is a one-line UserError.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, cannot write a file there")
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}{suffix}")
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
    except OSError as exc:  # an output path under a file, or in a read-only folder: the user's to fix
        raise UserError(f"{path}: cannot write there ({exc.strerror})") from None
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str, data: str | bytes, fsync: bool = False) -> None:
    """Write `data` (text or bytes) to `path` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


def make_output_dir(path: str, what: str = "output folder") -> str:
    """Create the folder `path` (and its parents) for outputs; a path under a file, a file itself or
    a read-only parent is a one-line UserError naming `what`. Returns `path`."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        reason = "exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror
        raise UserError(f"{what} {path}: cannot create it ({reason})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: is not writable")
    return path
