"""megatron-core GPTModel ↔ Hugging Face `LlamaForCausalLM`: the one name and shape mapping both
tools.export_hf and tools.import_hf use, and the single-process (TP=PP=1) model they load into.

The launcher's model (megatron_ext.model) is LLaMA's architecture: RMSNorm, SwiGLU, rotary
(non-interleaved, i.e. HF's rotate_half), no biases, untied embeddings. Only two tensors are laid
out differently:

- `linear_qkv` [(nh + 2g)·d, H] is grouped by query group: viewed as [g, (r + 2)·d, H] with r = nh / g,
  each group holds r·d query rows, d key rows, d value rows (HF: separate q/k/v_proj).
- `linear_fc1` [2F, H] is [gate; up] (HF: gate_proj, up_proj).

Everything else is a rename. `transformers` and `safetensors` come from the `eval` extra and are
imported only by `require_hf`, so training never needs them.
"""
import argparse
import json
import os
import socket
from typing import Dict

import torch

import megatron_ext.quiet_imports  # noqa: F401  (before megatron-core)
from megatron_ext.errors import UserError

# the launcher's model flags (argparse dests) that the HF config determines
MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "norm_epsilon", "rotary_base", "max_position_embeddings")
# per layer: megatron-core name → HF name (after the `decoder.layers.i.` / `model.layers.i.` prefixes)
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
QKV, FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"
HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
HF_FC1 = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


def require_hf():
    """(transformers, safetensors.torch), or one line naming the extra to install."""
    try:
        import safetensors.torch
        import transformers
    except ImportError as exc:
        raise UserError(f"Hugging Face interop needs the eval extra ({exc.name} is missing): "
                        "pip install -e '.[eval]'") from None
    return transformers, safetensors.torch


# ---------------------------------------------------------------- configs

def llama_config(model_args, vocab_size: int, eod, dtype: torch.dtype):
    """The `LlamaConfig` of the launcher's model with `model_args` (any object with MODEL_FLAGS)."""
    transformers, _ = require_hf()
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=model_args.hidden_size, intermediate_size=model_args.ffn_hidden_size,
        num_hidden_layers=model_args.num_layers, num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_query_groups,
        head_dim=model_args.hidden_size // model_args.num_attention_heads,
        hidden_act="silu", max_position_embeddings=model_args.max_position_embeddings,
        rms_norm_eps=model_args.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(model_args.rotary_base)},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=eod, eos_token_id=eod, pad_token_id=None, dtype=dtype)


def model_flags_from_llama(config) -> Dict:
    """The launcher's MODEL_FLAGS for an HF Llama config; one line for what the launcher cannot build."""
    if getattr(config, "model_type", None) != "llama":
        raise UserError(f"expected a Llama config (model_type 'llama'), got {getattr(config, 'model_type', None)!r}")
    for flag, bad in (("attention_bias", True), ("mlp_bias", True)):
        if getattr(config, flag, False) == bad:
            raise UserError(f"HF config has {flag}={bad}; the launcher's model has no biases")
    if config.hidden_act != "silu":
        raise UserError(f"HF config has hidden_act={config.hidden_act!r}; the launcher's MLP is SwiGLU (silu)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"HF config has rope scaling {rope!r}; the launcher supports plain rotary only")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise UserError(f"HF config has head_dim {head_dim} × {config.num_attention_heads} heads != hidden "
                        f"{config.hidden_size}; the launcher uses kv_channels = hidden / heads")
    if theta is None or float(theta) != int(theta):
        raise UserError(f"HF config rope_theta {theta!r} is not an integer (--rotary-base takes one)")
    return {"num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "num_query_groups": config.num_key_value_heads or config.num_attention_heads,
            "ffn_hidden_size": config.intermediate_size, "norm_epsilon": float(config.rms_norm_eps),
            "rotary_base": int(theta), "max_position_embeddings": config.max_position_embeddings}


def flags_text(flags: Dict) -> str:
    """MODEL_FLAGS as a launcher command line (`--num-layers 2 --hidden-size 64 ...`)."""
    return " ".join(f"--{name.replace('_', '-')} {flags[name]}" for name in MODEL_FLAGS)


# ---------------------------------------------------------------- weights

def _layer_count(names, prefix: str) -> int:
    return len({n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)})


