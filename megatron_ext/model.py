"""The LLaMA-like megatron-core GPTModel (RMSNorm, SwiGLU, rotary, untied embeddings) of RegMix.

The layer spec is picked at run time: Transformer Engine's when it imports and CUDA is available,
megatron-core's local spec on GPU otherwise, and on CPU the local spec with `SDPAttention` as its
core attention (see cpu_compat).
"""
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig

from megatron_ext.cpu_compat import SDPAttention


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises more than ImportError when its CUDA libraries are missing
        return False
    return True


def layer_spec_kind() -> str:
    """'te', 'local' or 'cpu-sdpa': which layer spec this machine gets."""
    if not torch.cuda.is_available():
        return "cpu-sdpa"
    return "te" if have_transformer_engine() else "local"


def layer_spec(kind: str):
    if kind == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if kind == "cpu-sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron-LM's --make-vocab-size-divisible-by: round up to a multiple of divisible_by × TP."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def params_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args) -> TransformerConfig:
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.hidden_size // args.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        params_dtype=params_dtype(args),
        pipeline_dtype=params_dtype(args),
        bf16=args.bf16,
        fp16=args.fp16,
        # CPU init draws every weight from one CPU generator, so TP/PP layouts start identical
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,  # needs Megatron-LM's compiled softmax kernels; TE has its own
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        batch_p2p_comm=on_gpu,
        batch_p2p_sync=on_gpu,
    )


def build_model(args, config: TransformerConfig, vocab_size: int, spec_kind: str) -> GPTModel:
    """This rank's pipeline stage of the GPT model (on GPU when there is one)."""
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec_kind),
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=args.rotary_base,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
