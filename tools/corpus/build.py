"""Build `<out>/<domain>/{train,valid}.jsonl`, `<out>/<eval set>/valid.jsonl` and `<out>/manifest.json`.

Per domain: every source yields documents in md5-of-id order; documents are chunked; sources are
drawn round-robin (always the source with the fewest bytes so far) until the byte cap; exact
duplicate chunks are dropped; each chunk goes to train or valid by the stable hash of its
near-duplicate key. Files are written under temp names and renamed, so re-running with the same
arguments reproduces byte-identical files and an interrupted run leaves no partial file.

An evaluation-only set (sources.EVAL_ONLY) is built the same way but capped at EVAL_ONLY_MAX_MB and
written whole as `valid.jsonl`, with no train split, under the manifest's "eval_only" key: it is
never a training domain, so the tokenizer, sweeps and schedules never see it.
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
from tools.corpus.sources import DOMAINS, EVAL_ONLY, EVAL_ONLY_MAX_MB, Source
from tools.corpus.split import chunk_text, is_valid, md5_hex

MIN_DOMAINS = 4
SPLITS = ("train", "valid")
MANIFEST = "manifest.json"


@dataclass
class CorpusConfig:
    out: str
    cache: str
    domains: list[str] = field(default_factory=lambda: [*DOMAINS, *EVAL_ONLY])  # training and eval-only
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


def build_domain(name: str, sources: list[Source], fetch: Fetcher, cfg: CorpusConfig, show_bar=True,
                 eval_only=False) -> dict:
    """Build one domain's files (an eval-only set: valid.jsonl alone); returns its manifest entry.

    Raises SourceUnavailable if no source works.
    """
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
    max_mb, valid_fraction, splits = cfg.max_mb_per_domain, cfg.valid_fraction, SPLITS
    if eval_only:  # every chunk is evaluation text (is_valid(..., 1.0) is always true)
        max_mb, valid_fraction, splits = min(max_mb or EVAL_ONLY_MAX_MB, EVAL_ONLY_MAX_MB), 1.0, ("valid",)
    cap = int(max_mb * 1e6)
    with tqdm(total=cap or None, desc=f"{name:15s}", unit="B", unit_scale=True, leave=False,
              file=sys.stderr, disable=not show_bar) as bar:
        records, taken = select_chunks(streams, cap, valid_fraction, bar)
    if not all(records[split] for split in splits):
        raise SourceUnavailable(f"too little text ({sum(len(r) for r in records.values())} chunks)")
    entry = {"max_mb_per_domain": max_mb, "valid_fraction": valid_fraction,
             "packages": {key: fetch.packages[key] for key in sorted(fetch.used)},
             "sources": {src: taken[src] for src in sorted(taken)}}
    for split in splits:
        path = os.path.join(cfg.out, name, f"{split}.jsonl")
        lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records[split])
        sha = _atomic_write(path, lines)
        entry[split] = {"file": f"{name}/{split}.jsonl", "docs": len(records[split]),
                        "bytes": sum(len(r["text"].encode("utf-8")) for r in records[split]), "sha256": sha}
    return entry


def _build_one(args):
    """Worker: (name, manifest entry or None, error message or None)."""
    name, cfg, show_bar = args
    eval_only = name in EVAL_ONLY
    sources = EVAL_ONLY[name] if eval_only else DOMAINS[name]
    try:
        return name, build_domain(name, sources, Fetcher(cfg.cache), cfg, show_bar, eval_only), None
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


def _previous_entries(out: str) -> dict:
    """{name: entry} of the earlier manifest's domains and eval-only sets whose files are still there."""
    try:
        with open(os.path.join(out, MANIFEST)) as fh:
            manifest = json.load(fh)
        kinds = ((manifest.get("domains", {}), DOMAINS, SPLITS), (manifest.get("eval_only", {}), EVAL_ONLY, ("valid",)))
        return {name: entry for entries, known, splits in kinds for name, entry in entries.items()
                if name in known and all(os.path.exists(os.path.join(out, name, f"{s}.jsonl")) for s in splits)}
    except (OSError, ValueError, AttributeError):
        return {}


def build_corpus(cfg: CorpusConfig) -> dict:
    """Build the requested domains and (re)write the manifest; returns the manifest.

    Domains not requested keep their earlier manifest entries (if their files are still there), so
    `--domains` rebuilds a subset in place (`--domains heldout_english` adds the eval-only set to a
    built corpus). A domain whose sources are all unavailable is skipped with one warning; fewer than
    min(4, requested) built training domains is an error. An eval-only set that cannot be built is
    only a warning: everything downstream then lacks that set.
    """
    unknown = [d for d in cfg.domains if d not in DOMAINS and d not in EVAL_ONLY]
    if unknown:
        raise UserError(f"unknown domain(s) {', '.join(unknown)}; known: {', '.join([*DOMAINS, *EVAL_ONLY])}")
    if cfg.max_mb_per_domain < 0 or not 0 < cfg.valid_fraction < 1:
        raise UserError("--max-mb-per-domain must be >= 0 and --valid-fraction in (0, 1)")
    make_output_dir(cfg.out, "--out")
    entries = _previous_entries(cfg.out)
    built = []
    with tqdm(total=len(cfg.domains), desc="domains", unit="domain", file=sys.stderr) as bar:
        for name, entry, error in _build_all(cfg):
            bar.update(1)
            if entry is not None:
                entries[name] = entry
                built.append(name)
            else:
                kept = " (keeping its earlier build)" if name in entries else ""
                kind = "evaluation-only set" if name in EVAL_ONLY else "domain"
                _warn(f"skipping {kind} {name}: {error}{kept}")
    training = [d for d in cfg.domains if d in DOMAINS]
    built = [d for d in built if d in DOMAINS]
    if len(built) < min(MIN_DOMAINS, len(training)):
        raise UserError(f"only {len(built)} domain(s) could be built ({', '.join(built) or 'none'}); "
                        f"need at least {min(MIN_DOMAINS, len(training))}: check network access to the registries")
    packages = {}
    for entry in entries.values():
        packages.update(entry["packages"])
    manifest = {"format": 1, "domains": {d: e for d, e in sorted(entries.items()) if d in DOMAINS},
                "eval_only": {d: e for d, e in sorted(entries.items()) if d in EVAL_ONLY},
                "packages": dict(sorted(packages.items()))}
    _atomic_write(os.path.join(cfg.out, MANIFEST), [json.dumps(manifest, indent=1, sort_keys=True) + "\n"])
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
    for name, e in manifest.get("eval_only", {}).items():
        rows.append(f"{name:16s} {'-':>10s} {'-':>9s} {e['valid']['docs']:10d} {e['valid']['bytes'] / 1e6:9.3f}  "
                    + ", ".join(s for s, v in e["sources"].items() if v["docs"]) + " (evaluation only)")
    return "\n".join(rows)
