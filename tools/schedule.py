"""Check or show a data-mixture schedule (`sched.json`).

    python -m tools.schedule validate sched.json   # structure and .bin/.idx files; exit 2 on bad input
    python -m tools.schedule show sched.json       # per-stage weight table
    python -m tools.schedule from-doremi run/doremi_weights.json --out sched.json
        # DoReMi's averaged domain weights (pretrain_regmixd.py --mixture-controller doremi) as a
        # one-stage schedule: the DoReMi baseline for the target
"""
import argparse
import json
import math
import os

from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule
from tools.cli import run_main


def from_doremi(path: str) -> MixtureSchedule:
    """The running average of DoReMi's domain weights (ᾱ, α₀ included) as a one-stage schedule."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path) as f:
            info = json.load(f)
        average, prefixes = info["average_weights"], info["prefixes"]
        weights = [float(average[d]) for d in info["domains"]]
        train = [x for d, w in zip(info["domains"], weights) for x in (round(w, 10), prefixes[d])]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a doremi_weights.json ({type(exc).__name__}: {exc})") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"{path}: invalid average weights {weights}")
    d = {"version": 1, "unit": "fraction", "stages": [{"start": 0.0, "train": train}],
         "provenance": {"made_by": "tools/schedule from-doremi", "doremi_weights": os.path.abspath(path),
                        "updates": info.get("updates"), "iteration": info.get("iteration"),
                        "eta": info.get("eta"), "smoothing": info.get("smoothing"),
                        "reference_load": info.get("reference_load")}}
    if info.get("valid"):
        d["valid"] = [x for w, p in zip(*info["valid"]) for x in (w, p)]
    return MixtureSchedule.from_dict(d)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("validate", "show", "from-doremi"))
    parser.add_argument("file", help="sched.json (from-doremi: doremi_weights.json)")
    parser.add_argument("--out", help="from-doremi: the sched.json to write")
    parser.add_argument("--no-check-files", action="store_true", help="validate: skip the .bin/.idx existence check")
    parser.add_argument("--train-samples", type=int, help="show: also resolve stage starts for this run length")
    parser.add_argument("--global-batch-size", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.command == "from-doremi":
        if not args.out:
            raise UserError("from-doremi needs --out sched.json")
        schedule = from_doremi(args.file)
        schedule.validate(check_files=False)
        schedule.save(args.out)
        print(schedule.table())
        print(f"wrote {args.out}")
        return 0
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
