"""Trainer callbacks: the launcher's outputs (train log, trajectory, TensorBoard, console) as hooks.

Shape as OLMo-core's trainer callbacks: a callback sees the trainer at fixed points of the loop and
may keep state that the trainer checkpoints under `callbacks: {name: state_dict}` and restores before
the first step. Writers run on rank 0 only; a mixture controller runs on every rank.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext.evaluation import JsonLines


@dataclass
class StepResult:
    """What one optimizer step did (the same on every rank)."""
    iteration: int
    consumed_samples: int
    loss: float
    lr: float
    stage: int
    weights: dict
    domain_loss: dict = field(default_factory=dict)  # {domain: mean token loss in this step's global batch}
    seconds: float = 0.0
    tokens: int = 0
    data_seconds: float = 0.0  # of `seconds`, spent waiting for this step's batch


class Callback:
    """Hook points of `Trainer.fit`; every method is optional. `state_dict()` returning None means
    nothing to checkpoint."""
    name = "callback"

    def on_fit_start(self, trainer) -> None:
        """After restore, before the first step (trainer.iteration is the resume point)."""

    def on_batch(self, trainer, microbatches: list) -> None:
        """This rank's micro-batches of the step, before forward/backward (may add a `loss_weight`)."""

    def on_step_end(self, trainer, step: StepResult) -> None:
        pass

    def wants_eval(self, trainer) -> bool:
        """True to have the trainer evaluate after this step (besides --eval-interval)."""
        return False

    def on_eval(self, trainer, record: dict) -> None:
        """`record` is the trajectory line; callbacks earlier in the list may add fields to it."""

    def on_metrics(self, trainer, metrics: dict, iteration: int) -> None:
        """Scalars another callback reports (`Trainer.log_metrics`)."""

    def on_fit_end(self, trainer) -> None:
        pass

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class TrainLog(Callback):
    """`<save>/train_log.jsonl`: one line per iteration, cut back to the checkpoint on resume."""
    name = "train_log"

    def __init__(self, path: str):
        self.log = JsonLines(path)

    def on_fit_start(self, trainer):
        self.log.truncate_after(trainer.iteration)

    def on_step_end(self, trainer, step):
        self.log.append({"iteration": step.iteration, "loss": step.loss, "lr": step.lr,
                         "consumed_samples": step.consumed_samples, "stage": step.stage,
                         "domain_loss": step.domain_loss})


class Trajectory(Callback):
    """`--trajectory-file`: one line per evaluation, cut back to the checkpoint on resume."""
    name = "trajectory"

    def __init__(self, path: str):
        self.log = JsonLines(path)

    def on_fit_start(self, trainer):
        self.log.truncate_after(trainer.iteration)

    def on_eval(self, trainer, record):
        self.log.append(record)


class TensorBoard(Callback):
    name = "tensorboard"

    def __init__(self, writer):
        self.writer = writer

    def on_step_end(self, trainer, step):
        self.writer.add_scalar("train/loss", step.loss, step.iteration)
        self.writer.add_scalar("train/lr", step.lr, step.iteration)
        self.writer.add_scalar("train/stage", step.stage, step.iteration)
        for name, value in step.domain_loss.items():
            self.writer.add_scalar(f"train/loss/{name}", value, step.iteration)
        for name, w in step.weights.items():
            self.writer.add_scalar(f"weights/{name}", w, step.iteration)

    def on_eval(self, trainer, record):
        for name, value in record["losses"].items():
            self.writer.add_scalar(f"valid/{name}", value, record["iteration"])
        self.writer.add_scalar("valid/target", record["target"], record["iteration"])

    def on_metrics(self, trainer, metrics, iteration):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, iteration)

    def on_fit_end(self, trainer):
        self.writer.close()

    @staticmethod
    def create(path):
        """A TensorBoard callback, or None when `path` is unset or tensorboard does not import."""
        if not path:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return TensorBoard(SummaryWriter(path))


class Console(Callback):
    """Every `log_interval` iterations: loss, lr, training tokens/s (steps only, not evaluation or
    saves), stage and weights, and the fraction of step time spent waiting for data; every
    evaluation: the per-domain losses."""
    name = "console"

    def __init__(self, log_interval: int, train_iters: int):
        self.log_interval, self.train_iters = log_interval, train_iters
        self.seconds, self.tokens, self.data_seconds = 0.0, 0, 0.0

    def on_step_end(self, trainer, step):
        self.seconds += step.seconds
        self.tokens += step.tokens
        self.data_seconds += step.data_seconds
        if step.iteration % self.log_interval == 0:
            weights = " ".join(f"{k}={v:.3f}" for k, v in step.weights.items())
            seconds = max(self.seconds, 1e-9)
            print(f"iter {step.iteration}/{self.train_iters} loss {step.loss:.6f} lr {step.lr:.3e} "
                  f"tokens/s {self.tokens / seconds:.0f} stage {step.stage} [{weights}] "
                  f"data wait {self.data_seconds / seconds:.4f}", flush=True)
            self.seconds, self.tokens, self.data_seconds = 0.0, 0, 0.0

    def on_eval(self, trainer, record):
        print(f"eval iter {record['iteration']}: target {record['target']:.4f} " +
              " ".join(f"{k} {v:.4f}" for k, v in record["losses"].items()), flush=True)


def default_callbacks(args, rank: int, train_iters: int) -> list:
    """The launcher's outputs: train log (with --save), trajectory, TensorBoard, console; rank 0 only."""
    if rank != 0:
        return []
    out = []
    if args.save:
        out.append(TrainLog(os.path.join(args.save, "train_log.jsonl")))
    if args.trajectory_file:
        out.append(Trajectory(args.trajectory_file))
    tb = TensorBoard.create(args.tensorboard_dir)
    if tb is not None:
        out.append(tb)
    out.append(Console(args.log_interval, train_iters))
    return out
