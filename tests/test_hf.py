"""Hugging Face interop: the Llama name/shape mapping, export of TP=1 and TP=2 / PP=2 checkpoints
(logits within 1e-4 in fp32 and equal greedy generations, checked by `export_hf --verify`), import of
a random LlamaForCausalLM (the launcher's first loss equals the HF model's on the same batch), and
lm-evaluation-harness on a local task built from held-out text."""
import argparse
import glob
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from test_launcher import PY, ROOT, TINY, corpus, env, launch, read_jsonl  # noqa: F401  (corpus: fixture)
from test_preprocess import gpt2_files  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers", reason="the eval extra (transformers) is not installed")

GQA = TINY + ["--num-query-groups", "2", "--lr-warmup-iters", "0"]


def tool(module, *args, timeout=300):
    return subprocess.run([PY, "-m", module, *args], env=env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def logit_difference(stdout: str) -> float:
    return float(re.search(r"max abs logit difference \(fp32, \d+ tokens\): (\S+)", stdout).group(1))


def assert_verified(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert logit_difference(r.stdout) <= 1e-4
    assert "greedy generation (" in r.stdout and "identical" in r.stdout


def test_mapping_round_trip_keeps_every_tensor():
    from tools.hf_mapping import hf_to_megatron, megatron_to_hf

    class Flags:
        num_layers, hidden_size, num_attention_heads, num_query_groups = 2, 32, 4, 2

    d, g, r = 8, 2, 2
    gen = torch.Generator().manual_seed(0)
    state = {"embedding.word_embeddings.weight": torch.randn(40, 32, generator=gen),
             "decoder.final_layernorm.weight": torch.randn(32, generator=gen),
             "output_layer.weight": torch.randn(40, 32, generator=gen)}
    for i in range(2):
        for name, shape in (("input_layernorm.weight", (32,)), ("pre_mlp_layernorm.weight", (32,)),
                            ("self_attention.linear_qkv.weight", ((4 + 2 * g) * d, 32)),
                            ("self_attention.linear_proj.weight", (32, 32)),
                            ("mlp.linear_fc1.weight", (2 * 48, 32)), ("mlp.linear_fc2.weight", (32, 48))):
            state[f"decoder.layers.{i}.{name}"] = torch.randn(*shape, generator=gen)
    hf = megatron_to_hf(state, Flags)
    qkv = state["decoder.layers.1.self_attention.linear_qkv.weight"]
    # query group 1 holds rows [(r+2)·d, 2(r+2)·d): its r query heads, then one key and one value head
    group1 = qkv[(r + 2) * d:]
    assert torch.equal(hf["model.layers.1.self_attn.q_proj.weight"][r * d:], group1[:r * d])
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.weight"][d:], group1[r * d:(r + 1) * d])
    assert torch.equal(hf["model.layers.1.self_attn.v_proj.weight"][d:], group1[(r + 1) * d:])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], state["decoder.layers.0.mlp.linear_fc1.weight"][48:])
    back = hf_to_megatron(hf, Flags)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def write_text_corpus(root: str, seed: int = 0) -> str:
    """Two domains of word-salad text as the corpus writes it: <root>/<domain>/{train,valid}.jsonl."""
    rng = random.Random(seed)
    words = {"web": "the cat sat on a mat and then ran far away from the big dog".split(),
             "code": "def return value import numpy if else for while print self".split()}
    for domain, vocab in words.items():
        os.makedirs(os.path.join(root, domain))
        for split, n in (("train", 120), ("valid", 8)):
            with open(os.path.join(root, domain, f"{split}.jsonl"), "w") as f:
                for _ in range(n):
                    text = " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 60))) + ".\n"
                    f.write(json.dumps({"text": text}) + "\n")
    return root


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """Raw text tokenized by tools.preprocess with a 300-piece SentencePiece model; the launcher's data flags."""
    root = tmp_path_factory.mktemp("hf_text")
    raw, tok = write_text_corpus(str(root / "raw")), str(root / "tok")
    r = tool("tools.preprocess", "--input", raw, "--output", tok, "--vocab-size", "300")
    assert r.returncode == 0, r.stderr[-3000:]
    data = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", os.path.join(tok, "tokenizer.model"),
            "--data-path", "0.5", os.path.join(tok, "web_train_text_document"),
            "0.5", os.path.join(tok, "code_train_text_document")]
    return root, raw, data


@pytest.fixture(scope="module")
def trained(text_corpus):
    root, _, data = text_corpus
    save = str(root / "hf_tp1")
    r = launch(GQA + data + ["--train-iters", "3", "--eval-interval", "3", "--save", save])
    assert r.returncode == 0, r.stderr[-3000:]
    out = str(root / "hf_out_tp1")
    r = tool("tools.export_hf", "--load", save, "--out", out, "--verify")
    return root, save, out, r


def test_export_tp1_matches_megatron_core(trained):
    _, _, out, r = trained
    assert_verified(r)
    assert "tokenizer: identical ids" in r.stdout
    assert {"config.json", "generation_config.json", "model.safetensors", "regmixd_export.json", "tokenizer.json",
            "tokenizer.model"} <= set(os.listdir(out))
    record = json.load(open(os.path.join(out, "regmixd_export.json")))
    assert record["padded_vocab_size"] == 384 and record["tokenizer_vocab_size"] == 300
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer.encode(" the cat  sat\n", add_special_tokens=False)) == " the cat  sat\n"


