"""MixtureSchedule: parsing, Megatron blend forms, resolution to sample indices, errors, CLI."""
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from fixtures import make_domains
from megatron_ext.errors import UserError
from megatron_ext.schedule import UNITS, MixtureSchedule, ScheduleError, Stage, domain_name
from tools.schedule import main as schedule_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return make_domains(str(tmp_path_factory.mktemp("tok")), n_docs=20, valid_docs=5)


def two_stage(domains, unit="fraction", second=0.5):
    web, code, books = (domains[d]["train"] for d in ("web", "code", "books"))
    return {"version": 1, "unit": unit,
            "stages": [{"start": 0, "train": [0.6, web, 0.4, code]},
                       {"start": second, "train": f"0.3 {web} 0 {code} 0.7 {books}"}],
            "valid": [1, domains["web"]["valid"], 1, domains["code"]["valid"]],
            "provenance": {"made_by": "test"}}


def test_domain_name():
    assert domain_name("data/tok/web_email_train_text_document") == "web_email"
    assert domain_name("/x/code_valid_text_document") == "code"
    assert domain_name("books_text_document") == "books"
    assert domain_name("plain") == "plain"


def test_load_save_roundtrip_and_queries(domains, tmp_path):
    s = MixtureSchedule.from_dict(two_stage(domains))
    s.validate()
    assert s.domains == ["web", "code", "books"]
    assert s.weights_dict(0) == pytest.approx({"web": 0.6, "code": 0.4, "books": 0.0})
    assert s.weights_dict(1) == pytest.approx({"web": 0.3, "code": 0.0, "books": 0.7})
    path = str(tmp_path / "sched.json")
    s.save(path)
    assert os.listdir(tmp_path) == ["sched.json"]  # no temp file left behind
    again = MixtureSchedule.load(path)
    assert again.to_dict() == s.to_dict()
    assert again.sha256() == s.sha256()
    assert again.valid == ([1.0, 1.0], [domains["web"]["valid"], domains["code"]["valid"]])


def test_sha256_ignores_provenance_but_not_weights(domains):
    d = two_stage(domains)
    base = MixtureSchedule.from_dict(d).sha256()
    assert MixtureSchedule.from_dict({**d, "provenance": {"other": 1}}).sha256() == base
    d["stages"][0]["start"] = 0.0
    assert MixtureSchedule.from_dict(d).sha256() == base
    d["stages"][1]["train"] = d["stages"][1]["train"].replace("0.3", "0.4")
    assert MixtureSchedule.from_dict(d).sha256() != base


@pytest.mark.parametrize("unit,second,expected", [
    ("fraction", 0.5, [0, 496]),       # 500 samples -> 31.25 batches -> 31
    ("samples", 480, [0, 480]),
    ("samples", 505, [0, 512]),        # 31.56 batches -> 32
    ("iterations", 10, [0, 160]),
    ("tokens", 64 * 488, [0, 496]),    # 488 samples of 64 tokens -> 30.5 batches -> 31
])
def test_resolve_units(domains, unit, second, expected):
    s = MixtureSchedule.from_dict(two_stage(domains, unit, second))
    assert s.resolve(train_samples=1000, global_batch_size=16, seq_length=64) == expected


def test_resolve_refuses_start_past_end_and_collisions(domains):
    with pytest.raises(ScheduleError, match="stage 1 start.*past the end"):
        MixtureSchedule.from_dict(two_stage(domains, "samples", 1000)).resolve(1000, 16, 64)
    with pytest.raises(ScheduleError, match="stage 1 start.*same iteration"):
        MixtureSchedule.from_dict(two_stage(domains, "samples", 7)).resolve(1000, 16, 64)


