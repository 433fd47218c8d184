"""Training batches from a torch DataLoader in Megatron's pretraining sample order, read ahead.

Megatron's pretraining sampler: iteration k consumes global samples [c, c + global_batch) with
c = consumed samples; micro-batch j of data-parallel rank r holds c + (j·DP + r)·micro … + micro − 1.
`PretrainingBatchSampler` yields exactly these index lists, so a DataLoader over the scheduled
dataset gives the batches the synchronous reader (`evaluation.microbatches`) gives, bit for bit.

`TrainBatches` reads the next global batch while the current one trains: with `--num-workers N > 0`
in N DataLoader worker processes (forked from the main thread, so `ownership` makes them die with the
launcher), with 0 in one background thread of this process (torch releases the GIL while it computes).
A mixture controller changes the samples from a decision point on (`append_stage`): batches read
before the dataset's state changed are dropped and read again, so no step trains on a stale mixture.
"""
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def microbatch_range(first_sample: int, j: int, micro_batch_size: int, dp_size: int, dp_rank: int) -> range:
    """Global sample indices of micro-batch j of DP rank `dp_rank` in the global batch at `first_sample`."""
    start = first_sample + (j * dp_size + dp_rank) * micro_batch_size
    return range(start, start + micro_batch_size)


def stack_samples(samples: list) -> dict:
    """A micro-batch of samples (CPU tensors); a blended dataset's samples keep their domain
    (`dataset_id`), so losses can be told apart per domain."""
    keys = BATCH_KEYS + (("dataset_id",) if "dataset_id" in samples[0] else ())
    return {k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples]) for k in keys}


def to_device(batch: dict) -> dict:
    """The batch on the GPU when there is one (asynchronous from pinned memory)."""
    if torch.cuda.is_available():
        return {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return batch


class PretrainingBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches (index lists) of the global batches in [first_sample, end_sample)."""

    def __init__(self, first_sample: int, end_sample: int, global_batch_size: int, micro_batch_size: int,
                 dp_size: int, dp_rank: int):
        self.first_sample, self.end_sample = first_sample, end_sample
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)

    def __iter__(self):
        for c in range(self.first_sample, self.end_sample, self.global_batch_size):
            for j in range(self.num_microbatches):
                yield list(microbatch_range(c, j, self.micro_batch_size, self.dp_size, self.dp_rank))

    def __len__(self) -> int:
        return -(-(self.end_sample - self.first_sample) // self.global_batch_size) * self.num_microbatches


class TrainBatches:
    """`get(c)`: this rank's micro-batches of the global batch at sample c, the next one already
    being read. The reader restarts at c when c is not the sample after the last batch (a resume) or
    the dataset's state differs from when reading began (a controller appended a stage)."""

    def __init__(self, dataset, *, global_batch_size: int, micro_batch_size: int, end_sample: int,
                 num_workers: int, dp_size: int = 1, dp_rank: int = 0):
        self.dataset, self.end_sample, self.num_workers = dataset, end_sample, num_workers
        self.layout = dict(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                           dp_size=dp_size, dp_rank=dp_rank)
        self.global_batch_size = global_batch_size
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.next_sample = None          # first sample of the batch the reader holds or reads next
        self.dataset_state = None        # the dataset's state_dict() when the reader started
        self.batches = None              # iterator over micro-batches
        self.pending = None              # the thread's read of the next global batch (0 workers)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="regmixd-data") if num_workers == 0 else None
        self.wait_seconds = 0.0          # how long the last `get` waited for its batch

    def _start(self, first_sample: int) -> None:
        self._drop()
        sampler = PretrainingBatchSampler(first_sample, self.end_sample, **self.layout)
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=stack_samples,
            pin_memory=torch.cuda.is_available(),
            # a whole global batch in flight across the workers
            prefetch_factor=max(2, math.ceil(self.num_microbatches / workers)) if workers else None)
        self.batches = iter(loader)
        self.next_sample, self.dataset_state = first_sample, self.dataset.state_dict()

    def _read(self, batches) -> list:
        return [next(batches) for _ in range(self.num_microbatches)]

    def _drop(self) -> None:
        """Forget what was read ahead (a worker iterator shuts its workers down when dropped)."""
        if self.pending is not None:
            self.pending.exception()  # wait for it; a read racing a controller's rebuild may fail, unused
            self.pending = None
        self.batches = None

    def get(self, first_sample: int) -> list:
        start = time.perf_counter()
        if first_sample != self.next_sample or self.dataset.state_dict() != self.dataset_state:
            self._start(first_sample)
        if self.pending is not None:
            data, self.pending = self.pending.result(), None
        else:
            data = self._read(self.batches)
        self.next_sample = first_sample + self.global_batch_size
        if self.thread is not None and self.next_sample < self.end_sample:
            self.pending = self.thread.submit(self._read, self.batches)
        data = [to_device(b) for b in data]
        self.wait_seconds = time.perf_counter() - start
        return data

    def close(self) -> None:
        self._drop()
        if self.thread is not None:
            self.thread.shutdown()
