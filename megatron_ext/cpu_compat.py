"""Run megatron-core 0.16.1 on machines without CUDA, touching nothing when CUDA is present.

megatron-core allocates a handful of bookkeeping tensors with `device="cuda"` or
`torch.cuda.current_device()` even when the model lives on the CPU (see docs/ARCHITECTURE.md for the
list). Three narrow seams fix that:

- `SDPAttention`: the local spec's core attention with `scaled_dot_product_attention` instead of the
  `DotProductAttention` matmul, which takes its buffer from a CUDA memory pool;
- `CpuRNGStatesTracker`: megatron-core's RNG tracker API on the CPU generator (the CUDA one asserts);
- `enable()`: inside the few megatron-core modules that allocate on CUDA, the module-global `torch`
  is replaced by `_CudaAbsentTorch`, which sends `"cuda"` allocations to the CPU and makes
  `torch.cuda.synchronize/empty_cache` no-ops, and the optimizer's gradient clipping skips its
  assertion that gradients are CUDA tensors. Nothing else in torch or megatron-core changes.
"""
import contextlib
import importlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.transformer.dot_product_attention import DotProductAttention

# megatron-core modules that allocate on CUDA regardless of where the model is (0.16.1)
PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad-norm fallback without apex/TE)
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.optimizer.optimizer",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
)


def _cpu_device(device):
    """'cuda', 'cuda:0', torch.device('cuda') or a CUDA index → 'cpu'; anything else unchanged."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return "cpu"
    return device


class _CpuCuda:
    """`torch.cuda` as seen by a patched module: the current device is the CPU, syncs are no-ops."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None


class _CudaAbsentTorch:
    """`torch` as seen by a patched module: tensor factories put 'cuda' tensors on the CPU."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _redirect(factory):
        def make(*args, device=None, **kwargs):
            return factory(*args, device=_cpu_device(device), **kwargs)
        return make


for _name in ("zeros", "empty", "ones", "full", "tensor", "arange"):
    setattr(_CudaAbsentTorch, _name, staticmethod(_CudaAbsentTorch._redirect(getattr(torch, _name))))


class CpuRNGStatesTracker(tp_random.CudaRNGStatesTracker):
    """megatron-core's named RNG streams (model-parallel, data-parallel) kept on the CPU generator."""

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def model_parallel_cpu_manual_seed(seed: int) -> None:
    """CPU twin of `model_parallel_cuda_manual_seed`: same stream names and seed offsets."""
    from megatron.core import parallel_state

    tp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(tp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)


class SDPAttention(DotProductAttention):
    """Local-spec core attention on `torch.nn.functional.scaled_dot_product_attention`.

    Reuses DotProductAttention's set-up (heads per partition, softmax scale); only the forward
    differs, so it needs no CUDA buffer. Causal masks only (GPT pretraining).
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "SDPAttention: unsupported input"
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # DotProductAttention folds query-key layer scaling back in inside its softmax
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
        # [b, n, s, h] -> [s, b, n*h]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's `clip_grad_by_total_norm_fp32` minus its `torch.cuda.FloatTensor` assertion."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is not None:
                grad.detach().mul_(clip_coeff)


_enabled = False


def enable() -> bool:
    """Install the CUDA-absent seams; a no-op (returns False) when CUDA is available."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if not _enabled:
        for name in PATCHED_MODULES:
            importlib.import_module(name).torch = _CudaAbsentTorch()
        importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = \
            clip_grad_by_total_norm_cpu
        _enabled = True
    return True