# TP=2 on the SentencePiece corpus; PP=2 on the NullTokenizer one (exported without a tokenizer)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_export_resharded_checkpoint_matches(text_corpus, corpus, name):  # noqa: F811
    root = text_corpus[0]
    if name == "tp2":
        flags = text_corpus[2] + ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"]
    else:
        flags = ["--pipeline-model-parallel-size", "2", "--data-schedule", corpus[2]]
    save, out = str(root / f"hf_{name}"), str(root / f"hf_out_{name}")
    r = launch(GQA + flags + ["--train-iters", "3", "--eval-interval", "3", "--save", save], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = tool("tools.export_hf", "--load", save, "--out", out, "--verify")
    assert_verified(r)
    record = json.load(open(os.path.join(out, "regmixd_export.json")))
    assert record["saved_layout"]["world_size"] == 2
    if name == "pp2":
        assert record["padded_vocab_size"] == 640 and "NullTokenizer" in record["tokenizer"]["note"]


@pytest.mark.slow
def test_lm_eval_runs_a_local_task_on_the_export(trained, text_corpus):
    root, _, out, _ = trained
    tasks, results = str(root / "tasks"), str(root / "lm_eval")
    r = tool("tools.eval_tasks", "--raw", text_corpus[1], "--out", tasks, "--max-docs", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "regmixd_cloze_web: 4 documents" in r.stdout
    r = subprocess.run([PY, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
                        "--include_path", tasks, "--tasks", "regmixd_cloze_web,regmixd_ppl_code", "--device", "cpu",
                        "--batch_size", "4", "--output_path", results],
                       env=dict(env(), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                       timeout=600, cwd=str(root))
    assert r.returncode == 0, r.stderr[-3000:]
    (found,) = glob.glob(os.path.join(results, "*", "results_*.json"))
    scores = json.load(open(found))["results"]
    assert 0.0 <= scores["regmixd_cloze_web"]["acc,none"] <= 1.0
    assert math.isfinite(scores["regmixd_cloze_web"]["perplexity,none"])
    assert 0.0 < scores["regmixd_ppl_code"]["bits_per_byte,none"] < 20.0


def test_eval_tasks_cloze_items():
    from tools.eval_tasks import cloze_item

    assert cloze_item("one two three.", 100) == {"context": "one two", "target": " three"}
    assert cloze_item("one two three four", 9) == {"context": "one", "target": " two"}
    assert cloze_item("lonely", 100) is None


def test_import_random_llama_first_loss_equals_hf_loss(corpus, tmp_path):  # noqa: F811
    from megatron_ext.schedule import MixtureSchedule
    from megatron_ext.scheduled_dataset import build_train_valid_datasets
    from megatron_ext.evaluation import collate
    from megatron_ext.tokenizer import build_tokenizer

    _, _, sched = corpus
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf_dir, ckpt, run = str(tmp_path / "hf"), str(tmp_path / "imported"), str(tmp_path / "run")
    hf.save_pretrained(hf_dir)
    flags = GQA + ["--ffn-hidden-size", "256", "--data-schedule", sched, "--train-iters", "2"]
    r = tool("tools.import_hf", "--hf", hf_dir, "--save", ckpt, "--", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(flags + ["--eval-interval", "2", "--load", ckpt, "--save", run])
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_jsonl(os.path.join(run, "train_log.jsonl"))
    assert [x["iteration"] for x in log] == [1, 2]  # iteration and data start fresh

    # the launcher's first global batch: 4 micro-batches of 2 samples, each loss a masked token mean
    train, _ = build_train_valid_datasets(MixtureSchedule.load(sched), train_samples=16, global_batch_size=8,
                                          seq_length=64, seed=7,
                                          tokenizer=build_tokenizer("NullTokenizer", vocab_size=512))
    micro = []
    with torch.no_grad():
        for start in range(0, 8, 2):
            batch = collate(train, range(start, start + 2))
            logits = hf(batch["tokens"]).logits.float()
            token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
            mask = batch["loss_mask"].float()
            micro.append(float((token_loss * mask).sum() / mask.sum()))
    assert log[0]["loss"] == pytest.approx(sum(micro) / len(micro), rel=1e-5)


def test_import_refuses_mismatched_flags(tmp_path):
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    r = tool("tools.import_hf", "--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "c"), "--",
             *TINY, "--train-iters", "4", "--data-path", "x")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: the launcher flags do not match the HF model: --num-query-groups 4 (HF: 2), "
        "--norm-epsilon 1e-05 (HF: 1e-06)"]


def test_missing_extra_is_one_line():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from tools.cli import run_main; from tools.export_hf import main\n"
            "run_main(main, ['--load', '.', '--out', '/nonexistent'])")
    r = subprocess.run([PY, "-c", code], env=env(), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: Hugging Face interop needs the eval extra (transformers is missing): pip install -e '.[eval]'"]


@pytest.mark.network
def test_gpt2_tokenizer_export_gives_the_same_ids(tmp_path, gpt2_files):
    from megatron_ext.tokenizer import build_tokenizer
    from tools.hf_mapping import TOKENIZER_PROBE, export_tokenizer

    files = {"vocab_file": gpt2_files["encoder.json"], "merge_file": gpt2_files["vocab.bpe"]}
    ours = build_tokenizer("GPT2BPETokenizer", **files)
    saved = argparse.Namespace(tokenizer_type="GPT2BPETokenizer", max_position_embeddings=64, **files)
    record = export_tokenizer(saved, str(tmp_path), ours.eod)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(record["files"])
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.encode(TOKENIZER_PROBE, add_special_tokens=False) == list(ours.tokenize(TOKENIZER_PROBE))
    assert theirs.decode(ours.tokenize(TOKENIZER_PROBE)) == TOKENIZER_PROBE
