"""Pretrain a LLaMA-like GPT on megatron-core with a per-stage data-mixture schedule (RegMix-D).

    torchrun --nproc_per_node N pretrain_regmixd.py --config examples/proxy_1m.yaml --data-schedule sched.json --save run/

Flags are Megatron-LM's (see megatron_ext/arguments.py). Each evaluation appends the loss on every
domain's validation set to the trajectory file; checkpoints resume exactly.
"""
import os
import sys
import time
import warnings
from functools import partial

# megatron-core warns at import that Transformer Engine / apex are missing: expected on CPU, where the
# launcher picks its own layer spec (and logs which one).
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed")
# ... and TransformerConfig's own default cuda_graph_scope trips its deprecation warning (no CUDA graphs here)
warnings.filterwarnings("ignore", message="full scope is deprecated")

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.num_microbatches_calculator import get_num_microbatches, init_num_microbatches_calculator
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from megatron_ext import cpu_compat
from megatron_ext.arguments import check_world, parse_args
from megatron_ext.checkpointing import load_checkpoint, parallel_layout, save_checkpoint
from megatron_ext.errors import UserError
from megatron_ext.evaluation import (JsonLines, evaluate_domains, microbatches, reduce_last_stage_mean,
                                     target_loss)
from megatron_ext.model import build_model, layer_spec_kind, padded_vocab_size, params_dtype, transformer_config
from megatron_ext.ownership import own_launch
from megatron_ext.preflight import preflight
from megatron_ext.schedule import MixtureSchedule, domain_name
from megatron_ext.scheduled_dataset import build_train_valid_datasets
from megatron_ext.tokenizer import build_tokenizer, token_id_limit
from tools.cli import run_main


