"""The launcher's run inside a long-lived process, which is left as megatron-core found it afterwards.

`pretrain_regmixd.py` trains one run per process. A sweep worker (`tools.sweep_worker`) imports
megatron-core once and trains proxies one after another; between them, everything `Trainer.build`
sets up process-wide is torn down here: torch.distributed, parallel_state's groups and memory buffer,
the micro-batch calculator, the `--save` lock (the RNG tracker and seeds are re-created by the next
`initialize`). A run trained this way equals the same run in a fresh process (tests/test_sweep.py).
"""
import time

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

from megatron_ext.arguments import parse_args
from megatron_ext.callbacks import Callback
from megatron_ext.ownership import own_launch, release_save_dir
from megatron_ext.trainer import Trainer


def reset_megatron() -> None:
    """Undo `trainer.initialize` (idempotent; also after a run that failed half-way through its build)."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    destroy_num_microbatches_calculator()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PhaseTimes(Callback):
    """Where a run's wall time goes: `build` (until the first step: data, model, restore), `train`
    (the steps' own time), `eval` (evaluations) and `save` (the rest between steps: checkpoints and
    log writes)."""
    name = "phase_times"

    def __init__(self):
        self.mark = time.perf_counter()
        self.seconds = {"build": 0.0, "train": 0.0, "eval": 0.0, "save": 0.0}

    def _since_mark(self) -> float:
        now = time.perf_counter()
        elapsed, self.mark = now - self.mark, now
        return elapsed

    def on_fit_start(self, trainer):
        self.seconds["build"] += self._since_mark()

    def on_step_end(self, trainer, step):
        self.seconds["train"] += step.seconds
        self.seconds["save"] += self._since_mark() - step.seconds

    def on_eval(self, trainer, record):
        self.seconds["eval"] += self._since_mark()

    def on_fit_end(self, trainer):
        self.seconds["save"] += self._since_mark()


def train_in_process(argv: list, callbacks=()) -> int:
    """`pretrain_regmixd.py ARGV` in this process (single rank); `callbacks` join the launcher's own."""
    args = parse_args(argv)
    own_launch(args)
    try:
        return Trainer(args, callbacks=list(callbacks)).fit()
    finally:
        reset_megatron()
        if args.save:
            release_save_dir(args.save)
