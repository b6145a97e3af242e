"""``EfficientDecoderForCausalLM``: the swappable decoder as a regular HF causal LM.

Layout and parameter names follow Qwen2 (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``...mlp.down_proj``, ``model.norm``,
``lm_head``), so ``generate()``, ``save_pretrained``/``from_pretrained``, peft
and bitsandbytes treat it like any Qwen2 checkpoint. The KV cache is HF's
``DynamicCache``: each attention variant decides what it stores in its layer's
key/value slots (GQA: keys after RoPE and values; MLA: the latent and the
shared RoPE key; NSA: keys before RoPE and values).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from .attention import AttentionContext
from .block import DecoderBlock
from .config import DecoderConfig
from .norm import RMSNorm
from .nsa import NativeSparseAttention
from .position import PositionEncoding, RelativePositionBias


def causal_attention_mask(padding_mask: torch.Tensor | None, query_length: int, past_length: int,
                          relative_bias: RelativePositionBias | None, dtype: torch.dtype, device: torch.device):
    """SDPA arguments for ``query_length`` new tokens after ``past_length`` cached ones.

    Returns ``(mask, is_causal, padded)``. The common cases need no mask: a
    prefill is plain causal, one new token sees the whole cache. Otherwise the
    mask is bool (b or 1, 1, q, k), or -- with a relative bias -- the additive
    bias with -inf on the forbidden keys (b or 1, heads, q, k). A padded query
    still sees itself, so no softmax row is empty.
    """
    padded = padding_mask is not None and not bool(padding_mask.all())
    if not padded and relative_bias is None and (past_length == 0 or query_length == 1):
        return None, past_length == 0, False
    query_pos = torch.arange(past_length, past_length + query_length, device=device)
    key_pos = torch.arange(past_length + query_length, device=device)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # (1, 1, q, k)
    if padded:
        is_self = key_pos[None, :] == query_pos[:, None]
        allowed = (allowed & padding_mask[:, None, None, :].bool()) | is_self  # (b, 1, q, k)
    if relative_bias is None:
        return allowed, False, padded
    bias = relative_bias(query_pos, key_pos).to(dtype)  # (1, heads, q, k)
    return bias.masked_fill(~allowed, float("-inf")), False, padded


@dataclass
class DecoderOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (b, t, hidden), after the final norm
    cache: Cache | None = None
    aux_loss: torch.Tensor | None = None  # mean MoE load-balancing loss over the layers; None for dense FFNs


class EfficientDecoderPreTrainedModel(PreTrainedModel):
    config_class = DecoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderBlock"]
    _supports_sdpa = True  # every attention variant runs on scaled_dot_product_attention

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Embedding ~ N(0, initializer_range), RMSNorm = 1, biases = 0
        if isinstance(module, NativeSparseAttention):
            init.normal_(module.block_position, mean=0.0, std=self.config.initializer_range)


class EfficientDecoderModel(EfficientDecoderPreTrainedModel):
    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position = PositionEncoding(config)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None) -> DecoderOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (b, t, hidden)
        b, t, _ = hidden.shape
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=hidden.device).unsqueeze(0).expand(b, -1)

        position = self.position
        if position.input_embedding is not None:
            hidden = hidden + position.input_embedding(position_ids).to(hidden.dtype)
        mask, is_causal, padded = causal_attention_mask(attention_mask, t, past, position.relative_bias,
                                                        hidden.dtype, hidden.device)
        ctx = AttentionContext(
            rotary=position.rotary,
            query_rope=position.rotary(position_ids) if position.rotary is not None else None,
            mask=mask, is_causal=is_causal, padded=padded, cache=cache,
        )
        aux_losses = []
        for layer in self.layers:
            hidden, aux_loss = layer(hidden, ctx)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        return DecoderOutput(
            last_hidden_state=self.norm(hidden),
            cache=cache,
            aux_loss=torch.stack(aux_losses).mean() if aux_losses else None,
        )


class EfficientDecoderForCausalLM(EfficientDecoderPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.model = EfficientDecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> MoeCausalLMOutputWithPast:
        """Causal LM forward. With ``labels`` (usually ``input_ids``; shifted inside, -100 ignored) the
        loss is the mean next-token cross-entropy plus ``router_aux_loss_coef * aux_loss`` for MoE."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))  # (b, t', vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
            if out.aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * out.aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=out.aux_loss, logits=logits, cache=out.cache)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_modules(model: nn.Module) -> list[str]:
    """The standard LoRA targets that exist in ``model`` (MLA has no k/v_proj, low-rank-query MLA no q_proj)."""
    present = {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return [name for name in LORA_TARGETS if name in present]
