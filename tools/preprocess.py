"""jsonl per domain → Megatron `.bin/.idx` per domain and split, the tokenizer, and tokens.json.

    python -m tools.preprocess --input data/raw --output data/tok [--domains web code]
        [--tokenizer-type SentencePieceTokenizer] [--vocab-size 8192] [--tokenizer-model M.model]
        [--vocab-file encoder.json --merge-file vocab.bpe] [--workers N]
    python -m tools.preprocess --input data/raw --output data/tok --add-eval-only

Reads `<input>/<domain>/{train,valid}.jsonl` (one `{"text": ...}` object a line) and writes
`<output>/<domain>_{train,valid}_text_document.{bin,idx}` with megatron-core's `IndexedDatasetBuilder`
(one sequence per document, EOD appended, dtype `DType.optimal_dtype(vocab_size)` as Megatron-LM's
preprocess_data.py), the tokenizer files and `<output>/tokens.json` (docs/ARCHITECTURE.md). Without
`--tokenizer-model`, a SentencePiece BPE model is trained on a deterministic sample of the train
splits. Everything is written under temporary names and renamed only once every domain succeeded.
Lines that are not UTF-8, not a JSON object, without a `text` string, or with empty text are
skipped, counted and reported; a split left with no document is an error.

The evaluation-only sets the input's manifest.json lists (tools.corpus: `<input>/<set>/valid.jsonl`,
no train split) are tokenized with the same tokenizer, never trained on, and recorded under
tokens.json's "eval_only" key, apart from "domains". `--add-eval-only` adds them to an existing output
with the tokenizer its tokens.json records, leaving every other file and tokens.json entry as it was.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterator, List, Optional, Tuple

import megatron_ext.quiet_imports  # noqa: E402,F401  (before megatron-core)

import numpy as np  # noqa: E402
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron_ext.atomic import make_output_dir  # noqa: E402
from megatron_ext.errors import UserError  # noqa: E402
from megatron_ext.tokenizer import (TOKENIZER_TYPES, build_from_record, build_tokenizer,  # noqa: E402
                                    tokenizer_record, train_sentencepiece)
from tools.cli import run_main  # noqa: E402
from tools.corpus.build import MANIFEST  # noqa: E402

SPLITS = ("train", "valid")
CHUNK_LINES = 256
CHUNK_BYTES = 1 << 20
SENTENCE_BYTES = 8192
# where tools.preprocess puts the tokenizer files inside --output
SENTENCEPIECE_MODEL = "tokenizer.model"
GPT2_VOCAB, GPT2_MERGES = "gpt2-vocab.json", "gpt2-merges.txt"


@dataclass
class PreprocessConfig:
    input: str
    output: str
    domains: Optional[List[str]] = None
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = 8192
    tokenizer_sample_mb: float = 16.0
    workers: int = 1
    progress: bool = True
    add_eval_only: bool = False  # only tokenize the eval-only sets into an existing output


@dataclass
class SplitStats:
    documents: int = 0
    text_bytes: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped_line: Dict[str, int] = field(default_factory=dict)


@dataclass
class PreprocessResult:
    tokens_json: str
    tokenizer: Dict
    stats: Dict[str, Dict[str, SplitStats]]  # domain → split → stats
    eval_stats: Dict[str, SplitStats]        # eval-only set → its (valid) stats
    seconds: float


# ---------------------------------------------------------------- reading jsonl

def split_path(input_dir: str, domain: str, split: str) -> str:
    return os.path.join(input_dir, domain, f"{split}.jsonl")


def find_domains(input_dir: str, names: Optional[List[str]]) -> List[str]:
    """The domains to tokenize: `names`, or every sub-directory holding a train.jsonl; both splits must exist."""
    if not os.path.isdir(input_dir):
        raise UserError(f"--input {input_dir}: no such directory")
    if names:
        domains = list(dict.fromkeys(names))
    else:
        domains = sorted(d for d in os.listdir(input_dir) if os.path.isfile(split_path(input_dir, d, "train")))
        if not domains:
            raise UserError(f"--input {input_dir}: no <domain>/train.jsonl found")
    for domain in domains:
        if not domain or os.sep in domain or domain.startswith("."):
            raise UserError(f"--domains: bad domain name {domain!r}")
        for split in SPLITS:
            if not os.path.isfile(split_path(input_dir, domain, split)):
                raise UserError(f"domain {domain}: missing {split_path(input_dir, domain, split)}")
    return domains


def eval_only_sets(input_dir: str) -> List[str]:
    """The evaluation-only sets `<input>/manifest.json` lists (none without a manifest); each needs valid.jsonl."""
    try:
        with open(os.path.join(input_dir, MANIFEST)) as f:
            names = sorted(json.load(f).get("eval_only", {}))
    except (OSError, ValueError, AttributeError):
        return []
    for name in names:
        if not os.path.isfile(split_path(input_dir, name, "valid")):
            raise UserError(f"eval-only set {name}: missing {split_path(input_dir, name, 'valid')}")
    return names


def read_tokens_json(output: str) -> Dict:
    """The tokens.json already in `output` (what --add-eval-only extends)."""
    path = os.path.join(output, "tokens.json")
    try:
        with open(path) as f:
            tokens = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"--add-eval-only: cannot read {path} ({exc.__class__.__name__}): run tools.preprocess "
                        "without it first") from None
    if not isinstance(tokens, dict) or not isinstance(tokens.get("tokenizer"), dict):
        raise UserError(f"--add-eval-only: {path} has no 'tokenizer' entry")
    return tokens


def read_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def parse_line(raw: bytes) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) for a usable document, (None, reason) for a line to skip."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    text = obj.get("text")
    if not isinstance(text, str):
        return None, "no 'text' string"
    if not text:
        return None, "empty text"
    return text, None


def chunked(lines: Iterator[Tuple[int, bytes]]) -> Iterator[List[Tuple[int, bytes]]]:
    """Lines grouped into work units of at most CHUNK_LINES lines / about CHUNK_BYTES bytes."""
    chunk, size = [], 0
    for number, raw in lines:
        chunk.append((number, raw))
        size += len(raw)
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------- tokenizing (in workers)

_worker_tokenizer = None
_worker_dtype = None


def init_worker(record: Dict) -> None:
    """Build the tokenizer once per process from its tokens.json record."""
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = build_from_record(record)
    _worker_dtype = DType.optimal_dtype(_worker_tokenizer.vocab_size)


def encode_chunk(chunk: List[Tuple[int, bytes]]):
    """Per line: (line number, raw bytes, token ids with EOD or None, text bytes, skip reason or None)."""
    out = []
    for number, raw in chunk:
        text, reason = parse_line(raw)
        if reason:
            out.append((number, len(raw), None, 0, reason))
            continue
        ids = _worker_tokenizer.tokenize(text)
        ids.append(_worker_tokenizer.eod)
        out.append((number, len(raw), np.asarray(ids, dtype=_worker_dtype), len(text.encode("utf-8")), None))
    return out


# ---------------------------------------------------------------- SentencePiece sample

def sentencepiece_sample(paths: List[str], sample_bytes: int) -> Iterator[str]:
    """Train-split text for SentencePiece: about sample_bytes in all, the same share per domain.

    A line is taken when its hash falls under the domain's sampling fraction, so the sample does not
    depend on line order; documents are cut into sentences of at most SENTENCE_BYTES at line ends.
    """
    per_domain = sample_bytes / len(paths)
    for path in paths:
        fraction = min(1.0, per_domain / max(1, os.path.getsize(path)))
        for _, raw in read_lines(path):
            if int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") / 2 ** 64 >= fraction:
                continue
            text, reason = parse_line(raw)
            if reason is None:
                yield from _sentences(text)


def train_sentencepiece_on_splits(train_paths: List[str], vocab_size: int, sample_mb: float) -> bytes:
    """A SentencePiece BPE model (serialized) trained on a sample of these train splits."""
    if not vocab_size or vocab_size < 260:
        raise UserError("--vocab-size must be at least 260 to train a SentencePiece model")
    sample = list(sentencepiece_sample(train_paths, int(sample_mb * 1e6)))
    if not sample:
        raise UserError(f"no usable text to train SentencePiece on in {', '.join(train_paths)}")
    return train_sentencepiece(sample, vocab_size, SENTENCE_BYTES)


def _sentences(text: str) -> Iterator[str]:
    """Cut text at line ends into pieces of at most SENTENCE_BYTES UTF-8 bytes (longer lines cut short)."""
    piece, size = [], 0
    for line in text.splitlines(keepends=True):
        encoded = line.encode("utf-8")
        if size + len(encoded) > SENTENCE_BYTES and piece:
            yield "".join(piece)
            piece, size = [], 0
        if len(encoded) > SENTENCE_BYTES:
            line = encoded[:SENTENCE_BYTES].decode("utf-8", errors="ignore")
            encoded = line.encode("utf-8")
        piece.append(line)
        size += len(encoded)
    if piece:
        yield "".join(piece)


# ---------------------------------------------------------------- the run

class _Staging:
    """Files written under temporary names, renamed into place together by `commit`."""

    def __init__(self) -> None:
        self.pairs: List[Tuple[str, str]] = []

    def temp(self, final: str) -> str:
        tmp = f"{final}.tmp-{os.getpid()}"
        self.pairs.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self.pairs:
            os.replace(tmp, final)
        self.pairs = []

    def discard(self) -> None:
        for tmp, _ in self.pairs:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.pairs = []


def stage_tokenizer(cfg: PreprocessConfig, domains: List[str], staging: _Staging) -> Tuple[Dict, Dict]:
    """Put the tokenizer's files into the output (training a SentencePiece model if none was given).

    Returns (record pointing at the final output paths, record pointing at the staged files).
    """
    def out(name: str) -> str:
        return os.path.join(cfg.output, name)

    if cfg.tokenizer_type == "SentencePieceTokenizer":
        tmp = staging.temp(out(SENTENCEPIECE_MODEL))
        if cfg.tokenizer_model:
            build_tokenizer(cfg.tokenizer_type, tokenizer_model=cfg.tokenizer_model)  # validate first
            shutil.copyfile(cfg.tokenizer_model, tmp)
        else:
            model = train_sentencepiece_on_splits([split_path(cfg.input, d, "train") for d in domains],
                                                  cfg.vocab_size, cfg.tokenizer_sample_mb)
            with open(tmp, "wb") as f:
                f.write(model)
        final_files, staged_files = {"tokenizer_model": out(SENTENCEPIECE_MODEL)}, {"tokenizer_model": tmp}
    elif cfg.tokenizer_type == "GPT2BPETokenizer":
        build_tokenizer(cfg.tokenizer_type, vocab_file=cfg.vocab_file, merge_file=cfg.merge_file)
        final_files = {"vocab_file": out(GPT2_VOCAB), "merge_file": out(GPT2_MERGES)}
        staged_files = {"vocab_file": staging.temp(final_files["vocab_file"]),
                        "merge_file": staging.temp(final_files["merge_file"])}
        shutil.copyfile(cfg.vocab_file, staged_files["vocab_file"])
        shutil.copyfile(cfg.merge_file, staged_files["merge_file"])
    else:
        final_files = staged_files = {}
    tokenizer = build_tokenizer(cfg.tokenizer_type, vocab_size=cfg.vocab_size, **staged_files)
    return (tokenizer_record(cfg.tokenizer_type, tokenizer, vocab_size=cfg.vocab_size, **final_files),
            tokenizer_record(cfg.tokenizer_type, tokenizer, vocab_size=cfg.vocab_size, **staged_files))


def tokenize_split(source: str, prefix: str, encoded_chunks, dtype, staging: _Staging, bar) -> SplitStats:
    """Write one split's documents to staged `prefix.{bin,idx}`; encoded_chunks maps chunks to results."""
    stats = SplitStats()
    builder = IndexedDatasetBuilder(staging.temp(prefix + ".bin"), dtype=dtype)
    for results in encoded_chunks(chunked(read_lines(source))):
        for number, raw_bytes, ids, text_bytes, reason in results:
            bar.update(raw_bytes)
            if reason:
                stats.skipped[reason] += 1
                stats.first_skipped_line.setdefault(reason, number)
                continue
            builder.add_document(ids, [len(ids)])
            stats.documents += 1
            stats.text_bytes += text_bytes
            stats.tokens += len(ids)
    builder.finalize(staging.temp(prefix + ".idx"))
    if stats.documents == 0:
        note = _skip_note(stats)
        raise UserError(f"{source}: no documents" + (f" (skipped {note})" if note else ""))
    return stats


