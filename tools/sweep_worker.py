"""A sweep worker: imports megatron-core once and trains the runs it is given one after another.

    python -m tools.sweep_worker SWEEP        # started by `tools.sweep run`, one per --jobs slot

Reads run ids on stdin, one per line; for each calls `tools.sweep.run_one` (claim, resume, retries,
`done` / `failed` markers as ever) and answers on stdout `attempt ID N` as attempt N starts and
`result ID CODE` at the end; exits at the end of stdin. With the default launcher command each
attempt runs `pretrain_regmixd.py`'s training in this process (`megatron_ext.in_process`) with its
output appended to the run's log, and the `done` marker records where the run's time went
(`phases_s`: build, train, eval, save; `worker_start_s`: its megatron-core import, on its first run).
A custom `--command` runs in a child process per attempt, as `run-one` does. The timeout of an
in-process attempt is the runner's: it kills the worker, which loses that attempt.
"""
import os
import signal
import sys
import time
import traceback

import megatron_ext.quiet_imports  # noqa: F401  (before megatron-core)
from megatron_ext.errors import UserError
from tools.cli import run_main
from tools.sweep import (DEFAULT_COMMAND, LOG, RunSettings, attempt, free_port, judge_attempt, prepare_attempt,
                         run_one)


class InProcessAttempt:
    """`tools.sweep.attempt`'s contract, with the launcher's training run in this process."""

    def __init__(self):
        start = time.time()
        import pretrain_regmixd  # noqa: F401  (the launcher's warning filters, then megatron-core)
        from megatron_ext import in_process   # the import this worker pays once
        self.in_process = in_process
        self.start_s = time.time() - start    # reported once, with this worker's first run

    def __call__(self, settings: RunSettings, run_dir: str, lock_fd: int, number: int) -> tuple:
        argv, _ = prepare_attempt(settings, run_dir, number)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        phases = self.in_process.PhaseTimes()
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush(), sys.stderr.flush()
        with open(os.path.join(run_dir, LOG), "a") as log:
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            self.in_process.train_in_process(argv[2:], callbacks=[phases])
            ok, reason = judge_attempt(settings, run_dir)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            ok, reason = False, f"error: {exc}"
        except Exception as exc:  # the launcher crashed: its traceback goes to the run's log
            traceback.print_exc()
            ok, reason = False, f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        details = {"phases_s": {k: round(v, 3) for k, v in phases.seconds.items()}}
        if self.start_s is not None:
            details["worker_start_s"], self.start_s = round(self.start_s, 3), None
        return ok, reason, details


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise UserError("usage: python -m tools.sweep_worker SWEEP (run ids on stdin)")
    sweep = argv[0]
    # answers go to the runner through the original stdout; stray prints go to stderr instead
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwinds: the run's claim is removed
    settings = RunSettings.load(sweep)
    if settings.cwd:
        os.chdir(settings.cwd)
    attempt_fn = InProcessAttempt() if settings.command == DEFAULT_COMMAND else attempt
    for line in sys.stdin:
        run_id = line.strip()
        try:
            code = run_one(sweep, run_id, settings, attempt_fn,
                           on_attempt=lambda n: print(f"attempt {run_id} {n}", file=answers))
            print(f"result {run_id} {code}", file=answers)
        except BrokenPipeError:          # the runner is gone: the run is finished, stop here
            return 0
        if code == 143:
            return 143
    return 0


if __name__ == "__main__":
    run_main(main)
