"""Pretrain a LLaMA-like GPT on megatron-core with a per-stage data-mixture schedule (RegMix-D).

    torchrun --nproc_per_node N pretrain_regmixd.py --config examples/proxy_1m.yaml --data-schedule sched.json --save run/

Flags are Megatron-LM's (see megatron_ext/arguments.py). Each evaluation appends the loss on every
domain's validation set to the trajectory file; checkpoints resume exactly. The loop is
`megatron_ext.trainer.Trainer`; `--mixture-controller` adds an online mixture controller to it.
"""
import os
import sys

import megatron_ext.quiet_imports  # noqa: F401  (before megatron-core)
from megatron_ext.arguments import parse_args
from megatron_ext.errors import UserError
from megatron_ext.ownership import own_launch
from megatron_ext.trainer import Trainer
from tools.cli import run_main


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        own_launch(args)  # lock --save for this process's lifetime; helper processes die with it
        return Trainer(args).fit()
    except UserError:
        if int(os.environ.get("RANK", "0")) != 0:  # every rank exits 2; rank 0 prints the one line
            sys.exit(2)
        raise


if __name__ == "__main__":
    run_main(main)
