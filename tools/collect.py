"""Gather a sweep's finished proxy runs into the two tables the surrogate fits on.

    python -m tools.collect sweep/NAME [--expected-evals N]

Writes sweep/NAME/trajectories.csv (run,iteration,tokens,progress,stage,domain,loss,target; one row per
evaluation and domain), mixtures.csv (run,stage,start,domain,weight; start as a fraction of the run)
and collect_report.json. A run that is incomplete (no done marker, or fewer trajectory lines than a
complete run has), malformed (a loss that is not a number, e.g. JSON `true`) or diverged (a non-finite
loss) is left out of both tables and listed, with its reason, in the report and on stdout: a surrogate
silently fitted on a crashed or exploding proxy learns the crash. A run whose final target loss is above
its first is kept (on a finite corpus that is a legitimate result: a mixture to avoid) and flagged in
the report's `flagged` and on stdout.
"""
import argparse
import csv
import io
import math
import os

from megatron_ext.atomic import atomic_write
from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule
from tools.cli import run_main
from tools.sweep import DONE, RUNNER_JSON, RUNS, SCHED, read_json, run_ids, trajectory_records, write_json

TRAJECTORY_COLUMNS = ["run", "iteration", "tokens", "progress", "stage", "domain", "loss", "target"]
MIXTURE_COLUMNS = ["run", "stage", "start", "domain", "weight"]


def problem(run_dir: str, records: list, expected: int) -> str:
    """Why a run must not be used, or '' if it is fine."""
    for n, r in enumerate(records, 1):
        missing = [k for k in ("iteration", "tokens", "progress", "stage", "losses", "target") if k not in r]
        if missing or not isinstance(r["losses"], dict) or not r["losses"]:
            return f"malformed: trajectory line {n} lacks {', '.join(missing) or 'per-domain losses'}"
    if len(records) < expected:
        return f"incomplete: {len(records)} of {expected} evaluation lines"
    if len(records) > expected:
        return f"mismatched: {len(records)} evaluation lines, a run of this sweep has {expected}"
    if not os.path.exists(os.path.join(run_dir, DONE)):
        return "incomplete: no done marker"
    for r in records:
        values = list(r["losses"].values()) + [r["target"]]
        if not all(is_number(v) for v in values):
            return f"malformed: a loss that is not a number at iteration {r['iteration']}"
        if not all(math.isfinite(v) for v in values):
            return f"diverged: non-finite loss at iteration {r['iteration']}"
    return ""


def is_number(value) -> bool:
    """JSON numbers only: `true`/`false` are ints to Python but not losses."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rising(records: list) -> str:
    """A note for a kept run whose final target loss is above its first, or ''."""
    first, last = records[0]["target"], records[-1]["target"]
    return f"final target loss {last:.4f} above the first {first:.4f}" if last > first else ""


def trajectory_rows(run: str, records: list) -> list:
    return [[run, r["iteration"], r["tokens"], r["progress"], r["stage"], domain, loss, r["target"]]
            for r in records for domain, loss in sorted(r["losses"].items())]


def mixture_rows(run: str, schedule: MixtureSchedule) -> list:
    if schedule.unit != "fraction":
        raise UserError(f"{run}: schedule unit {schedule.unit!r}; a sweep's schedules use 'fraction'")
    rows = []
    for k, (stage, weights) in enumerate(zip(schedule.stages, schedule.stage_weight_vectors())):
        rows += [[run, k, stage.start, domain, w] for domain, w in zip(schedule.domains, weights)]
    return rows


def csv_text(header: list, rows: list) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def collect(sweep: str, expected: int = 0) -> dict:
    """Write the tables and the report; returns the report."""
    if not expected:
        settings = read_json(os.path.join(sweep, RUNNER_JSON)) or {}
        expected = settings.get("expected_evals", 0)
        if not expected:
            raise UserError(f"{sweep}: no {RUNNER_JSON} saying how many evaluations a run has; "
                            "pass --expected-evals")
    trajectories, mixtures, included, excluded, flagged = [], [], [], {}, {}
    for run in run_ids(sweep):
        run_dir = os.path.join(sweep, RUNS, run)
        records = trajectory_records(run_dir)
        why = problem(run_dir, records, expected)
        if why:
            excluded[run] = why
            continue
        included.append(run)
        if rising(records):
            flagged[run] = rising(records)
        trajectories += trajectory_rows(run, records)
        mixtures += mixture_rows(run, MixtureSchedule.load(os.path.join(run_dir, SCHED)))
    report = {"sweep": sweep, "expected_evals": expected, "included": included, "excluded": excluded,
              "flagged": flagged}
    write_json(os.path.join(sweep, "collect_report.json"), report)
    if not included:
        raise UserError(f"{sweep}: no complete, finite runs to collect ({len(excluded)} excluded; "
                        "see collect_report.json)")
    atomic_write(os.path.join(sweep, "trajectories.csv"), csv_text(TRAJECTORY_COLUMNS, trajectories), fsync=True)
    atomic_write(os.path.join(sweep, "mixtures.csv"), csv_text(MIXTURE_COLUMNS, mixtures), fsync=True)
    report["rows"] = {"trajectories": len(trajectories), "mixtures": len(mixtures)}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.collect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep directory, e.g. sweep/demo")
    p.add_argument("--expected-evals", type=int, default=0,
                   help="trajectory lines of a complete run (default: from the sweep's runner.json)")
    args = p.parse_args(argv)
    report = collect(args.sweep, args.expected_evals)
    for run, why in report["excluded"].items():
        print(f"excluded {run}: {why}")
    for run, why in report["flagged"].items():
        print(f"kept {run} (flagged): {why}")
    print(f"collected {len(report['included'])} of {len(report['included']) + len(report['excluded'])} runs: "
          f"{os.path.join(args.sweep, 'trajectories.csv')} ({report['rows']['trajectories']} rows), "
          f"{os.path.join(args.sweep, 'mixtures.csv')} ({report['rows']['mixtures']} rows)")
    return 0


if __name__ == "__main__":
    run_main(main)