def test_megatron_forms(domains, tmp_path):
    web, code = domains["web"]["train"], domains["code"]["train"]
    s = MixtureSchedule.from_data_path(["30", web, "70", code])
    assert (s.unit, len(s.stages)) == ("fraction", 1)
    assert (s.stages[0].weights, s.stages[0].prefixes) == ([30.0, 70.0], [web, code])
    assert MixtureSchedule.from_data_path([web]).stages[0].weights == [1.0]
    assert MixtureSchedule.from_data_path([f"30 {web} 70 {code}"]).sha256() == s.sha256()
    (tmp_path / "args.txt").write_text(f"30 {web}\n70 {code}\n")
    assert MixtureSchedule.from_data_args_path(str(tmp_path / "args.txt")).sha256() == s.sha256()
    (tmp_path / "split.json").write_text(json.dumps(
        {"train": ["30", web, "70", code], "valid": [domains["web"]["valid"]], "test": None}))
    per_split = MixtureSchedule.from_per_split_data_args_path(str(tmp_path / "split.json"))
    assert per_split.sha256() != s.sha256() and per_split.valid == ([1.0], [domains["web"]["valid"]])
    with pytest.raises(ScheduleError, match="without weights"):
        MixtureSchedule.from_data_path([web, code])


def test_base_dir_joins_relative_prefixes():
    s = MixtureSchedule.from_dict({"version": 1, "unit": "fraction", "stages": [{"start": 0, "train": "1 tok/web"}]},
                                  base_dir="/data")
    assert s.prefixes == ["/data/tok/web"]


# --------------------------------------------------------------------------- malformed schedules
def _ok(**over):
    d = {"version": 1, "unit": "fraction",
         "stages": [{"start": 0, "train": [0.5, "WEB", 0.5, "CODE"]}, {"start": 0.5, "train": [1, "WEB"]}]}
    d.update(over)
    return d


def _stage(i, **over):
    d = _ok()
    d["stages"][i].update(over)
    return d


BAD = [  # (file text, expected message fragment)
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps(_ok(unit="epochs")), "unknown unit 'epochs'"),
    (json.dumps(_ok(version=2)), "version 2 is not supported"),
    (json.dumps({k: v for k, v in _ok().items() if k != "version"}), "missing 'version'"),
    (json.dumps(_ok(colour="red")), "unknown key 'colour'"),
    (json.dumps(_ok(stages=[])), "'stages' must be a non-empty list"),
    (json.dumps(_stage(1, start=0.0)), "stage 1 start: 0.0 does not increase"),
    (json.dumps(_stage(0, start=0.1)), "stage 0 start: the first stage must start at 0"),
    (json.dumps(_stage(1, start=1.5)), "stage 1 start: 1.5 is past the end"),
    (json.dumps(_stage(1, start=-0.5)), "stage 1 start: -0.5 is negative"),
    (json.dumps(_stage(1, start="half")), "stage 1 start: 'half' is not a number"),
    (json.dumps(_stage(1, train=[-1, "WEB"])), "stage 1 train: weight -1 is negative"),
    (json.dumps(_stage(1, train=["NaN", "WEB", 1, "CODE"])), "stage 1 train: weight 'NaN' is not finite"),
    (json.dumps(_stage(1, train=[0, "WEB", 0.0, "CODE"])), "stage 1 train: all weights are 0"),
    (json.dumps(_stage(1, train=[0.5, "WEB", 0.5])), "stage 1 train: odd-length blend list"),
    (json.dumps(_stage(1, train=[0.5, "WEB", 0.5, "WEB"])), "stage 1 train: prefix WEB appears twice"),
    (json.dumps(_stage(1, train=[])), "stage 1 train: the blend is empty"),
    (json.dumps(_stage(1, train={"WEB": 1})), "stage 1 train: expected a blend list"),
    (json.dumps(_stage(1, train=[0.5, "3", 0.5, "WEB"])), "stage 1 train: prefix '3' looks like a weight"),
    (json.dumps(_stage(1, train=[0.5, None])), "stage 1 train: prefix None is not a non-empty path string"),
    (json.dumps(_stage(0, weights=[1])), "stage 0: unknown key 'weights'"),
    (json.dumps({**_ok(), "stages": [{"train": [1, "WEB"]}]}), "stage 0: missing 'start'"),
    (json.dumps(_ok(unit="samples", stages=[{"start": 0, "train": "1 WEB"}, {"start": 2.5, "train": "1 WEB"}])),
     "stage 1 start: 2.5 samples is not a whole number"),
    (json.dumps(_stage(1, train=[1, "dir/web_train_text_document", 1, "other/web_valid_text_document"])),
     "name the same domain 'web'"),
    (json.dumps(_ok(provenance=[1])), "provenance: expected a JSON object"),
    (json.dumps(_ok(valid=7)), "valid: expected a blend list"),
    (json.dumps(_stage(1, train=[1e999, "WEB"])).replace("Infinity", "1e999"), "weight inf is not finite"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_malformed_schedule_one_line_error(tmp_path, domains, text, message):
    text = text.replace("WEB", domains["web"]["train"]).replace("CODE", domains["code"]["train"])
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ScheduleError) as info:
        MixtureSchedule.load(str(path)).validate()
    assert message.replace("WEB", domains["web"]["train"]) in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UserError)


