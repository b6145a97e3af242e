"""Analytical FLOPs and counted bytes of a ``transformers`` causal LM (a Llama/Qwen-style decoder), for its roofline.

Our own decoder has its costs in ``arch.analysis`` (``flops_per_token``, ``kv_cache_bytes_per_token``); these are
the same counts for any ``transformers`` model with standard attention, read from its modules and config:

* FLOPs per token (a multiply-add = 2 FLOPs): ``2 * in * out`` of every linear layer, the head included (counted
  from ``in_features x out_features``, so a bitsandbytes layer counts the product it computes, not its packed
  storage), plus attention's scores and weighted sum, ``4 * n_layers * n_heads * head_dim * context``. Not
  counted: norms, activations, softmax, RoPE, biases.
* a training step's FLOPs per token: the forward, the input gradients of the part of the model above its lowest
  trainable weight (``backward_share`` x the forward: all of it for LoRA or full fine-tuning, the top layers for
  Freeze) and the weight gradients of the trainable parameters (2 x their count).
* a prefill's FLOPs: every prompt token through the body, but the head only at each sequence's last position where
  ``generate`` asks the model for ``logits_to_keep=1`` (transformers does for every model whose ``forward`` takes
  it, ours included): counting the head for all prompt tokens overstated SmolLM2's 64-token prefill by a quarter.
* bytes a decode step must read: the weights once (counted bytes, ``precisions.counting.count_model_bytes``, less the input
  embedding matrix unless the head shares it: a lookup reads one row) plus each sequence's KV cache at its context.
* KV-cache bytes per token: ``2 * n_layers * n_kv_heads * head_dim * dtype bytes`` (keys and values of every layer).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn


def _attention_dims(config) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head dim) of a standard decoder config (a vision-language one's decoder)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, kv_heads, head_dim


def linear_flops_per_token(model: nn.Module) -> int:
    """2 x the weights of every linear layer a token passes through (the head included; tied weights used twice)."""
    return 2 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module, context: float) -> float:
    """Forward FLOPs of one token attending to ``context`` keys. For a causal prefill of ``S`` tokens the average
    token attends to ``(S + 1) / 2`` keys."""
    layers, heads, _, head_dim = _attention_dims(model.config)
    return linear_flops_per_token(model) + 4.0 * layers * heads * head_dim * context


def backward_share(model: nn.Module) -> float:
    """The share of the linear layers' FLOPs that the backward pass must send input gradients through: those
    registered from the first module holding a trainable parameter on (a decoder registers its modules in forward
    order; nothing below the lowest trainable weight needs a gradient). 1 when the lowest layer trains (LoRA on
    every layer, full), less for Freeze; 0 when nothing trains."""
    weights, first = [], None
    for module in model.modules():
        if first is None and any(t.requires_grad for t in module.parameters(recurse=False)):
            first = len(weights)
        if isinstance(module, nn.Linear):
            weights.append(module.in_features * module.out_features)
    if first is None or not weights:
        return 0.0
    return sum(weights[first:]) / sum(weights)


def head_flops_per_token(model: nn.Module) -> int:
    """2 x the output head's weights (``in x out`` of ``get_output_embeddings()``; 0 for a model without one)."""
    head = model.get_output_embeddings()
    return 2 * head.in_features * head.out_features if isinstance(head, nn.Linear) else 0


def prefill_flops(model: nn.Module, per_token_flops: float, tokens: int, sequences: int) -> float:
    """Forward FLOPs of a prefill of ``tokens`` prompt tokens in ``sequences`` sequences, from the model's FLOPs per
    token at the prompt's average causal context (head included): the head runs at the last position of each
    sequence only when ``generate`` passes ``logits_to_keep=1``, i.e. when the model's ``forward`` accepts it."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return tokens * per_token_flops
    head = head_flops_per_token(model)
    return tokens * (per_token_flops - head) + sequences * head


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes the KV cache of one sequence grows by per token, over all layers."""
    layers, _, kv_heads, head_dim = _attention_dims(config)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def weight_bytes_read_per_token(model: nn.Module, counted_total_bytes: int) -> int:
    """Weight bytes one forward step reads: all counted bytes but an untied input embedding (one row is read)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    return counted_total_bytes - (0 if tied else embedding.numel() * embedding.element_size())


@torch.no_grad()
def measured_kv_bytes_per_token(model: nn.Module, input_ids: torch.Tensor) -> float:
    """The KV cache a real prefill of ``input_ids`` (b, t) leaves, per token (the formula's check, and the bytes a
    quantised model's cache really holds in its compute dtype)."""
    from ..arch.attention_free import cache_bytes, returned_cache

    return cache_bytes(returned_cache(model(input_ids=input_ids, use_cache=True))) / input_ids.numel()
