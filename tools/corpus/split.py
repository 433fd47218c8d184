"""Chunking, near-duplicate keys and the train/valid split.

The split is decided per chunk by a stable hash, so it does not depend on file order, on the cap or
on the machine. The hash is taken over the chunk's normalized first 500 characters: exact duplicates
and near-duplicates (same opening after normalization: spam campaigns, copied templates, re-issued
license texts) get the same key and so always land on the same side.
"""
import hashlib
import re

CHUNK_TARGET = 8 * 1024   # bytes: close a chunk at the first paragraph boundary past this
CHUNK_MAX = 16 * 1024     # bytes: no chunk is longer than this
NEAR_DUP_CHARS = 500

_PARAGRAPH_END = re.compile(r"\n[ \t]*\n+")


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _hard_pieces(text: str, limit: int) -> list[str]:
    """Split an over-long paragraph at line ends, and an over-long line at a character boundary."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line.encode("utf-8")) > limit:
            cut = len(line.encode("utf-8")[:limit].decode("utf-8", errors="ignore"))
            pieces.append(line[:cut])
            line = line[cut:]
        if current and len((current + line).encode("utf-8")) > limit:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def chunk_text(text: str, target: int = CHUNK_TARGET, limit: int = CHUNK_MAX) -> list[str]:
    """Cut a document into chunks of about `target`..`limit` UTF-8 bytes at paragraph boundaries.

    Why: a few long works (42 plays, 249 speeches) would otherwise give a held-out split of 0-3
    documents. Short documents come back whole; a trailing small piece joins the previous chunk
    when that stays within `limit`.
    """
    if len(text.encode("utf-8")) <= limit:
        return [text] if text.strip() else []
    paragraphs, start = [], 0
    for match in _PARAGRAPH_END.finditer(text):
        paragraphs.append(text[start:match.end()])
        start = match.end()
    paragraphs.append(text[start:])
    chunks, current, size = [], "", 0
    for paragraph in paragraphs:
        for piece in (_hard_pieces(paragraph, limit) if len(paragraph.encode("utf-8")) > limit else [paragraph]):
            piece_size = len(piece.encode("utf-8"))
            if current and size + piece_size > limit:
                chunks.append(current)
                current, size = "", 0
            current += piece
            size += piece_size
            if size >= target:
                chunks.append(current)
                current, size = "", 0
    if current.strip():
        if chunks and len((chunks[-1] + current).encode("utf-8")) <= limit and size < target // 4:
            chunks[-1] += current
        else:
            chunks.append(current)
    return [c.strip() for c in chunks if c.strip()]


def near_dup_key(text: str) -> str:
    """md5 of the first 500 characters after lowercasing and dropping digits, punctuation and spacing."""
    normalized = re.sub(r"[\W\d_]+", " ", text.lower()).strip()
    return md5_hex(normalized[:NEAR_DUP_CHARS])


def is_valid(text: str, valid_fraction: float) -> bool:
    """True if this chunk belongs to the validation split (stable hash of its near-dup key)."""
    return int(near_dup_key(text)[:8], 16) < valid_fraction * 2**32


def hash_order(items, key=lambda item: item):
    """Items sorted by md5 of their id: a diverse, machine-independent order for capped sampling."""
    return sorted(items, key=lambda item: md5_hex(key(item)))
