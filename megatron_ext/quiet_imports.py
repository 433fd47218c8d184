"""Import before megatron-core. It silences what megatron-core and torch say on every CPU run that
needs no action from a user:
- at import, that Transformer Engine / apex are missing (the expected CPU set-up; the launcher picks its
  own layer spec and logs which one);
- TransformerConfig's default cuda_graph_scope tripping its own deprecation warning (no CUDA graphs here);
- torch's deprecation of ShardedTensor and `load_state_dict`, which megatron-core's dist_checkpointing
  still uses when a checkpoint is loaded (resume, tools.heldout, the HF export)."""
import warnings

warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
