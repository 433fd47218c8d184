"""Tokenizers under Megatron-LM's `--tokenizer-type` names, as megatron-core tokenizer objects.

`build_tokenizer` returns a `megatron.core.tokenizers.MegatronTokenizerBase` (what `GPTDatasetConfig`
takes in megatron-core 0.16.1) with `vocab_size`, `eod`, `pad`, `tokenize(text)`, `detokenize(ids)`:

- `SentencePieceTokenizer` and `NullTokenizer` are megatron-core's own, built the way Megatron-LM's
  `build_tokenizer` builds them (`MegatronTokenizer.from_pretrained` with library metadata).
- `GPT2BPETokenizer`: megatron-core reaches GPT-2 BPE only through HuggingFace `transformers`, which
  this project does not depend on, so GPT-2 byte-level BPE is implemented here on OpenAI's two files
  (`encoder.json`, `vocab.bpe`) and plugged into megatron-core's text tokenizer class as its library.

`train_sentencepiece` trains the BPE model that tools.preprocess uses by default.
"""
import io
import json
import os
import re
import unicodedata
from functools import lru_cache
from typing import Dict, Iterable, List, Optional

from megatron.core.tokenizers import MegatronTokenizer, MegatronTokenizerBase
from megatron.core.tokenizers.text.libraries.abstract_tokenizer import MegatronTokenizerTextAbstract
from megatron.core.tokenizers.text.models import DefaultTokenizerText

from megatron_ext.errors import UserError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPT2BPETokenizer", "NullTokenizer")
GPT2_EOD_TOKEN = "<|endoftext|>"
# The Unicode White_Space property, which GPT-2's `regex` pattern means by \s (Python's re \s differs
# on a few control characters).
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def build_tokenizer(tokenizer_type: str, *, tokenizer_model: Optional[str] = None,
                    vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> MegatronTokenizerBase:
    """The tokenizer Megatron-LM's `--tokenizer-type` (and its file flags) name."""
    if tokenizer_type == "SentencePieceTokenizer":
        _require_file("--tokenizer-model", tokenizer_model, tokenizer_type)
        try:
            return MegatronTokenizer.from_pretrained(tokenizer_path=tokenizer_model,
                                                     metadata_path={"library": "sentencepiece"})
        except (OSError, RuntimeError) as exc:
            raise UserError(f"--tokenizer-model {tokenizer_model}: not a SentencePiece model ({exc})") from None
    if tokenizer_type == "GPT2BPETokenizer":
        _require_file("--vocab-file", vocab_file, tokenizer_type)
        _require_file("--merge-file", merge_file, tokenizer_type)
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) < 1:
            raise UserError("NullTokenizer needs --vocab-size >= 1")
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"},
                                                 vocab_size=int(vocab_size))
    raise UserError(f"unknown --tokenizer-type {tokenizer_type!r} (choose from {', '.join(TOKENIZER_TYPES)})")


def token_id_limit(tokenizer: MegatronTokenizerBase) -> int:
    """Token ids the tokenizer can produce lie in [0, this). Megatron's NullTokenizer puts its EOD at
    --vocab-size, outside its `vocab_size`; max() holds for every tokenizer."""
    return max(tokenizer.vocab_size, tokenizer.eod + 1)


def tokenizer_record(tokenizer_type: str, tokenizer: MegatronTokenizerBase, *, tokenizer_model=None,
                     vocab_file=None, merge_file=None, vocab_size=None) -> Dict:
    """The `tokenizer` block of tokens.json: enough to rebuild the tokenizer with `build_from_record`.

    `vocab_size` keeps Megatron's `--vocab-size` meaning for NullTokenizer (text ids, EOD is one more);
    for the other types it is the tokenizer's vocabulary size.
    """
    record = {"type": tokenizer_type}
    if tokenizer_type == "SentencePieceTokenizer":
        record["model"] = tokenizer_model
    elif tokenizer_type == "GPT2BPETokenizer":
        record["vocab_file"], record["merge_file"] = vocab_file, merge_file
    record["vocab_size"] = int(vocab_size) if tokenizer_type == "NullTokenizer" else int(tokenizer.vocab_size)
    record["eod"] = int(tokenizer.eod)
    return record


def build_from_record(record: Dict) -> MegatronTokenizerBase:
    """Rebuild the tokenizer a tokens.json `tokenizer` block describes."""
    return build_tokenizer(record["type"], tokenizer_model=record.get("model"),
                           vocab_file=record.get("vocab_file"), merge_file=record.get("merge_file"),
                           vocab_size=record.get("vocab_size"))


def _require_file(flag: str, path: Optional[str], tokenizer_type: str) -> None:
    if not path:
        raise UserError(f"{tokenizer_type} needs {flag}")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")


# ---------------------------------------------------------------- SentencePiece training

