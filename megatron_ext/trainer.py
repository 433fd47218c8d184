"""The training loop on megatron-core: build → restore → loop → save, with callbacks.

`Trainer(args).fit()` is the whole run of `pretrain_regmixd.py`. Everything a resumed run needs is in
one registry (`state_dict`): iteration, consumed samples, LR scheduler, dataset (stages appended by a
controller included) and `callbacks: {name: state_dict}`; it is restored before the first step, so a
run killed anywhere and resumed equals an uninterrupted one (bit-identical on CPU).

Training batches come from `data_loader.TrainBatches` (a DataLoader in Megatron's sample order, the
next global batch read while the current one trains). Micro-batches keep each sample's `dataset_id`,
so every step also reports the per-domain training loss of its own global batch, and a controller can
weight the loss per domain (`loss_weight`).
"""
import os
import time
from functools import partial

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
from megatron_ext.arguments import check_world
from megatron_ext.callbacks import StepResult, default_callbacks
from megatron_ext.checkpointing import load_checkpoint, parallel_layout, save_checkpoint
from megatron_ext.controllers import build_controller
from megatron_ext.data_loader import TrainBatches
from megatron_ext.evaluation import (evaluate_domains, domain_sums, reduce_domain_sums, reduce_last_stage_mean,
                                     target_loss)
from megatron_ext.model import build_model, layer_spec_kind, padded_vocab_size, params_dtype, transformer_config
from megatron_ext.schedule import MixtureSchedule, domain_name
from megatron_ext.scheduled_dataset import build_train_valid_datasets
from megatron_ext.preflight import preflight
from megatron_ext.tokenizer import build_tokenizer, token_id_limit


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
        # deterministic mode also NaN-fills every torch.empty: a debugging aid, ~440 fills per step of
        # the launcher benchmark (docs/BENCHMARKS.md); the losses are bit-identical without it
        torch.utils.deterministic.fill_uninitialized_memory = False
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


