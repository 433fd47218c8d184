"""One launcher owns a `--save` directory, and the launcher's helper processes die with it.

- `hold_save_dir`: an exclusive `flock` on `<save>/.regmixd_save.lock`, held by the open descriptor
  until the process ends (a SIGKILL too: the kernel drops the lock) or `release_save_dir`. A second
  launcher on the same directory stops with one line naming the holder, before it touches anything there.
- `die_with_launcher`: Linux's parent-death signal (`PR_SET_PDEATHSIG` = SIGKILL) for
  (a) a torchrun worker, which torch.distributed.elastic starts in its own session, so a `kill -9`
  of torchrun's process group would otherwise leave it training beside a restarted run;
  (b) every process the launcher forks (megatron-core's checkpoint writer processes);
  (c) megatron-core's spawned multiprocessing manager behind its checkpoint write-results queue,
  which otherwise outlives a killed launcher. megatron-core creates that queue lazily in a module
  global of `filesystem_async`; `checkpoint_writes_die_with_launcher` (called before each save)
  creates it first, with a manager that arms the signal as it starts.
"""
import ctypes
import fcntl
import multiprocessing
import os
import signal
import socket
import sys
import threading
from multiprocessing.managers import SyncManager

from megatron_ext.errors import UserError

LOCK_FILE = ".regmixd_save.lock"
_PR_SET_PDEATHSIG = 1
_held = {}        # absolute save path -> open descriptor holding the lock (for the process's lifetime)
_managers = []    # the write-results manager: kept referenced so it lives as long as the launcher
_fork_hook = {"registered": False, "from_main_thread": False, "parent": 0}


def hold_save_dir(save: str) -> None:
    """Create `save` if needed and lock it for this process's lifetime; a held lock is a one-line error."""
    path = os.path.abspath(save)
    if path in _held:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--save {save}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"--save {save}: cannot create or write there ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"--save {save}: in use by another launcher ({holder}); "
                        f"stop it or choose another --save") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[path] = fd


def release_save_dir(save: str) -> None:
    """Give up `hold_save_dir`'s lock before the process ends (one process training runs one after another)."""
    fd = _held.pop(os.path.abspath(save), None)
    if fd is not None:
        os.close(fd)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux); exits at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:   # the parent died before the signal was armed
        os._exit(1)


def _before_fork() -> None:
    # the signal fires when the forking *thread* ends: arm it only for forks from the main thread
    _fork_hook["from_main_thread"] = threading.current_thread() is threading.main_thread()
    _fork_hook["parent"] = os.getpid()   # read in the child: a parent dying mid-fork is then noticed


def _after_fork_in_child() -> None:
    if _fork_hook["from_main_thread"]:
        die_with_parent(_fork_hook["parent"])


def die_with_launcher() -> None:
    """Make this launcher (under torchrun) and every process it forks die with their parent.
    Call from the main thread before torch.distributed starts."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(os.getppid())
    _arm_forked_children()


def _arm_forked_children() -> None:
    if not _fork_hook["registered"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook["registered"] = True


def checkpoint_writes_die_with_launcher() -> None:
    """Before megatron-core's first checkpoint save (from the main thread): its write-results queue,
    created here by a manager that dies with this process, as megatron-core would create it lazily."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    _arm_forked_children()   # megatron-core's writer processes are forked from this thread
    if filesystem_async._results_queue is None:
        # the same spawn context as megatron-core's own `_get_write_results_queue`
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
        _managers.append(manager)


def own_launch(args) -> None:
    """The launcher's start: rank 0 locks `--save`; every rank's helpers die with it."""
    if args.save and int(os.environ.get("RANK", "0")) == 0:
        hold_save_dir(args.save)
    die_with_launcher()
