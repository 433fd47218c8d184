"""tools.collect on a fixture sweep: two good runs, one truncated, one NaN, one whose loss rises (kept, flagged)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_ext.errors import UserError
from tools.collect import collect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "trajectories", "small_sweep")


@pytest.fixture
def sweep(tmp_path):
    dst = tmp_path / "small_sweep"
    shutil.copytree(FIXTURE, dst)
    return dst


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_collect_tables_and_exclusions(sweep):
    out = subprocess.run([sys.executable, "-m", "tools.collect", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[:3] == ["excluded p0002: incomplete: 2 of 4 evaluation lines",
                       "excluded p0003: diverged: non-finite loss at iteration 6",
                       "kept p0004 (flagged): final target loss 5.5000 above the first 4.7500"]
    assert out[3].startswith("collected 3 of 5 runs")
    report = json.loads((sweep / "collect_report.json").read_text())
    assert report["included"] == ["p0000", "p0001", "p0004"] and set(report["excluded"]) == {"p0002", "p0003"}
    assert set(report["flagged"]) == {"p0004"}

    traj = read_csv(sweep / "trajectories.csv")
    assert list(traj[0]) == ["run", "iteration", "tokens", "progress", "stage", "domain", "loss", "target"]
    assert len(traj) == 3 * 4 * 2                                   # runs x evaluations x domains
    assert {r["run"] for r in traj} == {"p0000", "p0001", "p0004"}
    row = next(r for r in traj if r["run"] == "p0001" and r["iteration"] == "6" and r["domain"] == "web")
    line = [json.loads(l) for l in (sweep / "runs/p0001/trajectory.jsonl").read_text().splitlines()][2]
    assert float(row["loss"]) == line["losses"]["web"] and float(row["target"]) == line["target"]
    assert row["stage"] == "1" and float(row["progress"]) == 0.75 and row["tokens"] == "1536"

    mix = read_csv(sweep / "mixtures.csv")
    assert list(mix[0]) == ["run", "stage", "start", "domain", "weight"]
    p1 = [(r["stage"], float(r["start"]), r["domain"], float(r["weight"])) for r in mix if r["run"] == "p0001"]
    assert p1 == [("0", 0.0, "code", 1.0), ("0", 0.0, "web", 0.0), ("1", 0.5, "code", 0.2), ("1", 0.5, "web", 0.8)]
    assert len(mix) == 2 + 4 + 2


def test_missing_done_marker_and_expected_override(sweep):
    os.remove(sweep / "runs/p0000/done")
    with pytest.raises(UserError, match="no complete"):      # every run is too long for E = 2
        collect(str(sweep), expected=2)
    report = json.loads((sweep / "collect_report.json").read_text())
    assert report["excluded"]["p0000"] == "mismatched: 4 evaluation lines, a run of this sweep has 2"
    assert report["excluded"]["p0002"] == "incomplete: no done marker"
    report = collect(str(sweep), expected=4)
    assert report["excluded"]["p0000"] == "incomplete: no done marker"
    assert report["included"] == ["p0001", "p0004"]


def test_nothing_usable_is_an_error(sweep):
    for run in ("p0000", "p0001", "p0004"):
        (sweep / f"runs/{run}/trajectory.jsonl").write_text("")
    out = subprocess.run([sys.executable, "-m", "tools.collect", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "no complete" in out.stderr
    assert "Traceback" not in out.stderr
    assert json.loads((sweep / "collect_report.json").read_text())["excluded"]["p0000"].startswith("incomplete")


def test_malformed_line_and_unknown_expected(sweep, tmp_path):
    (sweep / "runs/p0001/trajectory.jsonl").write_text(json.dumps({"iteration": 2}) + "\n")
    report = collect(str(sweep))
    assert report["excluded"]["p0001"].startswith("malformed: trajectory line 1 lacks tokens")
    lines = (sweep / "runs/p0000/trajectory.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["losses"]["web"] = True   # JSON true is an int to Python, not a loss
    (sweep / "runs/p0000/trajectory.jsonl").write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    report = collect(str(sweep))
    assert report["excluded"]["p0000"] == "malformed: a loss that is not a number at iteration 4"
    os.remove(sweep / "runner.json")
    with pytest.raises(UserError, match="--expected-evals"):
        collect(str(sweep))