def test_distinct_bad_files():
    assert len({t for t, _ in BAD}) >= 20 and len({m for _, m in BAD}) == len(BAD)


def test_missing_bin_is_named(tmp_path, domains):
    os.makedirs(tmp_path / "tok")
    (tmp_path / "tok" / "gone_train_text_document.idx").write_bytes(b"")
    d = _stage(1, train=[1, str(tmp_path / "tok" / "gone_train_text_document")])
    s = MixtureSchedule.from_dict(json.loads(json.dumps(d).replace("WEB", domains["web"]["train"])
                                             .replace("CODE", domains["code"]["train"])))
    s.validate(check_files=False)
    with pytest.raises(ScheduleError, match=r"stage 1 train: .*gone_train_text_document\.bin does not exist"):
        s.validate()


def test_programmatic_stages_are_checked():
    with pytest.raises(ScheduleError, match="stage 0 train: 1 weights for 2 prefixes"):
        MixtureSchedule("fraction", [Stage(0, [1.0], ["a", "b"])])


# --------------------------------------------------------------------------- property test
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)
weights = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 10**30), st.text(max_size=5),
                    st.none(), st.booleans())
prefixes = st.one_of(st.sampled_from(["a/web_train_text_document", "b/web_valid_text_document", "code", " ", ""]),
                     st.text(max_size=5), st.integers())
blends = st.one_of(st.lists(st.one_of(weights, prefixes), max_size=6),
                   st.lists(st.one_of(weights, prefixes), max_size=6).map(lambda xs: " ".join(map(str, xs))),
                   json_values)
stages = st.lists(st.fixed_dictionaries({"start": st.one_of(weights, json_values), "train": blends},
                                        optional={"extra": json_values}), max_size=4)
schedules = st.one_of(
    json_values,
    st.fixed_dictionaries({"version": st.one_of(st.just(1), json_values),
                           "unit": st.one_of(st.sampled_from(UNITS), json_values),
                           "stages": st.one_of(stages, json_values)},
                          optional={"valid": blends, "provenance": json_values}))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules, st.integers(1, 10**6), st.integers(1, 512))
def test_random_json_raises_only_schedule_error(d, train_samples, gbs):
    try:
        s = MixtureSchedule.from_dict(d)
        s.validate(check_files=False)
        s.resolve(train_samples, gbs, 64)
        s.table()
        MixtureSchedule.from_dict(json.loads(json.dumps(s.to_dict())))
    except ScheduleError as exc:
        assert "\n" not in str(exc)


# --------------------------------------------------------------------------- CLI
def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        from tools.cli import run_main
        run_main(schedule_main, list(argv))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_cli_validate_and_show(tmp_path, domains, capsys):
    path = str(tmp_path / "sched.json")
    MixtureSchedule.from_dict(two_stage(domains)).save(path)
    code, out, _ = _cli(capsys, "validate", path)
    assert code == 0 and out.startswith("ok: ")
    code, out, _ = _cli(capsys, "show", path, "--train-samples", "1000", "--global-batch-size", "16")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["domain", "stage", "0", "@0", "stage", "1", "@0.5"]
    assert lines[4].split() == ["books", "0.0000", "0.7000"]
    assert lines[-1] == "start samples: 0 496"


def test_cli_bad_input_exit_2_one_line_no_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_stage(1, start=0.0)))
    proc = subprocess.run([sys.executable, "-m", "tools.schedule", "validate", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    expected = "error: stage 1 start: 0.0 does not increase (previous stage starts at 0)"
    assert proc.stderr.strip().splitlines() == [expected]
