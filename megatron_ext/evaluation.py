"""Batches by global sample index, per-domain validation loss, and crash-safe JSON-lines logs.

`microbatches` reads a global batch synchronously in Megatron's pretraining layout (see
megatron_ext.data_loader, which reads training batches ahead in the same layout). Evaluation uses the
layout from index 0 of each domain's validation set, so every evaluation sees exactly the same samples.
"""
import json
import os

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext.atomic import atomic_write
from megatron_ext.data_loader import microbatch_range, stack_samples, to_device
from megatron_ext.errors import UserError


def collate(dataset, indices) -> dict:
    """A micro-batch of samples, on the GPU when there is one."""
    return to_device(stack_samples([dataset[int(i)] for i in indices]))


def microbatches(dataset, first_sample: int, num_microbatches: int, micro_batch_size: int) -> list:
    """This data-parallel rank's micro-batches of the global batch starting at `first_sample`."""
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    return [collate(dataset, microbatch_range(first_sample, j, micro_batch_size, dp, rank))
            for j in range(num_microbatches)]


def reduce_last_stage_mean(losses: list) -> float:
    """Mean of the last pipeline stage's micro-batch losses, averaged over data-parallel ranks and
    made known to every rank (one all-reduce over the world; TP ranks hold equal copies)."""
    local = torch.tensor(float(np.mean(losses)) if losses else 0.0, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(local)
        local /= (parallel_state.get_data_parallel_world_size()
                  * parallel_state.get_tensor_model_parallel_world_size())
    return float(local)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the world (in place); a no-op in one process."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def domain_sums(values: torch.Tensor, mask: torch.Tensor, dataset_id: torch.Tensor, n_domains: int):
    """(per-domain sum of masked token values, per-domain token count) of one micro-batch, float64."""
    ids = dataset_id.long().cpu()
    sums = torch.zeros(n_domains, dtype=torch.float64).index_add_(0, ids, (values.detach() * mask).sum(1).double().cpu())
    counts = torch.zeros(n_domains, dtype=torch.float64).index_add_(0, ids, mask.sum(1).double().cpu())
    return sums, counts


def reduce_domain_sums(outputs: list, sum_key: str, count_key: str, n_domains: int):
    """Per-domain (sums, counts) of the whole global batch, the same on every rank: only the last
    pipeline stage has outputs; TP ranks add equal copies to both, which the ratio cancels."""
    total = torch.zeros(2, n_domains, dtype=torch.float64)
    for o in outputs:
        total[0] += o[sum_key]
        total[1] += o[count_key]
    all_reduce_sum(total)
    return total[0], total[1]


def evaluate_domains(model, forward_step, valid_by_domain: dict, eval_iters: int, micro_batch_size: int,
                     seq_length: int) -> dict:
    """{domain: mean loss over its first `eval_iters` micro-batches per data-parallel rank}."""
    dp = parallel_state.get_data_parallel_world_size()
    model.eval()
    losses = {}
    with torch.no_grad():
        for name, ds in valid_by_domain.items():
            iters = min(eval_iters, len(ds) // (micro_batch_size * dp))
            if iters == 0:
                raise UserError(f"validation set of domain {name!r} has {len(ds)} samples, fewer than "
                                f"micro batch × data-parallel = {micro_batch_size * dp}")
            data = microbatches(ds, 0, iters, micro_batch_size)
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(data), model=[model],
                num_microbatches=iters, seq_length=seq_length, micro_batch_size=micro_batch_size,
                forward_only=True)
            losses[name] = reduce_last_stage_mean([float(o["lm loss"]) for o in out])
    model.train()
    return losses


def target_loss(losses: dict, target_domain, valid_weights: dict) -> tuple:
    """(target value, target name): the named domain, or the valid blend's weighted mean."""
    if target_domain:
        if target_domain not in losses:
            raise UserError(f"--target-domain {target_domain!r} is not one of {sorted(losses)}")
        return losses[target_domain], target_domain
    total = sum(valid_weights.get(d, 0.0) for d in losses)
    if total <= 0:
        return float(np.mean(list(losses.values()))), "mean"
    return sum(valid_weights.get(d, 0.0) * v for d, v in losses.items()) / total, "weighted_mean"


class JsonLines:
    """An append-only JSON-lines file that a crash cannot leave with a partial line.

    Each record is one os.write of a whole line, then fsync. On resume, `truncate_after(it)` drops
    records past the checkpoint's iteration so the file matches an uninterrupted run.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, iteration: int) -> None:
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # written by something else than append(); never ours
                if json.loads(line)["iteration"] <= iteration:
                    keep.append(line)
        atomic_write(self.path, "".join(keep), fsync=True)

    def append(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
