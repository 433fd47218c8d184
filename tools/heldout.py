"""Held-out top-1 accuracy (per token and per whole word) of a finished run: the checks no arm optimizes.

    python -m tools.heldout RUN_DIR --tokens data/tok/tokens.json [--windows 16]

Every arm minimizes a loss; this scores something else, fixed before any result was seen: on each
domain's validation tokens (the first `--windows` windows of seq-length + 1 tokens of its `.bin`), the
fraction of next tokens that are the model's top-1 prediction, and the fraction of whole words whose
every token is (greedy completion of the word given the true prefix). A word is a SentencePiece piece
starting with "▁" plus the pieces that follow it up to the next such piece (other tokenizers: one
token = one word); the first word of a window (no context) and a word cut by the window's end are
left out. The model is the run's latest
checkpoint rebuilt at TP = PP = 1 on this machine (dist_checkpointing reshards). Writes RUN_DIR/heldout.json:
{"token_accuracy": {domain: acc}, "word_accuracy": {domain: acc}, "words": {domain: n},
"mean_token_accuracy", "mean_word_accuracy" (macro averages over domains), "iteration", ...}.
"""
import argparse
import functools
import json
import os
import warnings

warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_ext.atomic import atomic_write  # noqa: E402
from megatron_ext.errors import UserError  # noqa: E402
from tools.cli import run_main  # noqa: E402

HELDOUT = "heldout.json"


@functools.lru_cache(maxsize=4)
def piece_starts_word(model_file: str) -> np.ndarray:
    """Per SentencePiece id: does the piece open a word ("▁" prefix, or a control token such as EOD)?"""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    return np.array([sp.id_to_piece(i).startswith("\u2581") or sp.is_control(i) for i in range(sp.get_piece_size())])


def word_starts(token_ids: np.ndarray, tokenizer_record: dict) -> np.ndarray:
    """Boolean per token: does a new word start here?"""
    if tokenizer_record.get("type") != "SentencePieceTokenizer":
        return np.ones(len(token_ids), bool)
    starts = piece_starts_word(tokenizer_record["model"])
    return starts[np.minimum(token_ids, len(starts) - 1)] | (token_ids >= len(starts))


def whole_word_hits(correct: np.ndarray, starts: np.ndarray) -> tuple:
    """(words fully correct, words) over one window's predicted positions, leaving out the first word
    (no context) and the last (it may continue past the window)."""
    bounds = np.flatnonzero(starts)
    hits = words = 0
    for a, b in zip(bounds[1:-1], bounds[2:]):
        words += 1
        hits += bool(correct[a:b].all())
    return hits, words


def load_model(run_dir: str):
    """(model, args) of the run's latest checkpoint, rebuilt at TP = PP = 1 on this machine."""
    from megatron.core import parallel_state
    from megatron_ext import cpu_compat
    from megatron_ext.checkpointing import STATE, checkpoint_dir, latest_iteration, load_checkpoint
    from megatron_ext.model import build_model, layer_spec_kind, padded_vocab_size, transformer_config
    from megatron_ext.tokenizer import build_tokenizer
    from tools.sweep import free_port
    iteration = latest_iteration(run_dir)
    if iteration is None:
        raise UserError(f"{run_dir}: no checkpoint (latest_checkpointed_iteration.txt)")
    extra = torch.load(os.path.join(checkpoint_dir(run_dir, iteration), STATE), weights_only=False)
    args = argparse.Namespace(**dict(extra["args"], tensor_model_parallel_size=1, pipeline_model_parallel_size=1))
    if not torch.cuda.is_available():
        cpu_compat.enable()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(1, 1)
    if not torch.cuda.is_available():
        cpu_compat.model_parallel_cpu_manual_seed(args.seed)
    tokenizer = build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)
    vocab = padded_vocab_size(max(tokenizer.vocab_size, tokenizer.eod + 1), args.make_vocab_size_divisible_by, 1)
    model = build_model(args, transformer_config(args), vocab, layer_spec_kind())
    load_checkpoint(run_dir, model, None, load_optimizer=False)
    model.eval()
    return model, args, iteration


def evaluate(run_dir: str, tokens: dict, windows: int) -> dict:
    from tools.report import token_array
    model, args, iteration = load_model(run_dir)
    seq = args.seq_length
    acc, counts, token_acc = {}, {}, {}
    for domain, info in sorted(tokens["domains"].items()):
        if not info.get("valid_prefix"):
            continue
        ids = np.asarray(token_array(info["valid_prefix"]), dtype=np.int64)
        n = min(windows, (len(ids) - 1) // seq)
        if n == 0:
            continue
        chunks = ids[:n * seq + 1]
        inputs = torch.as_tensor(np.stack([chunks[i * seq:(i + 1) * seq] for i in range(n)]))
        labels = np.stack([chunks[i * seq + 1:(i + 1) * seq + 1] for i in range(n)])
        position_ids = torch.arange(seq).unsqueeze(0).expand(n, seq)
        if torch.cuda.is_available():
            inputs, position_ids = inputs.cuda(), position_ids.cuda()
        with torch.no_grad():
            logits = model(inputs, position_ids, None)
        predicted = logits.float().argmax(dim=-1).cpu().numpy()
        token_acc[domain] = float((predicted == labels).mean())
        hits = words = 0
        for row in range(n):
            h, w = whole_word_hits(predicted[row] == labels[row], word_starts(labels[row], tokens["tokenizer"]))
            hits, words = hits + h, words + w
        if words:
            acc[domain], counts[domain] = hits / words, words
    torch.distributed.destroy_process_group()
    return {"word_accuracy": acc, "words": counts, "token_accuracy": token_acc,
            "mean_word_accuracy": float(np.mean(list(acc.values()))) if acc else None,
            "mean_token_accuracy": float(np.mean(list(token_acc.values()))),
            "iteration": iteration, "windows": windows, "seq_length": seq}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.heldout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--tokens", default="data/tok/tokens.json")
    p.add_argument("--windows", type=int, default=16, help="validation windows per domain")
    args = p.parse_args(argv)
    from tools.sweep import load_tokens
    result = evaluate(args.run_dir, load_tokens(args.tokens), args.windows)
    atomic_write(os.path.join(args.run_dir, HELDOUT), json.dumps(result, indent=1) + "\n")
    print(f"{args.run_dir}: top-1 token accuracy {result['mean_token_accuracy']:.4f}, whole-word accuracy "
          f"{result['mean_word_accuracy']:.4f} (means over {len(result['token_accuracy'])} domains, "
          f"{sum(result['words'].values())} words)")
    return 0


if __name__ == "__main__":
    run_main(main)