def initialize(args) -> int:
    """torch.distributed (nccl on GPU, gloo on CPU), parallel_state, seeds; returns the DP size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_world(args, world)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu_compat.enable()
        torch.use_deterministic_algorithms(True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo", world_size=world,
                                         rank=int(os.environ.get("RANK", "0")))
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    init_num_microbatches_calculator(torch.distributed.get_rank(), None, args.global_batch_size,
                                     args.micro_batch_size, dp)
    torch.manual_seed(args.seed)
    if on_gpu:
        model_parallel_cuda_manual_seed(args.seed)
    else:
        cpu_compat.model_parallel_cpu_manual_seed(args.seed)
    return dp


def load_schedule(args) -> MixtureSchedule:
    if args.data_schedule:
        schedule = MixtureSchedule.load(args.data_schedule)
    elif args.data_path:
        schedule = MixtureSchedule.from_data_path(args.data_path)
    elif args.data_args_path:
        schedule = MixtureSchedule.from_data_args_path(args.data_args_path)
    else:
        schedule = MixtureSchedule.from_per_split_data_args_path(args.per_split_data_args_path)
    schedule.validate()
    return schedule


def loss_func(loss_mask, output_tensor):
    """Mean token loss of one micro-batch (the schedule averages over micro-batches)."""
    loss = torch.sum(output_tensor.float() * loss_mask) / loss_mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def forward_step(data_iterator, model, attention_mask=None):
    batch = next(data_iterator)
    loss_mask = batch["loss_mask"].float()
    output = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"])
    return output, partial(loss_func, loss_mask.to(output.device))


def train(args) -> int:
    dp = initialize(args)
    rank = torch.distributed.get_rank()
    tokenizer = build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)
    # Megatron's NullTokenizer counts its EOD (= --vocab-size) in vocab_size; max() holds either way
    vocab = padded_vocab_size(max(tokenizer.vocab_size, tokenizer.eod + 1), args.make_vocab_size_divisible_by,
                              args.tensor_model_parallel_size)
    train_samples = args.train_samples or args.train_iters * args.global_batch_size
    train_iters = train_samples // args.global_batch_size
    schedule = load_schedule(args)
    preflight(args, schedule, token_id_limit(tokenizer), vocab)  # before any data is built or model trained
    train_ds, valid_by_domain = build_train_valid_datasets(
        schedule, train_samples=train_iters * args.global_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, seed=args.seed, tokenizer=tokenizer, cache_dir=args.data_cache_path)
    valid_weights = ({domain_name(p): w for w, p in zip(*schedule.valid)} if schedule.valid else {})

    spec_kind = layer_spec_kind()
    config = transformer_config(args)
    gpt = build_model(args, config, vocab, spec_kind)
    # as Megatron-LM: bf16/fp16 models take and return fp32 at the pipeline ends
    model = DistributedDataParallel(config, DistributedDataParallelConfig(),
                                    Float16Module(config, gpt) if args.bf16 or args.fp16 else gpt)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=args.bf16, fp16=args.fp16, params_dtype=params_dtype(args)), [model])
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if args.fp16 else None
    decay_iters = args.lr_decay_iters or train_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size,
        lr_decay_steps=decay_iters * args.global_batch_size, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=decay_iters * args.global_batch_size,
        wd_incr_style="constant")

    iteration, consumed = 0, 0
    state = load_checkpoint(args.load, gpt, optimizer) if args.load else None
    if state is not None:
        iteration, consumed = state["iteration"], state["consumed_samples"]
        scheduler.load_state_dict(state["scheduler"])
        train_ds.load_state_dict(state["dataset"], override=args.override_data_schedule, resume_sample=consumed)
    logs = JsonLines(os.path.join(args.save, "train_log.jsonl")) if args.save and rank == 0 else None
    trajectory = JsonLines(args.trajectory_file) if args.trajectory_file and rank == 0 else None
    for log in (logs, trajectory):
        if log is not None:
            log.truncate_after(iteration)
    tb = tensorboard_writer(args.tensorboard_dir) if rank == 0 else None
    # local spec on GPU has no SDPA causal path; TE and SDPAttention are causal without a mask
    mask = (torch.ones(1, 1, args.seq_length, args.seq_length, device="cuda").tril() < 0.5
            if spec_kind == "local" else None)
    step = partial(forward_step, attention_mask=mask)
    fwd_bwd = get_forward_backward_func()
    num_mb = get_num_microbatches()

    def run_eval():
        losses = evaluate_domains(model, step, valid_by_domain, args.eval_iters, args.micro_batch_size,
                                  args.seq_length)
        where = max(consumed - 1, 0)
        target, target_name = target_loss(losses, args.target_domain, valid_weights)
        record = {"iteration": iteration, "consumed_samples": consumed, "tokens": consumed * args.seq_length,
                  "progress": consumed / train_samples, "stage": train_ds.stage_of(where),
                  "weights": train_ds.weights_at(where), "losses": losses, "target": target,
                  "target_name": target_name}
        if trajectory:
            trajectory.append(record)
        if tb:
            for name, value in losses.items():
                tb.add_scalar(f"valid/{name}", value, iteration)
            tb.add_scalar("valid/target", target, iteration)
        if rank == 0:
            print(f"eval iter {iteration}: target {target:.4f} " +
                  " ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)

    def save():
        save_checkpoint(args.save, iteration, gpt, optimizer, dict(
            consumed_samples=consumed, scheduler=scheduler.state_dict(), dataset=train_ds.state_dict(),
            args=vars(args), **parallel_layout()), keep=args.keep_last_checkpoints)

    train_seconds, tokens_since = 0.0, 0  # tokens/s counts training steps only, not evaluation or saves
    while iteration < train_iters:
        start = time.time()
        stage = train_ds.stage_of(consumed)
        data = microbatches(train_ds, consumed, num_mb, args.micro_batch_size)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = fwd_bwd(forward_step_func=step, data_iterator=iter(data), model=[model], num_microbatches=num_mb,
                      seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=False)
        optimizer.step()
        scheduler.step(increment=args.global_batch_size)
        loss = reduce_last_stage_mean([float(o["lm loss"]) for o in out])
        iteration += 1
        consumed += args.global_batch_size
        lr = optimizer.param_groups[0]["lr"]
        if logs:
            logs.append({"iteration": iteration, "loss": loss, "lr": lr, "consumed_samples": consumed, "stage": stage})
        if tb:
            tb.add_scalar("train/loss", loss, iteration)
            tb.add_scalar("train/lr", lr, iteration)
            tb.add_scalar("train/stage", stage, iteration)
            for name, w in train_ds.weights_at(consumed - 1).items():
                tb.add_scalar(f"weights/{name}", w, iteration)
        tokens_since += args.global_batch_size * args.seq_length
        train_seconds += time.time() - start
        if rank == 0 and iteration % args.log_interval == 0:
            rate = tokens_since / train_seconds
            weights = " ".join(f"{k}={v:.3f}" for k, v in train_ds.weights_at(consumed - 1).items())
            print(f"iter {iteration}/{train_iters} loss {loss:.6f} lr {lr:.3e} tokens/s {rate:.0f} "
                  f"stage {stage} [{weights}]", flush=True)
            train_seconds, tokens_since = 0.0, 0
        if iteration % args.eval_interval == 0 or iteration == train_iters:
            run_eval()
        if args.save and (iteration == train_iters or (args.save_interval and iteration % args.save_interval == 0)
                          or (args.exit_interval and iteration % args.exit_interval == 0)):
            save()
        if args.exit_interval and iteration % args.exit_interval == 0:
            break
    if tb:
        tb.close()
    torch.distributed.destroy_process_group()
    return 0


def tensorboard_writer(path):
    if not path:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(path)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        own_launch(args)  # lock --save for this process's lifetime; helper processes die with it
        return train(args)
    except UserError:
        if int(os.environ.get("RANK", "0")) != 0:  # every rank exits 2; rank 0 prints the one line
            sys.exit(2)
        raise


if __name__ == "__main__":
    run_main(main)
