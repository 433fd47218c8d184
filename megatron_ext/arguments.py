"""Launcher arguments: Megatron-LM's flag names and meanings, plus RegMix-D's data-schedule flags.

`--config FILE` reads defaults from a YAML mapping (`num-layers: 2` or `num_layers: 2`) or from an
args file (Megatron-style flags, one or more per line, `#` comments); flags on the command line win.
"""
import argparse
import os
import shlex

import torch
import yaml

from megatron_ext.errors import UserError
from megatron_ext.text_files import read_text
from megatron_ext.tokenizer import TOKENIZER_TYPES

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 with usage; we want the project's one-line UserError
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain_regmixd.py", description=__doc__)
    p.add_argument("--config", help="YAML or args file with defaults for any flag below")
    m = p.add_argument_group("model")
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--num-query-groups", type=int, help="grouped-query attention (default: heads)")
    m.add_argument("--ffn-hidden-size", type=int, help="default: 4 × hidden")
    m.add_argument("--seq-length", type=int)
    m.add_argument("--max-position-embeddings", type=int, help="default: --seq-length")
    m.add_argument("--norm-epsilon", type=float, default=1e-5)
    m.add_argument("--init-method-std", type=float, default=0.02)
    m.add_argument("--rotary-base", type=int, default=10000)
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    m.add_argument("--bf16", action="store_true")
    m.add_argument("--fp16", action="store_true")
    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int)
    t.add_argument("--global-batch-size", type=int)
    t.add_argument("--train-iters", type=int)
    t.add_argument("--train-samples", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-decay-style", default="linear", choices=LR_DECAY_STYLES)
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--tensor-model-parallel-size", type=int, default=1)
    t.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="*", help="Megatron blend: 'w1 p1 w2 p2 ...' or one prefix")
    d.add_argument("--data-args-path", help="file holding a --data-path value")
    d.add_argument("--per-split-data-args-path", help="JSON {train: [...], valid: [...], test: [...]}")
    d.add_argument("--data-schedule", help="sched.json: a Megatron blend per training stage")
    d.add_argument("--override-data-schedule", action="store_true",
                   help="on --load, accept a schedule different from the checkpoint's (applies from the resume point)")
    d.add_argument("--split", default="100,0,0",
                   help="Megatron's train,valid,test split; per-domain validation comes from the *_valid prefixes")
    d.add_argument("--data-cache-path")
    d.add_argument("--num-workers", type=int,
                   help="DataLoader worker processes reading training batches ahead (default: Megatron's 2 on "
                        "GPU; 0 on CPU: one reader thread in the launcher, since the compute threads already "
                        "fill every core and a step's read is milliseconds)")
    d.add_argument("--tokenizer-type", default="NullTokenizer", choices=TOKENIZER_TYPES)
    d.add_argument("--tokenizer-model")
    d.add_argument("--vocab-file")
    d.add_argument("--merge-file")
    d.add_argument("--vocab-size", type=int)
    io = p.add_argument_group("checkpoints, evaluation and logging")
    io.add_argument("--save")
    io.add_argument("--load")
    io.add_argument("--save-interval", type=int)
    io.add_argument("--keep-last-checkpoints", type=int, default=0,
                    help="after each save keep only the newest N checkpoints (0: keep all, as Megatron-LM)")
    io.add_argument("--exit-interval", type=int, help="save and exit after this iteration")
    io.add_argument("--eval-interval", type=int, default=1000)
    io.add_argument("--eval-iters", type=int, default=10)
    io.add_argument("--target-domain", help="trajectory target (default: valid-blend weighted mean)")
    io.add_argument("--trajectory-file", help="default: <save>/trajectory.jsonl")
    io.add_argument("--tensorboard-dir")
    io.add_argument("--log-interval", type=int, default=100)
    c = p.add_argument_group("online mixture controller")
    c.add_argument("--mixture-controller", choices=("doremi", "regmixd"),
                   help="doremi: Group DRO domain weights against --reference-load; regmixd: online RegMix-D")
    c.add_argument("--reference-load", help="doremi: checkpoint of the reference model (this launcher, same "
                                            "architecture and tokenizer, trained on the baseline mixture)")
    c.add_argument("--doremi-eta", type=float, default=1.0, help="doremi: step size of the weight update")
    c.add_argument("--doremi-smoothing", type=float, default=1e-3,
                   help="doremi: c in α = (1 − c)·α′ + c/k (the authors' 120M script: 1e-3)")
    c.add_argument("--doremi-weights-file", help="doremi: default <save>/doremi_weights.json")
    c.add_argument("--surrogate", help="regmixd: folder written by tools.fit (trajectory mode)")
    c.add_argument("--controller-candidates", type=int, default=100_000, help="regmixd: Dirichlet candidates")
    c.add_argument("--controller-top-k", type=int, default=128, help="regmixd: candidates averaged")
    c.add_argument("--controller-alpha", type=float, default=1.0, help="regmixd: Dirichlet concentration scale")
    c.add_argument("--controller-seed", type=int, default=0)
    c.add_argument("--controller-beta", type=float, default=0.05,
                   help="regmixd: observed loss × (P_target / P_proxy)^beta goes to the surrogate")
    c.add_argument("--controller-tokens", help="regmixd: tokens.json for per-domain token budgets")
    c.add_argument("--controller-max-epochs", type=float, help="regmixd: per-domain budget in epochs (needs "
                                                                 "--controller-tokens)")
    c.add_argument("--controller-max-change", type=float, help="regmixd: largest L1 change between segments")
    c.add_argument("--controller-exclude", default="", help="regmixd: comma-separated domains never to use")
    return p


