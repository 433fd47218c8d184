"""Build `<out>/<domain>/{train,valid}.jsonl` and `<out>/manifest.json` from the sources.

Per domain: every source yields documents in md5-of-id order; documents are chunked; sources are
drawn round-robin (always the source with the fewest bytes so far) until the byte cap; exact
duplicate chunks are dropped; each chunk goes to train or valid by the stable hash of its
near-duplicate key. Files are written under temp names and renamed, so re-running with the same
arguments reproduces byte-identical files and an interrupted run leaves no partial file.
"""
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from megatron_ext.atomic import atomic_path, make_output_dir
from megatron_ext.errors import UserError
from tools.corpus.fetch import Fetcher, SourceUnavailable
from tools.corpus.sources import DOMAINS, Source
from tools.corpus.split import chunk_text, is_valid, md5_hex

MIN_DOMAINS = 4
SPLITS = ("train", "valid")


@dataclass
class CorpusConfig:
    out: str
    cache: str
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    max_mb_per_domain: float = 4.0  # 0 = no cap
    valid_fraction: float = 0.04
    jobs: int = 2                   # domains built in parallel processes


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _chunks(docs):
    for doc_id, text in docs:
        pieces = chunk_text(text)
        for i, piece in enumerate(pieces):
            yield (f"{doc_id}#{i}" if len(pieces) > 1 else doc_id), piece


def select_chunks(streams: list[tuple[str, object]], cap_bytes: int, valid_fraction: float, progress=None):
    """Draw chunks round-robin from `(source name, chunk iterator)` streams up to `cap_bytes` (0 = all).

    Returns ({"train": [...], "valid": [...]}, {source: {"docs", "bytes"}}); records are
    `{"text", "source", "id"}`. The fewest-bytes-first draw keeps sources balanced under the cap.
    """
    records = {split: [] for split in SPLITS}
    taken = {name: {"docs": 0, "bytes": 0} for name, _ in streams}
    active, seen, total = list(streams), set(), 0
    while active:
        name, chunks = min(active, key=lambda s: taken[s[0]]["bytes"])
        item = next(chunks, None)
        if item is None:
            active = [s for s in active if s[0] != name]
            continue
        chunk_id, text = item
        digest = md5_hex(text)
        if digest in seen:
            continue
        size = len(text.encode("utf-8"))
        if cap_bytes and total + size > cap_bytes:
            break
        seen.add(digest)
        total += size
        taken[name]["docs"] += 1
        taken[name]["bytes"] += size
        split = "valid" if is_valid(text, valid_fraction) else "train"
        records[split].append({"text": text, "source": name, "id": f"{name}/{chunk_id}"})
        if progress is not None:
            progress.update(size)
    return records, taken


def _atomic_write(path: str, lines) -> str:
    """Write lines to `path` atomically; returns the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for line in lines:
            data = line.encode("utf-8")
            digest.update(data)
            fh.write(data)
    return digest.hexdigest()


def build_domain(name: str, sources: list[Source], fetch: Fetcher, cfg: CorpusConfig, show_bar=True) -> dict:
    """Build one domain's files; returns its manifest entry. Raises SourceUnavailable if no source works."""
    fetch.used = set()
    streams, errors = [], []
    for source in sources:
        try:
            streams.append((source.name, _chunks(source.docs(fetch))))
        except SourceUnavailable as exc:
            errors.append((source.name, exc))
    if not streams:
        raise SourceUnavailable(str(errors[0][1]))
    for source_name, exc in errors:
        _warn(f"{name}: source {source_name} unavailable ({exc}); building from the others")
    cap = int(cfg.max_mb_per_domain * 1e6)
    with tqdm(total=cap or None, desc=f"{name:15s}", unit="B", unit_scale=True, leave=False,
              file=sys.stderr, disable=not show_bar) as bar:
        records, taken = select_chunks(streams, cap, cfg.valid_fraction, bar)
    if not records["train"] or not records["valid"]:
        raise SourceUnavailable(f"too little text ({sum(len(r) for r in records.values())} chunks)")
    entry = {"max_mb_per_domain": cfg.max_mb_per_domain, "valid_fraction": cfg.valid_fraction,
             "packages": {key: fetch.packages[key] for key in sorted(fetch.used)},
             "sources": {src: taken[src] for src in sorted(taken)}}
    for split in SPLITS:
        path = os.path.join(cfg.out, name, f"{split}.jsonl")
        lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records[split])
        sha = _atomic_write(path, lines)
        entry[split] = {"file": f"{name}/{split}.jsonl", "docs": len(records[split]),
                        "bytes": sum(len(r["text"].encode("utf-8")) for r in records[split]), "sha256": sha}
    return entry


