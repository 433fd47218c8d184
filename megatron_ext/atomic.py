"""Atomic file writes: write a temp file in the destination's folder, then `os.replace` it into place.

Readers, and a run killed half-way, see the old file or the new one, never half of one; the temp lives
in the same folder so the rename stays on one filesystem. Every module writes its outputs through this.
"""
import contextlib
import os
import secrets


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False):
    """Yield a fresh temp path next to `path` (creating the folder) for the caller to write.

    On success the temp replaces `path` (after an fsync if asked); on any exception it is removed and
    the exception re-raised. The temp file exists already, empty, with the mode a plain `open()` gives
    (0666 & ~umask: outputs are shared); `suffix` keeps an extension that np.save or savefig look at.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
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
