"""Synthetic Megatron `.bin/.idx` corpora for tests: small, deterministic, per-domain token statistics.

Each domain draws tokens from its own band of the vocabulary, so a model (and a test) can tell the
domains apart, and a mixture change shows up in per-domain losses.
"""
import json
import os

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder



def write_token_dataset(prefix: str, docs, vocab_size: int) -> str:
    """Write documents as Megatron `prefix.{bin,idx}`, EOD appended.

    Token ids follow Megatron's `NullTokenizer --vocab-size V`: text ids in [0, V), EOD = V.
    """
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size + 1))
    for doc in docs:
        ids = list(doc) + [vocab_size]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def make_domains(root: str, domains=("web", "code", "books"), n_docs=200, doc_len=(20, 120),
                 vocab_size=512, seed=0, valid_docs=20, eval_only=()):
    """Write `<root>/<domain>_{train,valid}_text_document` for each domain and `<root>/tokens.json`.

    Each name in `eval_only` becomes an evaluation-only set (`<root>/<name>_valid_text_document`, under
    tokens.json's "eval_only"): `valid_docs` documents, each drawn from one domain's band but with a
    flatter distribution than any domain has, so it is text none of the domains holds.
    Returns {domain: {"train": prefix, "valid": prefix}}.
    """
    rng = np.random.default_rng(seed)
    band = vocab_size // len(domains)
    out, counts = {}, {}
    for i, name in enumerate(domains):
        lo, hi = i * band, (i + 1) * band
        # a per-domain Zipf-like unigram distribution inside its band, plus a shared bigram habit
        probs = 1.0 / np.arange(1, hi - lo + 1) ** 1.1
        probs /= probs.sum()
        out[name], counts[name] = {}, {}
        for split, n in (("train", n_docs), ("valid", valid_docs)):
            docs = []
            for _ in range(n):
                length = int(rng.integers(doc_len[0], doc_len[1]))
                docs.append((lo + rng.choice(hi - lo, size=length, p=probs)).tolist())
            prefix = os.path.join(root, f"{name}_{split}_text_document")
            write_token_dataset(prefix, docs, vocab_size)
            out[name][split] = prefix
            counts[name][f"{split}_tokens"] = int(sum(len(d) + 1 for d in docs))
            counts[name][f"{split}_documents"] = n
            counts[name][f"{split}_prefix"] = prefix
    held = {}
    for name in eval_only:
        docs = [(int(rng.integers(len(domains))) * band + rng.integers(band, size=int(rng.integers(*doc_len)))).tolist()
                for _ in range(valid_docs)]
        prefix = write_token_dataset(os.path.join(root, f"{name}_valid_text_document"), docs, vocab_size)
        held[name] = {"valid_tokens": int(sum(len(d) + 1 for d in docs)), "valid_documents": valid_docs,
                      "valid_prefix": prefix}
    with open(os.path.join(root, "tokens.json"), "w") as f:
        json.dump({"tokenizer": {"type": "NullTokenizer", "vocab_size": vocab_size, "eod": vocab_size},
                   "domains": counts, "eval_only": held}, f, indent=1)
    return out
