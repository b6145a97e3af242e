"""The transformers reference implementations our modules are checked against, and the weight mapping.

Used by the equivalence tests and by ``benchmarks/arch_vs_hf.py``:

* GQA/MHA/MQA model <-> ``Qwen2ForCausalLM`` (identical parameter names);
* MLA <-> ``DeepseekV3Attention`` (``rope_interleave=False``: our RoPE is Qwen's rotate-half layout);
* MoE <-> ``Qwen2MoeSparseMoeBlock`` with a shared expert, ``MixtralSparseMoeBlock`` without one.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DeepseekV3Config, MixtralConfig, Qwen2Config, Qwen2MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from .config import DecoderConfig


def _rope(config: DecoderConfig) -> dict:
    return {"rope_type": "default", "rope_theta": config.rope_theta}


def qwen2_config(config: DecoderConfig, **kwargs) -> Qwen2Config:
    """Qwen2's config for an mha/gqa/mqa ``config`` (Qwen2 always has q/k/v biases)."""
    if config.attention not in ("mha", "gqa", "mqa") or not config.qkv_bias:
        raise ValueError("Qwen2 covers attention in ['mha', 'gqa', 'mqa'] with qkv_bias=True only")
    return Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_parameters=_rope(config),
        tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=config.max_position_embeddings,
        **kwargs)


def deepseek_v3_attention(config: DecoderConfig, **kwargs) -> DeepseekV3Attention:
    """DeepSeek-V3's MLA layer with ``config``'s dims (its latent norms use eps 1e-6 whatever the config)."""
    reference_config = DeepseekV3Config(
        hidden_size=config.hidden_size, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim, attention_bias=False,
        rope_interleave=False, rope_parameters=_rope(config), rms_norm_eps=config.rms_norm_eps, **kwargs)
    return DeepseekV3Attention(reference_config, layer_idx=0)


_MLA_RENAMES = {"kv_a_proj_with_mqa": "kv_a_proj", "kv_a_layernorm": "kv_a_norm", "q_a_layernorm": "q_a_norm"}


def mla_state_dict(reference: DeepseekV3Attention) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 attention weights under our ``MultiHeadLatentAttention`` names."""
    state = {}
    for name, tensor in reference.state_dict().items():
        module, _, leaf = name.rpartition(".")
        state[f"{_MLA_RENAMES.get(module, module)}.{leaf}"] = tensor
    return state


def moe_block(config: DecoderConfig, **kwargs) -> nn.Module:
    """Qwen2-MoE's block (sigmoid-gated shared expert) or, without a shared expert, Mixtral's."""
    if config.n_shared_experts:
        return Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            hidden_size=config.hidden_size, num_experts=config.n_experts, num_experts_per_tok=config.moe_top_k,
            moe_intermediate_size=config.moe_intermediate_size,
            shared_expert_intermediate_size=config.moe_intermediate_size, norm_topk_prob=True, **kwargs))
    return MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=config.hidden_size, num_local_experts=config.n_experts, num_experts_per_tok=config.moe_top_k,
        intermediate_size=config.moe_intermediate_size, **kwargs))


def moe_state_dict(reference: nn.Module) -> dict[str, torch.Tensor]:
    """HF MoE block weights under our ``SparseMoE`` names: HF stacks the experts in 3-D tensors
    (gate and up projections concatenated), ours are separate SwiGLU modules."""
    state = {"router.weight": reference.gate.weight}
    gate, up = reference.experts.gate_up_proj.chunk(2, dim=1)  # (E, I, hidden) each
    for e in range(gate.shape[0]):
        state[f"experts.{e}.gate_proj.weight"] = gate[e]
        state[f"experts.{e}.up_proj.weight"] = up[e]
        state[f"experts.{e}.down_proj.weight"] = reference.experts.down_proj[e]
    if isinstance(reference, Qwen2MoeSparseMoeBlock):
        state.update({f"shared_expert.{k}": v for k, v in reference.shared_expert.state_dict().items()})
        state["shared_expert_gate.weight"] = reference.shared_expert_gate.weight
    return {name: tensor.detach() for name, tensor in state.items()}
