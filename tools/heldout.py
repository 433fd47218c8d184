"""Held-out checks no arm optimizes, on a finished run: top-1 accuracy (per token and per whole word)
on every domain, and the loss on the evaluation-only sets (text from sources no domain holds).

    python -m tools.heldout RUN_DIR --tokens data/tok/tokens.json [--windows 16] [--eval-only-windows 256]

Every arm minimizes a loss; this scores something else, fixed before any result was seen: on each
domain's validation tokens (the first `--windows` windows of seq-length + 1 tokens of its `.bin`), the
fraction of next tokens that are the model's top-1 prediction, and the fraction of whole words whose
every token is (greedy completion of the word given the true prefix). A word is a SentencePiece piece
starting with "▁" plus the pieces that follow it up to the next such piece (other tokenizers: one
token = one word); the first word of a window (no context) and a word cut by the window's end are
left out. Each evaluation-only set of tokens.json ("eval_only") is scored the same way on its first
`--eval-only-windows` windows, plus its mean cross-entropy (nats per predicted token, the launcher's
loss). The model is the run's latest checkpoint rebuilt at TP = PP = 1 on this machine
(dist_checkpointing reshards). Writes RUN_DIR/heldout.json: {"token_accuracy": {domain: acc},
"word_accuracy": {domain: acc}, "words": {domain: n}, "mean_token_accuracy", "mean_word_accuracy"
(macro averages over domains), "eval_only": {set: {"loss", "token_accuracy", "word_accuracy", "words",
"tokens"}}, "iteration", ...}.
"""
import argparse
import functools
import json
import os

import megatron_ext.quiet_imports  # noqa: E402,F401  (before megatron-core)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_ext.atomic import atomic_write  # noqa: E402
from megatron_ext.errors import UserError  # noqa: E402
from tools.cli import run_main  # noqa: E402

HELDOUT = "heldout.json"
BATCH_WINDOWS = 16  # windows per forward pass


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


def score_windows(model, ids: np.ndarray, seq: int, windows: int, tokenizer_record: dict):
    """Loss and top-1 accuracies of `model` on the first `windows` windows of seq + 1 tokens of `ids`
    (consecutive windows share one token, so every token after the first is predicted once); None if
    `ids` holds no whole window. `model(inputs, position_ids, None)` returns [batch, seq, vocab] logits."""
    n = min(windows, (len(ids) - 1) // seq)
    if n <= 0:
        return None
    chunks = ids[:n * seq + 1]
    loss = correct = hits = words = 0
    for first in range(0, n, BATCH_WINDOWS):
        rows = range(first, min(n, first + BATCH_WINDOWS))
        inputs = torch.as_tensor(np.stack([chunks[i * seq:(i + 1) * seq] for i in rows]))
        labels = np.stack([chunks[i * seq + 1:(i + 1) * seq + 1] for i in rows])
        position_ids = torch.arange(seq).unsqueeze(0).expand(len(rows), seq)
        if torch.cuda.is_available():
            inputs, position_ids = inputs.cuda(), position_ids.cuda()
        with torch.no_grad():
            logits = model(inputs, position_ids, None).float()
            target = torch.as_tensor(labels, device=logits.device)
            loss += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        predicted = logits.argmax(dim=-1).cpu().numpy()
        correct += int((predicted == labels).sum())
        for row in range(len(rows)):
            h, w = whole_word_hits(predicted[row] == labels[row], word_starts(labels[row], tokenizer_record))
            hits, words = hits + h, words + w
    return {"loss": loss / (n * seq), "token_accuracy": correct / (n * seq),
            "word_accuracy": hits / words if words else None, "words": words, "tokens": n * seq}


def is_current(run_dir: str, tokens: dict) -> bool:
    """Does RUN_DIR/heldout.json exist and cover every eval-only set tokens.json now has?"""
    from tools.sweep import read_json
    done = read_json(os.path.join(run_dir, HELDOUT))
    return done is not None and set(tokens.get("eval_only", {})) <= set(done.get("eval_only", {}))


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


def evaluate(run_dir: str, tokens: dict, windows: int, eval_only_windows: int) -> dict:
    from tools.report import token_array
    model, args, iteration = load_model(run_dir)
    seq = args.seq_length

    def scores(entries: dict, n: int) -> dict:
        return {name: score_windows(model, np.asarray(token_array(info["valid_prefix"]), dtype=np.int64), seq, n,
                                    tokens["tokenizer"])
                for name, info in sorted(entries.items()) if info.get("valid_prefix")}

    domains = {d: s for d, s in scores(tokens["domains"], windows).items() if s}
    eval_only = {name: s for name, s in scores(tokens.get("eval_only", {}), eval_only_windows).items() if s}
    torch.distributed.destroy_process_group()
    token_acc = {d: s["token_accuracy"] for d, s in domains.items()}
    acc = {d: s["word_accuracy"] for d, s in domains.items() if s["words"]}
    return {"word_accuracy": acc, "words": {d: domains[d]["words"] for d in acc}, "token_accuracy": token_acc,
            "mean_word_accuracy": float(np.mean(list(acc.values()))) if acc else None,
            "mean_token_accuracy": float(np.mean(list(token_acc.values()))),
            "eval_only": eval_only, "iteration": iteration, "windows": windows,
            "eval_only_windows": eval_only_windows, "seq_length": seq}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.heldout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--tokens", default="data/tok/tokens.json")
    p.add_argument("--windows", type=int, default=16, help="validation windows per domain")
    p.add_argument("--eval-only-windows", type=int, default=256, help="windows per evaluation-only set")
    args = p.parse_args(argv)
    from tools.sweep import load_tokens
    result = evaluate(args.run_dir, load_tokens(args.tokens), args.windows, args.eval_only_windows)
    atomic_write(os.path.join(args.run_dir, HELDOUT), json.dumps(result, indent=1) + "\n")
    print(f"{args.run_dir}: top-1 token accuracy {result['mean_token_accuracy']:.4f}, whole-word accuracy "
          f"{result['mean_word_accuracy']:.4f} (means over {len(result['token_accuracy'])} domains, "
          f"{sum(result['words'].values())} words)")
    for name, s in result["eval_only"].items():
        print(f"{args.run_dir}: {name} (evaluation only): loss {s['loss']:.4f} nats/token, top-1 token accuracy "
              f"{s['token_accuracy']:.4f} ({s['tokens']} tokens)")
    return 0


if __name__ == "__main__":
    run_main(main)
