"""Check or show a data-mixture schedule (`sched.json`).

    python -m tools.schedule validate sched.json   # structure and .bin/.idx files; exit 2 on bad input
    python -m tools.schedule show sched.json       # per-stage weight table
"""
import argparse

from megatron_ext.schedule import MixtureSchedule
from tools.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("validate", "show"))
    parser.add_argument("file", help="sched.json")
    parser.add_argument("--no-check-files", action="store_true", help="validate: skip the .bin/.idx existence check")
    parser.add_argument("--train-samples", type=int, help="show: also resolve stage starts for this run length")
    parser.add_argument("--global-batch-size", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=2048)
    args = parser.parse_args(argv)
    schedule = MixtureSchedule.load(args.file)
    if args.command == "validate":
        schedule.validate(check_files=not args.no_check_files)
        print(f"ok: {args.file}: {len(schedule.stages)} stages, {len(schedule.domains)} domains, "
              f"sha256 {schedule.sha256()}")
        return 0
    print(schedule.table())
    if args.train_samples:
        starts = schedule.resolve(args.train_samples, args.global_batch_size, args.seq_length)
        print("start samples: " + " ".join(map(str, starts)))
    return 0


if __name__ == "__main__":
    run_main(main)