def megatron_to_hf(state: Dict[str, torch.Tensor], flags) -> Dict[str, torch.Tensor]:
    """A TP=PP=1 GPTModel state dict (no `_extra_state`) → LlamaForCausalLM tensors."""
    nh, g = flags.num_attention_heads, flags.num_query_groups
    d, hidden = flags.hidden_size // nh, flags.hidden_size
    r = nh // g
    out = {hf: state[mc] for mc, hf in GLOBAL_RENAMES.items()}
    for i in range(flags.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for mc, hf in LAYER_RENAMES.items():
            out[dst + hf] = state[src + mc]
        qkv = state[src + QKV].view(g, (r + 2) * d, hidden)
        q, k, v = qkv.split([r * d, d, d], dim=1)
        for name, part in zip(HF_QKV, (q, k, v)):
            out[dst + name] = part.reshape(-1, hidden)
        gate, up = state[src + FC1].chunk(2, dim=0)
        out[dst + HF_FC1[0]], out[dst + HF_FC1[1]] = gate, up
    return {name: t.contiguous() for name, t in out.items()}


def hf_to_megatron(hf: Dict[str, torch.Tensor], flags) -> Dict[str, torch.Tensor]:
    """LlamaForCausalLM tensors → a TP=PP=1 GPTModel state dict (a tied model gets lm_head = embeddings)."""
    nh, g = flags.num_attention_heads, flags.num_query_groups
    d, hidden = flags.hidden_size // nh, flags.hidden_size
    if "lm_head.weight" not in hf:
        hf = dict(hf, **{"lm_head.weight": hf["model.embed_tokens.weight"]})
    out = {mc: hf[name] for mc, name in GLOBAL_RENAMES.items()}
    for i in range(flags.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for mc, name in LAYER_RENAMES.items():
            out[dst + mc] = hf[src + name]
        q, k, v = (hf[src + name] for name in HF_QKV)
        out[dst + QKV] = torch.cat([q.reshape(g, -1, hidden), k.reshape(g, d, hidden), v.reshape(g, d, hidden)],
                                   dim=1).reshape(-1, hidden)
        out[dst + FC1] = torch.cat([hf[src + HF_FC1[0]], hf[src + HF_FC1[1]]], dim=0)
    return {name: t.contiguous().clone() for name, t in out.items()}


def weights_only(state: Dict) -> Dict[str, torch.Tensor]:
    """A GPTModel state dict without its `_extra_state` entries."""
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


# ---------------------------------------------------------------- the TP=PP=1 megatron-core model

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process() -> None:
    """torch.distributed (gloo, world 1) and parallel_state at TP=PP=1 on the CPU, as the launcher's
    CPU set-up: conversions run on the CPU whatever the machine has."""
    from megatron.core import parallel_state

    from megatron_ext import cpu_compat

    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initializes: conversions build on the CPU
    if torch.cuda.is_available():
        raise UserError("CUDA was initialized before the conversion; run it with CUDA_VISIBLE_DEVICES=")
    cpu_compat.enable()
    if not torch.distributed.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        torch.distributed.init_process_group("gloo", world_size=1, rank=0)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    cpu_compat.model_parallel_cpu_manual_seed(0)


def single_process_model(args: argparse.Namespace, vocab_size: int):
    """The launcher's GPTModel with `args` rebuilt at TP=PP=1 (call init_single_process first)."""
    from megatron_ext.model import build_model, layer_spec_kind, transformer_config

    args = argparse.Namespace(**vars(args))
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    return build_model(args, transformer_config(args), vocab_size, layer_spec_kind())


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] tokens → [b, s, vocab] fp32 logits of a TP=PP=1 GPTModel (causal, no mask needed)."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()


# ---------------------------------------------------------------- tokenizers

TOKENIZER_PROBE = "The cat sat.\n\n  def f(x):\n\treturn x  # é, 中文, 42\n  "


def export_tokenizer(saved, folder: str, eod: int) -> Dict:
    """Write the HF tokenizer of the launcher's `--tokenizer-type` into `folder`; returns its record.

    SentencePiece: a `tokenizers` tokenizer.json from transformers' Llama converter with the
    SentencePiece normalization made exact (always prepend the dummy "▁" as SentencePiece does, no
    Metaspace pre-tokenizer, no BOS added), plus the original tokenizer.model. GPT-2 BPE: the two files
    as vocab.json / merges.txt. NullTokenizer: none (ids are the text).
    """
    import shutil

    transformers, _ = require_hf()
    kind, before = saved.tokenizer_type, set(os.listdir(folder))
    if kind == "NullTokenizer":
        return {"type": kind, "files": [], "note": "NullTokenizer has no text form: feed token ids "
                f"(0..{saved.vocab_size - 1}, EOD {eod}) directly; lm-eval needs a text tokenizer"}
    if kind == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", saved.vocab_file), ("--merge-file", saved.merge_file)):
            if not path or not os.path.isfile(path):
                raise UserError(f"the checkpoint's {flag} {path} is not readable from here (run from the "
                                "training directory)")
        shutil.copyfile(saved.vocab_file, os.path.join(folder, "vocab.json"))
        shutil.copyfile(saved.merge_file, os.path.join(folder, "merges.txt"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                       "model_max_length": saved.max_position_embeddings}, f)
        transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
        return {"type": kind, "files": sorted(set(os.listdir(folder)) - before)}
    model = saved.tokenizer_model
    if not model or not os.path.isfile(model):
        raise UserError(f"the checkpoint's --tokenizer-model {model} is not readable from here "
                        "(run from the training directory)")
    from tokenizers import normalizers

    shutil.copyfile(model, os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "LlamaTokenizer", "add_bos_token": false, "add_eos_token": false}')
    backend = transformers.AutoTokenizer.from_pretrained(folder).backend_tokenizer
    if _sentencepiece_adds_dummy_prefix(model):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = None
    backend.post_processor = None
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    # documents start after an EOD in training (no BOS): lm-eval's rolling windows start with bos_token
    special = {"bos_token": sp.id_to_piece(eod), "eos_token": sp.id_to_piece(eod)}
    if sp.unk_id() >= 0:
        special["unk_token"] = sp.id_to_piece(sp.unk_id())
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                               model_max_length=saved.max_position_embeddings, **special)
    tok.save_pretrained(folder)
    return {"type": kind, "files": sorted(set(os.listdir(folder)) - before)}


def _sentencepiece_adds_dummy_prefix(model: str) -> bool:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    pieces = sp.encode("a", out_type=str)
    return bool(pieces) and pieces[0].startswith("▁")


def launcher_tokenizer_flags(hf_dir: str) -> str:
    """The launcher's tokenizer flags for the tokenizer files in an HF folder ('' when none fits)."""
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        return f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {os.path.join(hf_dir, 'tokenizer.model')}"
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return f"--tokenizer-type GPT2BPETokenizer --vocab-file {vocab} --merge-file {merges}"
    return ""
