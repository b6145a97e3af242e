"""Analytical cost of a ``DiTConfig``: parameters (total, active per token) and FLOPs per training step.

FLOPs count every matrix multiply a patch token passes through (2 FLOPs per
multiply-add; the patch embedding is a linear map of each patch), the
attention scores and weighted sums over all ``n_tokens`` keys (non-causal; NSA:
its compressed, selected and centred-window keys, as ``arch.analysis`` counts
them), and the per-image conditioning and modulation layers. A training step
is counted as 3 forwards (the backward pass costs about twice the forward).
Not counted: norms, activations, softmax, the sampler's arithmetic.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch.analysis import attention_flops_per_token, inactive_expert_params
from ..arch.nsa import NativeSparseAttention
from .config import DiTConfig
from .model import DiT

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (about 2x forward)


def _meta_model(config: DiTConfig) -> DiT:
    with torch.device("meta"):  # shapes only, no memory
        return DiT(config)


def dit_costs(config: DiTConfig, batch_size: int = 1) -> dict[str, float]:
    """``params_total``, ``params_active`` (MoE: top-k experts only), ``flops_per_image`` (one forward) and
    ``flops_per_step`` (training, ``batch_size`` images)."""
    model = _meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = inactive_expert_params(model)
    # weights applied once per image (timestep/label embedders, adaLN modulations) vs once per token
    per_image = {id(m) for block in model.blocks for m in [block.modulation]}
    per_image |= {id(model.final.modulation), id(model.t_embedder.linear_1), id(model.t_embedder.linear_2)}
    compressors = {id(m.compress_key) for m in model.modules() if isinstance(m, NativeSparseAttention)}
    compressors |= {id(m.compress_value) for m in model.modules() if isinstance(m, NativeSparseAttention)}
    token_weights = image_weights = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module) not in compressors:
            if id(module) in per_image:
                image_weights += module.weight.numel()
            else:
                token_weights += module.weight.numel()
    token_weights += model.patch_embed.proj.weight.numel() - inactive
    decoder = config.decoder_config()
    window = 2 * (decoder.window // 2) + 1  # the centred window
    attention = config.n_layers * attention_flops_per_token(decoder, config.n_tokens, window_keys=window)
    per_image_flops = config.n_tokens * (2.0 * token_weights + attention) + 2.0 * image_weights
    return {"params_total": total, "params_active": total - inactive, "flops_per_image": per_image_flops,
            "flops_per_step": TRAIN_FLOPS_PER_FORWARD * batch_size * per_image_flops}
