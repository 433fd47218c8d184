"""Export a launcher checkpoint (any TP/PP) to a Hugging Face `LlamaForCausalLM` folder.

    python -m tools.export_hf --load CKPT_DIR --out HF_DIR [--iteration N] [--dtype float32] [--verify]

The model is rebuilt at TP=PP=1 from the checkpoint's saved arguments and `dist_checkpointing.load`
reshards it; tools.hf_mapping maps the names. HF_DIR gets config.json, model.safetensors,
generation_config.json, the tokenizer (SentencePiece → tokenizer.json + tokenizer.model; GPT-2 BPE →
vocab.json + merges.txt; NullTokenizer → none) and regmixd_export.json (source, padded vocabulary,
tokenizer, the launcher's model flags). `--verify` runs both models in fp32 on the same tokens, prints the
max absolute logit difference and compares greedy generations; exit 1 above 1e-4 or on a generation
that differs at a step whose top-2 logit margin exceeds that tolerance.
"""
import argparse
import json
import os
import shutil

import torch

from megatron_ext.errors import UserError
from tools.cli import run_main
from tools.hf_mapping import (MODEL_FLAGS, TOKENIZER_PROBE, export_tokenizer, flags_text, init_single_process,
                              llama_config, megatron_logits, megatron_to_hf, require_hf, single_process_model,
                              weights_only)

LOGIT_TOLERANCE = 1e-4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_RECORD = "regmixd_export.json"


def load_megatron(load: str, iteration=None):
    """(TP=PP=1 GPTModel with the checkpoint's weights, its saved args, extra state, iteration, vocab)."""
    from megatron.core import dist_checkpointing

    from megatron_ext.checkpointing import STATE, checkpoint_dir, latest_iteration, sharded_state

    if iteration is None:
        iteration = latest_iteration(load)
        if iteration is None:
            raise UserError(f"--load {load}: no latest_checkpointed_iteration.txt (give --iteration)")
    path = checkpoint_dir(load, iteration)
    if not os.path.isfile(os.path.join(path, STATE)):
        raise UserError(f"--load {load}: no checkpoint of iteration {iteration} ({path}/{STATE} missing)")
    extra = torch.load(os.path.join(path, STATE), weights_only=False)
    saved = argparse.Namespace(**extra["args"])
    init_single_process()
    # the padded vocabulary depends on the TP size the checkpoint was saved with: take it from the shards
    vocab = dist_checkpointing.load_tensors_metadata(path)["embedding.word_embeddings.weight"].global_shape[0]
    model = single_process_model(saved, vocab)
    model.load_state_dict(dist_checkpointing.load(sharded_state(model), path)["model"])
    model.eval()
    return model, saved, extra, iteration, vocab