def _config_argv(path: str, parser: argparse.ArgumentParser) -> list:
    """A config file as argv, so it is parsed (and checked) exactly like the command line."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    text = read_text(path, "--config file")
    if path.endswith((".yaml", ".yml")):
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})")
        if not isinstance(values, dict):
            raise UserError(f"--config {path}: expected a mapping of flag: value")
        argv = []
        for key, value in values.items():
            flag = "--" + str(key).replace("_", "-")
            if value is False or value is None:
                continue
            argv.append(flag)
            if value is not True:
                argv.extend(str(v) for v in value) if isinstance(value, list) else argv.append(str(value))
        return argv
    try:
        return shlex.split(text, comments=True)
    except ValueError as exc:  # shlex: "No closing quotation" / "No escaped character"
        raise UserError(f"--config {path}: not a valid args file ({exc})") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**vars(parser.parse_args(_config_argv(args.config, parser))))
        args = parser.parse_args(argv)
    _complete(args)
    return args


def _require(args, *names):
    for name in names:
        if getattr(args, name) is None:
            raise UserError(f"--{name.replace('_', '-')} is required")


def _complete(args) -> None:
    """Fill Megatron-LM's derived defaults and refuse inconsistent settings with one line."""
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length",
             "micro_batch_size", "global_batch_size", "lr")
    if args.bf16 and args.fp16:
        raise UserError("--bf16 and --fp16 are mutually exclusive")
    if (args.train_iters is None) == (args.train_samples is None):
        raise UserError("give exactly one of --train-iters and --train-samples")
    sources = [s for s in ("data_path", "data_args_path", "per_split_data_args_path", "data_schedule")
               if getattr(args, s)]
    if len(sources) != 1:
        raise UserError("give exactly one of --data-path, --data-args-path, --per-split-data-args-path, "
                        "--data-schedule")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise UserError("--tokenizer-type NullTokenizer needs --vocab-size")
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.num_query_groups = args.num_query_groups or args.num_attention_heads
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "global_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "eval_interval", "log_interval"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    for name in ("train_iters", "train_samples", "save_interval", "exit_interval", "lr_decay_iters"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.train_samples is not None and args.train_samples < args.global_batch_size:
        raise UserError(f"--train-samples {args.train_samples} is less than one global batch "
                        f"({args.global_batch_size})")
    if args.eval_iters <= 0:  # every evaluation measures each domain: zero batches would be no measurement
        raise UserError(f"--eval-iters must be positive, got {args.eval_iters}")
    if args.num_workers is None:
        args.num_workers = 2 if torch.cuda.is_available() else 0
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.keep_last_checkpoints < 0:
        raise UserError(f"--keep-last-checkpoints must be >= 0, got {args.keep_last_checkpoints}")
    if args.lr_warmup_iters < 0:
        raise UserError(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    if args.hidden_size % args.num_attention_heads:
        raise UserError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                        f"{args.num_attention_heads}")
    tp = args.tensor_model_parallel_size
    if args.num_attention_heads % tp or args.num_query_groups % tp:
        raise UserError(f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
                        f"{args.num_attention_heads} (and --num-query-groups {args.num_query_groups})")
    if args.num_layers % args.pipeline_model_parallel_size:
        raise UserError(f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size} does not divide "
                        f"--num-layers {args.num_layers}")
    if args.seq_length > args.max_position_embeddings:
        raise UserError("--seq-length exceeds --max-position-embeddings")
    iters = args.train_iters or args.train_samples // args.global_batch_size
    if args.lr_warmup_iters >= (args.lr_decay_iters or iters) and args.lr_warmup_iters > 0:
        raise UserError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay iterations "
                        f"({args.lr_decay_iters or iters}: --lr-decay-iters, else the training iterations)")
    # the README's first run, `--save runs/t --load runs/t`, starts fresh when runs/t does not exist yet
    starts_fresh = args.save and os.path.abspath(args.load or "") == os.path.abspath(args.save)
    if args.load and not os.path.isdir(args.load) and not (starts_fresh and not os.path.exists(args.load)):
        raise UserError(f"--load {args.load}: no such directory")
    if args.mixture_controller == "doremi" and not args.reference_load:
        raise UserError("--mixture-controller doremi needs --reference-load")
    if args.mixture_controller == "regmixd" and not args.surrogate:
        raise UserError("--mixture-controller regmixd needs --surrogate")
    if args.doremi_weights_file is None and args.save:
        args.doremi_weights_file = os.path.join(args.save, "doremi_weights.json")
    if args.trajectory_file is None and args.save:
        args.trajectory_file = os.path.join(args.save, "trajectory.jsonl")


def check_world(args, world_size: int) -> int:
    """Data-parallel size from the world; refuses layouts Megatron-LM refuses. Returns DP."""
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise UserError(f"world size {world_size} is not divisible by TP × PP = {model_parallel}")
    dp = world_size // model_parallel
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                        f"--micro-batch-size {args.micro_batch_size} × data-parallel size {dp}")
    return dp