def train_sentencepiece(sentences: Iterable[str], vocab_size: int, max_sentence_bytes: int = 8192) -> bytes:
    """Train a byte-fallback BPE model on `sentences`; returns the serialized `.model`.

    Identity normalization and kept whitespace so that detokenize(tokenize(text)) == text for any
    text (code indentation, newlines, any script); digits are split one by one. Single-threaded and
    written to memory (no model_prefix path inside the model), so the same sentences give the same
    bytes on every machine.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_prefix="", model_type="bpe",
            vocab_size=int(vocab_size), byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=max_sentence_bytes, input_sentence_size=0,
            shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    except RuntimeError as exc:
        raise UserError(f"sentencepiece training failed: {' '.join(str(exc).split())}") from None
    return model.getvalue()


# ---------------------------------------------------------------- GPT-2 byte-level BPE

@lru_cache(maxsize=1)
def _gpt2_pretokenize_pattern() -> "re.Pattern":
    """GPT-2's split pattern with \\p{L}, \\p{N} and \\s spelled out as classes for stdlib `re`."""
    letters, numbers = [], []
    for cp in range(0x110000):
        major = unicodedata.category(chr(cp))[0]
        if major == "L":
            letters.append(cp)
        elif major == "N":
            numbers.append(cp)
    letter_class, number_class = _ranges(letters), _ranges(numbers)
    return re.compile(
        r"'s|'t|'re|'ve|'m|'ll|'d"
        rf"| ?[{letter_class}]+| ?[{number_class}]+| ?[^{_WHITE_SPACE}{letter_class}{number_class}]+"
        rf"|[{_WHITE_SPACE}]+(?![^{_WHITE_SPACE}])|[{_WHITE_SPACE}]+")


def _ranges(codepoints: List[int]) -> str:
    """Sorted code points as a regex character-class body of escaped ranges."""
    parts, start, prev = [], codepoints[0], codepoints[0]
    for cp in codepoints[1:] + [-1]:
        if cp != prev + 1:
            parts.append(re.escape(chr(start)) if start == prev
                         else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
            start = cp
        prev = cp
    return "".join(parts)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class GPT2BytePairEncoding(MegatronTokenizerTextAbstract):
    """GPT-2 byte-level BPE on `encoder.json` + `vocab.bpe`: the library under `GPT2BPETokenizer`."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        try:
            with open(vocab_file, encoding="utf-8") as f:
                self.encoder: Dict[str, int] = json.load(f)
            with open(merge_file, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read GPT-2 BPE files: {exc}") from None
        if not isinstance(self.encoder, dict) or GPT2_EOD_TOKEN not in self.encoder:
            raise UserError(f"--vocab-file {vocab_file}: not a GPT-2 encoder.json (no {GPT2_EOD_TOKEN})")
        # first line is a '#version' header; the file ends with a newline
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = _gpt2_pretokenize_pattern()
        self.vocab_size = len(self.encoder)
        self._cache: Dict[str, List[int]] = {}

    def _bpe_ids(self, word: str) -> List[int]:
        """Merge the characters of one pre-token by rank until no known pair is left."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        parts = list(word)
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                rank = self.bpe_ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.encoder[p] for p in parts]
        if len(self._cache) < 200_000:
            self._cache[word] = ids
        return ids

    def text_to_ids(self, text: str) -> List[int]:
        ids = []
        for piece in self.pattern.findall(text):
            ids.extend(self._bpe_ids("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def ids_to_text(self, ids) -> str:
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        data = bytes(self.byte_decoder[c] for i in ids for c in self.decoder[int(i)])
        return data.decode("utf-8", errors="replace")

    def text_to_tokens(self, text: str) -> List[str]:
        return self.ids_to_tokens(self.text_to_ids(text))

    def tokens_to_text(self, tokens: List[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def tokens_to_ids(self, tokens: List[str]) -> List[int]:
        return [self.encoder[t] for t in tokens]

    def ids_to_tokens(self, ids: List[int]) -> List[str]:
        return [self.decoder[int(i)] for i in ids]

    def add_special_tokens(self, special_tokens) -> None:
        raise NotImplementedError("GPT2BPETokenizer has a fixed vocabulary")

    @property
    def vocab(self) -> Dict[str, int]:
        return self.encoder

    @property
    def eod(self) -> int:
        return self.encoder[GPT2_EOD_TOKEN]

    @property
    def eos_id(self) -> int:
        return self.eod

    @property
    def bos_id(self) -> int:
        return self.eod

    @property
    def pad_id(self) -> int:
        """GPT-2 has no padding token; -1 as sentencepiece reports a missing one."""
        return -1

    @property
    def unk_id(self) -> int:
        """Byte-level BPE never produces an unknown token."""
        return -1


class GPT2BPETokenizer(DefaultTokenizerText):
    """megatron-core's text tokenizer over `GPT2BytePairEncoding` (Megatron-LM's `GPT2BPETokenizer`)."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        super().__init__(path=vocab_file, config={"library": "gpt2-bpe"},
                         vocab_file=vocab_file, merge_file=merge_file)

    def _restore_model(self, vocab_file: str, merge_file: str) -> GPT2BytePairEncoding:
        return GPT2BytePairEncoding(vocab_file, merge_file)
