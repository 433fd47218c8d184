"""Import a Hugging Face `LlamaForCausalLM` folder as a model-only launcher checkpoint.

    python -m tools.import_hf --hf HF_DIR --save CKPT_DIR [-- LAUNCHER FLAGS...]

Writes `CKPT_DIR/iter_0000000` (dist_checkpointing, reshardable to any TP/PP) marked model-only: the
launcher's `--load CKPT_DIR` takes its weights and starts iteration, optimizer, LR schedule and data
order fresh, so a schedule continues pretraining a public model. The model flags come from the HF
config and are printed (and written to CKPT_DIR/model_flags.txt); given the launcher's own command line
after `--`, import checks its model flags and padded vocabulary against the HF model first.
"""
import argparse
import os

import torch

from megatron_ext.atomic import atomic_write
from megatron_ext.errors import UserError
from tools.cli import run_main
from tools.hf_mapping import (MODEL_FLAGS, flags_text, hf_to_megatron, init_single_process,
                              launcher_tokenizer_flags, model_flags_from_llama, require_hf, single_process_model,
                              weights_only)


def launcher_args(flags: dict, launcher_argv: list) -> argparse.Namespace:
    """The launcher's arguments for the imported model: its command line when given (checked against
    the HF model's flags), else the launcher's defaults with the HF model's flags."""
    from megatron_ext.arguments import build_parser, parse_args

    if not launcher_argv:
        return argparse.Namespace(**dict(vars(build_parser().parse_args([])), **flags))
    args = parse_args(launcher_argv)
    wrong = [f"--{k.replace('_', '-')} {getattr(args, k)} (HF: {flags[k]})" for k in MODEL_FLAGS
             if getattr(args, k) != flags[k]]
    if wrong:
        raise UserError("the launcher flags do not match the HF model: " + ", ".join(wrong))
    return args


def check_vocab(args: argparse.Namespace, hf_vocab: int) -> None:
    """The launcher pads its tokenizer's vocabulary; the result must be the HF embedding's row count."""
    from megatron_ext.model import padded_vocab_size
    from megatron_ext.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)
    ours = padded_vocab_size(max(tokenizer.vocab_size, tokenizer.eod + 1), args.make_vocab_size_divisible_by,
                             args.tensor_model_parallel_size)
    if ours != hf_vocab:
        raise UserError(f"the launcher's padded vocabulary is {ours} (tokenizer {tokenizer.vocab_size}, "
                        f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} × TP "
                        f"{args.tensor_model_parallel_size}), the HF model's {hf_vocab}: choose "
                        "--make-vocab-size-divisible-by so they agree")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.import_hf", description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="a LlamaForCausalLM folder (config.json + weights)")
    p.add_argument("--save", required=True, help="the checkpoint directory to write (the launcher's --load)")
    p.add_argument("launcher", nargs=argparse.REMAINDER, help="-- then the launcher's flags, to check against")
    args = p.parse_args(argv)
    launcher_argv = args.launcher[1:] if args.launcher[:1] == ["--"] else args.launcher
    transformers, _ = require_hf()
    if not os.path.isfile(os.path.join(args.hf, "config.json")):
        raise UserError(f"--hf {args.hf}: no config.json")
    config = transformers.AutoConfig.from_pretrained(args.hf)
    flags = model_flags_from_llama(config)
    os.makedirs(args.save, exist_ok=True)  # the launcher flags may name it as --load
    target = launcher_args(flags, launcher_argv)
    if launcher_argv:
        check_vocab(target, config.vocab_size)
    if os.path.exists(os.path.join(args.save, "latest_checkpointed_iteration.txt")):
        raise UserError(f"--save {args.save} already holds a checkpoint")
    dtype = torch.bfloat16 if target.bf16 else torch.float16 if target.fp16 else torch.float32
    hf = transformers.LlamaForCausalLM.from_pretrained(args.hf, dtype=dtype)
    init_single_process()
    from megatron_ext.checkpointing import save_checkpoint

    model = single_process_model(target, config.vocab_size)
    state = model.state_dict()
    mapped = hf_to_megatron(hf.state_dict(), target)
    if set(mapped) != set(weights_only(state)):
        raise UserError(f"--hf {args.hf}: weights do not match the config "
                        f"({sorted(set(mapped) ^ set(weights_only(state)))[:3]} ...)")
    for name, tensor in mapped.items():
        if tensor.shape != state[name].shape:
            raise UserError(f"--hf {args.hf}: {name} has shape {tuple(tensor.shape)}, "
                            f"the config implies {tuple(state[name].shape)}")
    model.load_state_dict(dict(state, **mapped))
    save_checkpoint(args.save, 0, model, None, {
        "model_only": True, "source": os.path.abspath(args.hf), "args": vars(target), "world_size": 1,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1})
    text = flags_text(flags)
    atomic_write(os.path.join(args.save, "model_flags.txt"), text + "\n")
    tokenizer = launcher_tokenizer_flags(args.hf) or "(no SentencePiece or GPT-2 files in the HF folder)"
    print(f"imported {args.hf} → {args.save} (model-only, iteration 0, vocab {config.vocab_size})\n"
          f"model flags: {text}\ntokenizer flags: {tokenizer}\n"
          f"train with: pretrain_regmixd.py {text} --load {args.save} --save RUN_DIR ...")
    return 0


if __name__ == "__main__":
    run_main(main)