def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Tokenize every domain and split and the eval-only sets; nothing appears under the final names
    unless all succeed. With `add_eval_only`, only the eval-only sets, into the existing tokens.json."""
    start = time.time()
    if cfg.workers < 1:
        raise UserError("--workers must be at least 1")
    if cfg.tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"unknown --tokenizer-type {cfg.tokenizer_type!r} (choose from {', '.join(TOKENIZER_TYPES)})")
    if cfg.tokenizer_model and cfg.tokenizer_type != "SentencePieceTokenizer":
        raise UserError("--tokenizer-model goes with --tokenizer-type SentencePieceTokenizer")
    if (cfg.vocab_file or cfg.merge_file) and cfg.tokenizer_type != "GPT2BPETokenizer":
        raise UserError("--vocab-file/--merge-file go with --tokenizer-type GPT2BPETokenizer")
    eval_sets = eval_only_sets(cfg.input)
    staging = _Staging()
    pool = None
    if cfg.add_eval_only:
        if not eval_sets:
            raise UserError(f"--add-eval-only: {os.path.join(cfg.input, MANIFEST)} lists no eval-only set")
        previous, domains = read_tokens_json(cfg.output), []
    else:
        previous, domains = None, find_domains(cfg.input, cfg.domains)
        make_output_dir(cfg.output, "--output")
    try:
        if previous:
            record = staged_record = previous["tokenizer"]
        else:
            record, staged_record = stage_tokenizer(cfg, domains, staging)
        init_worker(staged_record)
        dtype = _worker_dtype
        if cfg.workers > 1:
            pool = multiprocessing.Pool(cfg.workers, initializer=init_worker, initargs=(staged_record,))
            encoded_chunks = partial(pool.imap, encode_chunk)  # imap keeps the order
        else:
            encoded_chunks = partial(map, encode_chunk)
        work = [(d, split) for d in domains for split in SPLITS] + [(name, "valid") for name in eval_sets]
        total = sum(os.path.getsize(split_path(cfg.input, name, split)) for name, split in work)
        stats: Dict[str, Dict[str, SplitStats]] = {}
        entries = {"domains": {}, "eval_only": {}}
        with tqdm(total=total, unit="B", unit_scale=True, disable=None if cfg.progress else True,
                  file=sys.stderr) as bar:
            for name, split in work:
                bar.set_description(f"{name}/{split}")
                prefix = os.path.join(cfg.output, f"{name}_{split}_text_document")
                s = tokenize_split(split_path(cfg.input, name, split), prefix, encoded_chunks, dtype, staging, bar)
                stats.setdefault(name, {})[split] = s
                kind = "eval_only" if name in eval_sets else "domains"
                entries[kind].setdefault(name, {}).update({f"{split}_tokens": s.tokens,
                                                           f"{split}_documents": s.documents, f"{split}_prefix": prefix})
        tokens = previous or {"tokenizer": record, "domains": entries["domains"]}
        if entries["eval_only"]:   # without any, tokens.json is what it always was
            tokens["eval_only"] = {**tokens.get("eval_only", {}), **entries["eval_only"]}
        tokens_json = os.path.join(cfg.output, "tokens.json")
        with open(staging.temp(tokens_json), "w") as f:
            json.dump(tokens, f, indent=1)
            f.write("\n")
        staging.commit()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        staging.discard()
    return PreprocessResult(tokens_json, record, {d: stats[d] for d in domains},
                            {name: stats[name]["valid"] for name in eval_sets}, time.time() - start)


# ---------------------------------------------------------------- report

def _skip_note(stats: SplitStats) -> str:
    """Skipped lines by reason, with the first line number of each."""
    return ", ".join(f"{reason}: {n} (first at line {stats.first_skipped_line[reason]})"
                     for reason, n in sorted(stats.skipped.items()))


def format_table(result: PreprocessResult) -> str:
    """The per-domain table: documents, MB of text and tokens for train and valid, then the eval-only
    sets (valid only), then skipped lines."""
    header = ("domain", "train docs", "train MB", "train tokens", "valid docs", "valid MB", "valid tokens")
    rows, totals = [], [0] * 6
    for domain, splits in result.stats.items():
        values = []
        for split in SPLITS:
            s = splits[split]
            values += [s.documents, s.text_bytes / 1e6, s.tokens]
        totals = [t + v for t, v in zip(totals, values)]
        rows.append([domain] + values)
    if result.stats:
        rows.append(["total"] + totals)
    for name, s in result.eval_stats.items():
        rows.append([f"{name} (eval only)", "-", "-", "-", s.documents, s.text_bytes / 1e6, s.tokens])
    widths = [max(len(header[0]), *(len(r[0]) for r in rows))] + [len(h) for h in header[1:]]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for r in rows:
        lines.append("  ".join(fmt(v).rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    splits = [(d, split, stats[split]) for d, stats in result.stats.items() for split in SPLITS]
    for name, split, stats in splits + [(name, "valid", s) for name, s in result.eval_stats.items()]:
        note = _skip_note(stats)
        if note:
            lines.append(f"{name}/{split}: skipped {note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="directory of <domain>/{train,valid}.jsonl")
    p.add_argument("--output", required=True,
                   help="output directory; paths in tokens.json are joined onto it as given")
    p.add_argument("--domains", nargs="+", help="domains to tokenize (default: every <domain>/train.jsonl)")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", help="an existing SentencePiece .model (default: train one)")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer: encoder.json")
    p.add_argument("--merge-file", help="GPT2BPETokenizer: vocab.bpe")
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="SentencePiece vocabulary to train; NullTokenizer: text ids (EOD is one more)")
    p.add_argument("--tokenizer-sample-mb", type=float, default=16.0,
                   help="MB of train text sampled to train SentencePiece (same share per domain)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (order is kept)")
    p.add_argument("--add-eval-only", action="store_true",
                   help="only tokenize the input's eval-only sets into the existing --output, with the tokenizer "
                        "its tokens.json records (the tokenizer flags are not used); nothing else changes")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PreprocessConfig(input=args.input, output=args.output, domains=args.domains,
                           tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                           vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size,
                           tokenizer_sample_mb=args.tokenizer_sample_mb, workers=args.workers,
                           add_eval_only=args.add_eval_only)
    result = preprocess(cfg)
    print(format_table(result))
    tok = result.tokenizer
    print(f"tokenizer {tok['type']} vocab_size {tok['vocab_size']} eod {tok['eod']}; "
          f"wrote {result.tokens_json} in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
