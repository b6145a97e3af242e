"""Feed-forward layers: dense SwiGLU and a top-k routed mixture of SwiGLU experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer, 2020), the Qwen2.5 FFN. Also one MoE expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> (..., hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Mixture of ``n_experts`` SwiGLU experts, ``moe_top_k`` of them per token.

    Routing as in Mixtral: softmax over the router logits, keep the top-k
    probabilities and renormalise them to sum to one. With
    ``n_shared_experts=1`` an always-on expert is added, scaled by a per-token
    sigmoid gate as in Qwen2-MoE. Tokens are dispatched by sorting their
    (token, expert) assignments by expert, so each expert runs once on one
    contiguous slice; results are scattered back with ``index_add_``.

    Experts are separate ``nn.Linear`` modules (not one 3-D tensor) so that
    LoRA and bitsandbytes find ``gate_proj``/``up_proj``/``down_proj`` in them.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.top_k = config.moe_top_k
        self.router = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_experts))
        self.has_shared_expert = config.n_shared_experts == 1
        if self.has_shared_expert:
            self.shared_expert = SwiGLU(config.hidden_size, config.moe_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, t, hidden) -> output (b, t, hidden), router logits (b * t, n_experts)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, hidden)
        logits = self.router(x)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)

        flat_experts = expert_ids.flatten()  # (N * k,) assignment a belongs to token a // k
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k  # (N * k,) source token of each assignment, grouped by expert
        counts = torch.bincount(flat_experts, minlength=len(self.experts)).tolist()
        routed = x[token_of].split(counts)
        outputs = [expert(chunk) for expert, chunk in zip(self.experts, routed, strict=True) if len(chunk)]
        contributions = torch.cat(outputs) * weights.flatten()[order, None]  # (N * k, hidden)
        out = torch.zeros_like(x).index_add_(0, token_of, contributions)
        if self.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape), logits


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e`` for one MoE layer.

    ``f_e``: fraction of tokens with expert ``e`` among their top-k picks (sums
    to k); ``P_e``: mean router probability of ``e``. Minimal (= k) when the
    load is uniform. ``router_logits``: (N, n_experts).
    """
    n_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    picked = F.one_hot(probs.topk(top_k, dim=-1).indices, n_experts).sum(1).float()  # (N, E)
    return n_experts * (picked.mean(0) * probs.mean(0)).sum()


def build_ffn(config: DecoderConfig) -> nn.Module:
    if config.ffn == "moe":
        return SparseMoE(config)
    return SwiGLU(config.hidden_size, config.intermediate_size)