class Trainer:
    """One run of the launcher. `callbacks` run in order; the mixture controller, when there is one,
    comes first so that it can annotate the records the writers then write."""

    def __init__(self, args, callbacks=None, controller=None):
        self.args = args
        self.controller = controller if controller is not None else build_controller(args)
        self._extra_callbacks = list(callbacks or [])
        self.iteration = 0
        self.consumed_samples = 0

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        args = self.args
        self.dp = initialize(args)
        self.rank = torch.distributed.get_rank()
        tokenizer = build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                    vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)
        self.vocab = padded_vocab_size(token_id_limit(tokenizer), args.make_vocab_size_divisible_by,
                                       args.tensor_model_parallel_size)
        self.train_iters = (args.train_samples or args.train_iters * args.global_batch_size) // args.global_batch_size
        self.train_samples = self.train_iters * args.global_batch_size
        self.schedule = load_schedule(args)
        preflight(args, self.schedule, token_id_limit(tokenizer), self.vocab)  # before any data is built
        self.train_ds, self.valid_by_domain = build_train_valid_datasets(
            self.schedule, train_samples=self.train_samples, global_batch_size=args.global_batch_size,
            seq_length=args.seq_length, seed=args.seed, tokenizer=tokenizer, cache_dir=args.data_cache_path)
        self.domains = self.train_ds.domains
        self.train_batches = TrainBatches(
            self.train_ds, global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
            end_sample=self.train_samples, num_workers=args.num_workers, dp_size=self.dp,
            dp_rank=parallel_state.get_data_parallel_rank())
        self.valid_weights = ({domain_name(p): w for w, p in zip(*self.schedule.valid)} if self.schedule.valid else {})

        self.spec_kind = layer_spec_kind()
        self.config = config = transformer_config(args)
        self.gpt = self.build_gpt()
        # as Megatron-LM: bf16/fp16 models take and return fp32 at the pipeline ends
        self.model = DistributedDataParallel(config, DistributedDataParallelConfig(), self.wrap_precision(self.gpt))
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
            bf16=args.bf16, fp16=args.fp16, params_dtype=params_dtype(args)), [self.model])
        config.no_sync_func = self.model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss if args.fp16 else None
        decay_iters = args.lr_decay_iters or self.train_iters
        gbs = args.global_batch_size
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters * gbs,
            lr_decay_steps=decay_iters * gbs, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
            end_wd=args.weight_decay, wd_incr_steps=decay_iters * gbs, wd_incr_style="constant")
        # local spec on GPU has no SDPA causal path; TE and SDPAttention are causal without a mask
        self.attention_mask = (torch.ones(1, 1, args.seq_length, args.seq_length, device="cuda").tril() < 0.5
                               if self.spec_kind == "local" else None)
        self.forward_backward = get_forward_backward_func()
        self.num_microbatches = get_num_microbatches()
        self.callbacks = ([self.controller] if self.controller else []) + self._extra_callbacks + \
            default_callbacks(args, self.rank, self.train_iters)
        if self.controller:
            self.controller.setup(self)

    def build_gpt(self):
        """A GPTModel of this run's architecture and layout (the controller's reference model too)."""
        return build_model(self.args, self.config, self.vocab, self.spec_kind)

    def wrap_precision(self, gpt):
        return Float16Module(self.config, gpt) if self.args.bf16 or self.args.fp16 else gpt

    # ------------------------------------------------------------------ state registry
    def state_dict(self) -> dict:
        """Everything a resume needs besides model, optimizer and RNG (which dist_checkpointing and
        the checkpoint's per-rank files hold)."""
        callbacks = {}
        for cb in self.callbacks:
            state = cb.state_dict()
            if state is not None:
                callbacks[cb.name] = state
        return {"consumed_samples": self.consumed_samples, "scheduler": self.scheduler.state_dict(),
                "dataset": self.train_ds.state_dict(), "callbacks": callbacks}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.consumed_samples = state["iteration"], state["consumed_samples"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_ds.load_state_dict(state["dataset"], override=self.args.override_data_schedule,
                                      resume_sample=self.consumed_samples)
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])

    def restore(self) -> None:
        if self.args.load:
            state = load_checkpoint(self.args.load, self.gpt, self.optimizer)
            if state is not None:
                self.load_state_dict(state)

    def save(self) -> None:
        save_checkpoint(self.args.save, self.iteration, self.gpt, self.optimizer,
                        dict(self.state_dict(), args=vars(self.args), **parallel_layout()),
                        keep=self.args.keep_last_checkpoints)

    # ------------------------------------------------------------------ steps
    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], self.attention_mask, labels=batch["labels"])
        return output, partial(self.loss_func, batch)

    def loss_func(self, batch, output_tensor):
        """Mean token loss of one micro-batch (the schedule averages over micro-batches), or the
        controller's weighted loss Σ loss_weight·token loss; reports the plain mean and, for training
        batches, per-domain sums."""
        mask = batch["loss_mask"].float().to(output_tensor.device)
        token_loss = output_tensor.float()
        mean = torch.sum(token_loss * mask) / mask.sum().clamp(min=1)
        report = {"lm loss": mean.detach().clone()}  # the schedule divides the returned loss in place
        if "dataset_id" in batch:
            report["domain loss"], report["domain tokens"] = domain_sums(token_loss, mask, batch["dataset_id"],
                                                                         len(self.domains))
        if "loss_weight" in batch:
            return torch.sum(token_loss * batch["loss_weight"].to(token_loss.device)), report
        return mean, report

    def train_step(self) -> StepResult:
        args = self.args
        start = time.time()
        stage = self.train_ds.stage_of(self.consumed_samples)
        data = self.train_batches.get(self.consumed_samples)
        for cb in self.callbacks:
            cb.on_batch(self, data)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = self.forward_backward(forward_step_func=self.forward_step, data_iterator=iter(data), model=[self.model],
                                    num_microbatches=self.num_microbatches, seq_length=args.seq_length,
                                    micro_batch_size=args.micro_batch_size, forward_only=False)
        self.optimizer.step()
        self.scheduler.step(increment=args.global_batch_size)
        loss = reduce_last_stage_mean([float(o["lm loss"]) for o in out])
        sums, counts = reduce_domain_sums(out, "domain loss", "domain tokens", len(self.domains))
        self.iteration += 1
        self.consumed_samples += args.global_batch_size
        return StepResult(
            iteration=self.iteration, consumed_samples=self.consumed_samples, loss=loss,
            lr=self.optimizer.param_groups[0]["lr"], stage=stage, weights=self.train_ds.weights_at(self.consumed_samples - 1),
            domain_loss={d: float(s / c) for d, s, c in zip(self.domains, sums.tolist(), counts.tolist()) if c > 0},
            seconds=time.time() - start, tokens=args.global_batch_size * args.seq_length,
            data_seconds=self.train_batches.wait_seconds)

    def evaluate_losses(self) -> dict:
        """{domain: validation loss} on the same `--eval-iters` batches every time."""
        return evaluate_domains(self.model, self.forward_step, self.valid_by_domain, self.args.eval_iters,
                                self.args.micro_batch_size, self.args.seq_length)

    def evaluate(self) -> dict:
        """The trajectory record at this point, handed to every callback's `on_eval`."""
        losses = self.evaluate_losses()
        where = max(self.consumed_samples - 1, 0)
        target, target_name = target_loss(losses, self.args.target_domain, self.valid_weights)
        record = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                  "tokens": self.consumed_samples * self.args.seq_length,
                  "progress": self.consumed_samples / self.train_samples, "stage": self.train_ds.stage_of(where),
                  "weights": self.train_ds.weights_at(where), "losses": losses, "target": target,
                  "target_name": target_name}
        for cb in self.callbacks:
            cb.on_eval(self, record)
        return record

    def log_metrics(self, metrics: dict) -> None:
        """Scalars for the metric writers (TensorBoard) at the current iteration."""
        for cb in self.callbacks:
            cb.on_metrics(self, metrics, self.iteration)

    # ------------------------------------------------------------------ the run
    def fit(self) -> int:
        args = self.args
        self.build()
        self.restore()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.iteration < self.train_iters:
            step = self.train_step()
            for cb in self.callbacks:
                cb.on_step_end(self, step)
            it = self.iteration
            if (it % args.eval_interval == 0 or it == self.train_iters
                    or any(cb.wants_eval(self) for cb in self.callbacks)):
                self.evaluate()
            exiting = bool(args.exit_interval and it % args.exit_interval == 0)
            if args.save and (it == self.train_iters or exiting
                              or (args.save_interval and it % args.save_interval == 0)):
                self.save()
            if exiting:
                break
        self.train_batches.close()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        torch.distributed.destroy_process_group()
        return 0