def _build_one(args):
    """Worker: (name, manifest entry or None, error message or None)."""
    name, cfg, show_bar = args
    try:
        return name, build_domain(name, DOMAINS[name], Fetcher(cfg.cache), cfg, show_bar), None
    except SourceUnavailable as exc:
        return name, None, str(exc)


def _build_all(cfg: CorpusConfig):
    """Build the domains, in `cfg.jobs` processes when more than one; yields results as they finish."""
    jobs = max(1, min(cfg.jobs, len(cfg.domains)))
    tasks = [(name, cfg, jobs == 1) for name in cfg.domains]
    if jobs == 1:
        yield from map(_build_one, tasks)
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap_unordered(_build_one, tasks)


def _previous_manifest(out: str) -> dict:
    path = os.path.join(out, "manifest.json")
    try:
        with open(path) as fh:
            return json.load(fh).get("domains", {})
    except (OSError, ValueError, AttributeError):
        return {}


def build_corpus(cfg: CorpusConfig) -> dict:
    """Build the requested domains and (re)write the manifest; returns the manifest.

    Domains not requested keep their earlier manifest entries (if their files are still there), so
    `--domains` rebuilds a subset in place. A domain whose sources are all unavailable is skipped
    with one warning; fewer than min(4, requested) built domains is an error.
    """
    unknown = [d for d in cfg.domains if d not in DOMAINS]
    if unknown:
        raise UserError(f"unknown domain(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}")
    if cfg.max_mb_per_domain < 0 or not 0 < cfg.valid_fraction < 1:
        raise UserError("--max-mb-per-domain must be >= 0 and --valid-fraction in (0, 1)")
    make_output_dir(cfg.out, "--out")
    entries = {d: e for d, e in _previous_manifest(cfg.out).items()
               if d in DOMAINS and all(os.path.exists(os.path.join(cfg.out, d, f"{s}.jsonl")) for s in SPLITS)}
    built = []
    with tqdm(total=len(cfg.domains), desc="domains", unit="domain", file=sys.stderr) as bar:
        for name, entry, error in _build_all(cfg):
            bar.update(1)
            if entry is not None:
                entries[name] = entry
                built.append(name)
            else:
                kept = " (keeping its earlier build)" if name in entries else ""
                _warn(f"skipping domain {name}: {error}{kept}")
    if len(built) < min(MIN_DOMAINS, len(cfg.domains)):
        raise UserError(f"only {len(built)} domain(s) could be built ({', '.join(built) or 'none'}); "
                        f"need at least {min(MIN_DOMAINS, len(cfg.domains))}: check network access to the registries")
    packages = {}
    for entry in entries.values():
        packages.update(entry["packages"])
    manifest = {"format": 1, "domains": dict(sorted(entries.items())), "packages": dict(sorted(packages.items()))}
    _atomic_write(os.path.join(cfg.out, "manifest.json"), [json.dumps(manifest, indent=1, sort_keys=True) + "\n"])
    return manifest


def format_table(manifest: dict) -> str:
    """Per-domain documents and MB per split, as printed at the end of a build."""
    rows = [f"{'domain':16s} {'train docs':>10s} {'train MB':>9s} {'valid docs':>10s} {'valid MB':>9s}  sources"]
    totals = [0, 0, 0, 0]
    for name, e in manifest["domains"].items():
        values = [e["train"]["docs"], e["train"]["bytes"], e["valid"]["docs"], e["valid"]["bytes"]]
        totals = [t + v for t, v in zip(totals, values)]
        rows.append(f"{name:16s} {values[0]:10d} {values[1] / 1e6:9.2f} {values[2]:10d} {values[3] / 1e6:9.3f}  "
                    + ", ".join(s for s, v in e["sources"].items() if v["docs"]))
    rows.append(f"{'total':16s} {totals[0]:10d} {totals[1] / 1e6:9.2f} {totals[2]:10d} {totals[3] / 1e6:9.3f}")
    return "\n".join(rows)
