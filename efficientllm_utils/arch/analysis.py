"""Analytical cost of a ``DecoderConfig``: KV-cache bytes, parameters, forward FLOPs.

These are the quantities the paper's architecture axis trades against each
other; ``measured_kv_cache_bytes`` checks the cache formula against what a
real forward leaves in the cache.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .config import DecoderConfig
from .ffn import SparseMoE
from .model import EfficientDecoderForCausalLM
from .nsa import NativeSparseAttention


def kv_cache_bytes_per_token(config: DecoderConfig, dtype_bytes: int = 2) -> int:
    """Bytes the KV cache grows by per token of context, over all layers.

    * mha / gqa / mqa: keys and values, ``2 * n_layers * n_kv_heads * head_dim``.
    * mla: the latent and the shared RoPE key, ``n_layers * (kv_lora_rank + qk_rope_head_dim)``.
    * nsa: the GQA keys and values only, ``2 * n_layers * n_kv_heads * head_dim``; the
      compressed keys/values are recomputed from them at each step, not cached (caching
      them would add ``2 * n_kv_heads * head_dim / compress_stride`` per token and layer).
    """
    if config.attention == "mla":
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_layer = 2 * config.n_kv_heads * config.head_dim
    return config.n_layers * per_layer * dtype_bytes


def measured_kv_cache_bytes(cache: Cache) -> int:
    """Bytes held by the key/value tensors of every layer of an HF cache."""
    return sum(tensor.numel() * tensor.element_size()
               for layer in cache.layers for tensor in (layer.keys, layer.values) if tensor is not None)


@torch.no_grad()
def measure_kv_cache_bytes_per_token(model: EfficientDecoderForCausalLM, input_ids: torch.Tensor) -> float:
    """Run one cached forward over ``input_ids`` (b, t) and return cache bytes / (b * t)."""
    out = model(input_ids=input_ids, use_cache=True)
    return measured_kv_cache_bytes(out.cache) / input_ids.numel()


def _meta_model(config: DecoderConfig) -> EfficientDecoderForCausalLM:
    with torch.device("meta"):  # shapes only, no memory
        return EfficientDecoderForCausalLM(config)


def inactive_expert_params(model: nn.Module) -> int:
    """Parameters of the experts a token does not visit (all but each MoE layer's top_k)."""
    inactive = 0
    for module in model.modules():
        if isinstance(module, SparseMoE):
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            inactive += (len(module.experts) - module.top_k) * per_expert
    return inactive


def param_counts(model_or_config: nn.Module | DecoderConfig) -> dict[str, int]:
    """``total`` parameters (tied weights once), ``active`` per token (MoE: top-k + shared experts
    only) and ``embedding`` (the token embedding matrix, counted in both)."""
    if isinstance(model_or_config, DecoderConfig):
        model, config = _meta_model(model_or_config), model_or_config
    else:
        model, config = model_or_config, model_or_config.config
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    inactive = inactive_expert_params(model)
    return {"total": total, "active": total - inactive,
            "embedding": model.get_input_embeddings().weight.numel()}


def _compressed_blocks(config: DecoderConfig, context_len: float) -> float:
    if context_len < config.compress_block:
        return 0
    return (context_len - config.compress_block) // config.compress_stride + 1


def flops_per_token(config: DecoderConfig, context_len: int) -> float:
    """Analytical forward FLOPs for one token that attends to ``context_len`` keys.

    Counted (a multiply-add = 2 FLOPs):

    * matmuls: ``2 * weights`` of every linear layer a token passes through --
      q/k/v/o (or MLA's down/up projections), FFN or router + top-k and shared
      experts, NSA gates, and ``lm_head``. The embedding lookup is free.
    * attention: ``2 * heads * (qk_dim + v_dim) * keys`` for the scores and the
      weighted sum. Keys are ``context_len`` for dense attention and MLA; NSA sums
      its branches: ``n_c`` compressed blocks, ``min(n_selected * select_block,
      context_len)`` selected and ``min(window, context_len)`` windowed tokens.
    * NSA compression: each compressed key and value is one ``compress_block *
      head_dim -> head_dim`` map per KV head, made once per ``compress_stride``
      tokens, so ``2 * 2 * n_kv_heads * compress_block * head_dim**2 /
      compress_stride`` per token.

    Not counted: norms, activations, softmax, RoPE, biases, the MoE
    load-balancing loss, and MLA's re-expansion of cached latents at each
    decoding step (keys/values of a token are counted once, when it is made).
    Pass ``context_len = (S + 1) / 2`` for the average token of a causal
    prefill of ``S`` tokens.
    """
    model = _meta_model(config)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    compressors = [m for m in model.modules() if isinstance(m, NativeSparseAttention)]
    per_token_weights = (linear_weights - inactive_expert_params(model)
                         - sum(m.compress_key.weight.numel() + m.compress_value.weight.numel() for m in compressors))
    flops = 2.0 * per_token_weights

    return flops + config.n_layers * attention_flops_per_token(config, context_len)


def attention_flops_per_token(config: DecoderConfig, context_len: float, window_keys: float | None = None) -> float:
    """One layer's attention FLOPs for one query over ``context_len`` keys (scores, weighted sum, and NSA's
    compression), as counted by ``flops_per_token``. ``window_keys``: keys in NSA's window branch
    (default ``min(window, context_len)``, the causal window; a centred one holds ``2 * (window // 2) + 1``)."""
    heads = config.n_heads
    if config.attention == "mla":
        return 2 * heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * context_len
    if config.attention == "nsa":
        window = min(config.window, context_len) if window_keys is None else min(window_keys, context_len)
        keys = (_compressed_blocks(config, context_len)
                + min(config.n_selected * config.select_block, context_len) + window)
        return (2 * heads * 2 * config.head_dim * keys
                + 2 * 2 * config.n_kv_heads * config.compress_block * config.head_dim ** 2 / config.compress_stride)
    return 2 * heads * 2 * config.head_dim * context_len