def write_folder(model, saved, extra, iteration, vocab, load, out, dtype: torch.dtype) -> dict:
    """Write the HF folder into `out` (replaced whole: built beside it, then renamed)."""
    transformers, safetensors_torch = require_hf()
    from megatron_ext.tokenizer import build_tokenizer

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tokenizer = build_tokenizer(saved.tokenizer_type, tokenizer_model=saved.tokenizer_model,
                                vocab_file=saved.vocab_file, merge_file=saved.merge_file, vocab_size=saved.vocab_size)
    eod = int(tokenizer.eod)
    config = llama_config(saved, vocab, eod, dtype)
    config.save_pretrained(tmp)
    transformers.GenerationConfig(bos_token_id=eod, eos_token_id=eod, do_sample=False).save_pretrained(tmp)
    tensors = {k: v.detach().to(dtype) for k, v in megatron_to_hf(weights_only(model.state_dict()), saved).items()}
    safetensors_torch.save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    record = {
        "source": os.path.abspath(load), "iteration": iteration,
        "saved_layout": {k: extra.get(k) for k in ("world_size", "tensor_model_parallel_size",
                                                   "pipeline_model_parallel_size")},
        "padded_vocab_size": vocab, "tokenizer_vocab_size": max(int(tokenizer.vocab_size), eod + 1), "eod": eod,
        "dtype": str(dtype).replace("torch.", ""), "tokenizer": export_tokenizer(saved, tmp, eod),
        "launcher_model_flags": flags_text({k: getattr(saved, k) for k in MODEL_FLAGS}),
        "seq_length": saved.seq_length,
    }
    with open(os.path.join(tmp, EXPORT_RECORD), "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return record


def greedy(next_logits, prompt: torch.Tensor, steps: int, eos: int):
    """Greedy continuation of `prompt` [1, s] with `next_logits(tokens) -> [vocab]`; also each step's
    top-2 logit margin (a step with a tiny margin is a tie that rounding may break either way)."""
    tokens, margins = prompt, []
    for _ in range(steps):
        top = next_logits(tokens).topk(2)
        margins.append(float(top.values[0] - top.values[1]))
        tokens = torch.cat([tokens, top.indices[:1].view(1, 1)], dim=1)
        if int(top.indices[0]) == eos:
            break
    return tokens[0, prompt.shape[1]:].tolist(), margins


def verify(model, out: str, saved, record: dict) -> bool:
    """Compare the exported HF model with the megatron-core model in fp32; print and return the verdict."""
    transformers, _ = require_hf()
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model.float()
    length = min(saved.seq_length, 32)
    tokens = torch.randint(0, record["tokenizer_vocab_size"], (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((hf(tokens).logits.float() - megatron_logits(model, tokens)).abs().max())
    ok = diff <= LOGIT_TOLERANCE
    print(f"max abs logit difference (fp32, {tokens.numel()} tokens): {diff:.3e} "
          f"({'ok' if ok else 'FAILED'}: tolerance {LOGIT_TOLERANCE:g})")
    prompt, steps = tokens[:1, :8], min(16, saved.max_position_embeddings - 8)
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=steps, do_sample=False,
                                pad_token_id=record["eod"])[0, prompt.shape[1]:].tolist()
        expected, margins = greedy(lambda t: megatron_logits(model, t)[0, -1], prompt, steps, record["eod"])
    first_diff = next((i for i, (a, b) in enumerate(zip(generated, expected)) if a != b), None)
    if first_diff is None and len(generated) == len(expected):
        print(f"greedy generation ({len(expected)} tokens): identical")
    elif first_diff is not None and margins[first_diff] <= LOGIT_TOLERANCE:
        print(f"greedy generation: identical up to a near-tie at token {first_diff} "
              f"(top-2 margin {margins[first_diff]:.1e})")
    else:
        print(f"greedy generation: FAILED: HF {generated} vs megatron-core {expected}")
        ok = False
    if record["tokenizer"]["files"]:
        from megatron_ext.tokenizer import build_tokenizer

        ours = build_tokenizer(saved.tokenizer_type, tokenizer_model=saved.tokenizer_model,
                               vocab_file=saved.vocab_file, merge_file=saved.merge_file).tokenize(TOKENIZER_PROBE)
        theirs = transformers.AutoTokenizer.from_pretrained(out).encode(TOKENIZER_PROBE, add_special_tokens=False)
        same = list(ours) == list(theirs)
        print(f"tokenizer: {'identical ids' if same else 'FAILED: ids differ'} on a probe text")
        ok = ok and same
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export_hf", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="the launcher's --save directory")
    p.add_argument("--out", required=True, help="the HF folder to write (replaced)")
    p.add_argument("--iteration", type=int, help="default: the latest checkpoint")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights in the HF folder (default: the checkpoint's)")
    p.add_argument("--verify", action="store_true", help="compare logits and greedy generations in fp32")
    args = p.parse_args(argv)
    require_hf()
    if not os.path.isdir(args.load):
        raise UserError(f"--load {args.load}: no such directory")
    model, saved, extra, iteration, vocab = load_megatron(args.load, args.iteration)
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if saved.bf16 else torch.float16 if saved.fp16 else torch.float32)
    record = write_folder(model, saved, extra, iteration, vocab, args.load, args.out, dtype)
    print(f"exported iteration {iteration} of {args.load} → {args.out} (LlamaForCausalLM, vocab {vocab} padded "
          f"from {record['tokenizer_vocab_size']}, {record['dtype']}; tokenizer: "
          f"{record['tokenizer'].get('note') or ', '.join(record['tokenizer']['files'])})")
    if args.verify and not verify(model, args.out, saved, record):
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
