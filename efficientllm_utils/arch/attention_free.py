"""Attention-free language models from ``transformers`` (Mamba, RWKV-4, Pythia/GPT-NeoX): configs, recurrent state.

The paper's Table 6 pretrains Mamba, RWKV-7 and Pythia against its Qwen2.5-style transformer. Nothing here
re-implements them: each is ``transformers``' model class built from a config with the paper's shape (``size``) or
a scaled-down one, with tied input and output embeddings like our Qwen2.5-style baseline (so that matched parameter
counts hold the same embedding and differ in the blocks). RWKV is transformers' ``RwkvForCausalLM``, RWKV-4: the
RWKV-7 implementations that train (flash-linear-attention, rwkv-fla) need Triton on a GPU, and the one pure-PyTorch
RWKV-7 on PyPI (rwkv7-hf 0.9.0) took 24-87 s per training step of the cpu profile here (a per-sample, per-token
Python loop), so RWKV-7 does not fit a CPU profile. Mamba runs transformers' plain-torch path (no CUDA kernels).

What each model keeps per sequence while decoding (batch 1, ``context`` tokens):

* transformer (ours): keys and values of every token, ``arch.analysis.kv_cache_bytes_per_token * context``;
* Pythia: keys and values of every token, ``2 * n_layers * hidden_size * dtype_bytes * context``;
* Mamba: per layer a convolution window (d_inner, conv_kernel) in the model's dtype and an SSM state
  (d_inner, state_size) in float32 (transformers' torch path discretises in float32), whatever the context:
  ``n_layers * d_inner * (conv_kernel * dtype_bytes + state_size * 4)``;
* RWKV-4: per layer two token-shift vectors (hidden) in the model's dtype and three WKV accumulators (hidden) in
  float32: ``n_layers * hidden_size * (2 * dtype_bytes + 3 * 4)``.

``measure_state_bytes`` reads the same quantity from the cache object a real prefill returns.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig, MambaForCausalLM, PretrainedConfig,
                          PreTrainedModel, RwkvConfig, RwkvForCausalLM)
from transformers.cache_utils import Cache

ARCHITECTURES = ("transformer", "mamba", "rwkv", "pythia")
ATTENTION_FREE = ("mamba", "rwkv")  # what keeps a fixed-size state instead of a growing KV cache

# The paper's Table 6 shapes per size group (d_model, layers; Pythia's heads as in its 410M/1.4B/2.8B models). RWKV
# takes the paper's RWKV-7 shapes, run as RWKV-4.
PAPER_SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "mamba": {"0.5B": dict(hidden_size=768, n_layers=24), "1.5B": dict(hidden_size=1536, n_layers=48),
              "3B": dict(hidden_size=2560, n_layers=64)},
    "pythia": {"0.5B": dict(hidden_size=1024, n_layers=24, n_heads=16),
               "1.5B": dict(hidden_size=2048, n_layers=32, n_heads=16),
               "3B": dict(hidden_size=2560, n_layers=32, n_heads=32)},
    "rwkv": {"0.5B": dict(hidden_size=1024, n_layers=24), "1.5B": dict(hidden_size=2048, n_layers=32),
             "3B": dict(hidden_size=2560, n_layers=40)},
}
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {"mamba": MambaForCausalLM, "rwkv": RwkvForCausalLM,
                                                   "pythia": GPTNeoXForCausalLM}
KINDS = {"mamba": "mamba", "rwkv": "rwkv", "gpt_neox": "pythia"}  # transformers' model_type -> our name
PYTHIA_ROTARY_PCT = 0.25  # Pythia rotates a quarter of each head's dimensions


def hf_config(architecture: str, *, vocab_size: int, hidden_size: int, n_layers: int, max_context: int,
              n_heads: int | None = None, intermediate_size: int | None = None, state_size: int = 16,
              conv_kernel: int = 4, expand: int = 2, use_mambapy: bool = False) -> PretrainedConfig:
    """The ``transformers`` config of an attention-free model (or Pythia); ``intermediate_size`` None: 4 x hidden."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layers,
                  tie_word_embeddings=True, use_cache=True)
    if architecture == "mamba":
        return MambaConfig(state_size=state_size, conv_kernel=conv_kernel, expand=expand, use_mambapy=use_mambapy,
                           **common)
    if architecture == "rwkv":
        if n_layers < 2:  # its initialisation spreads the time-mixing ratios over layer_id / (n_layers - 1)
            raise ValueError(f"rwkv needs n_layers >= 2, got {n_layers}")
        return RwkvConfig(context_length=max_context, attention_hidden_size=hidden_size,
                          intermediate_size=intermediate_size or 4 * hidden_size, **common)
    if architecture == "pythia":
        if n_heads is None or hidden_size % n_heads:
            raise ValueError(f"pythia needs n_heads dividing hidden_size={hidden_size}, got n_heads={n_heads}")
        return GPTNeoXConfig(num_attention_heads=n_heads, intermediate_size=intermediate_size or 4 * hidden_size,
                             rotary_pct=PYTHIA_ROTARY_PCT, max_position_embeddings=max_context,
                             use_parallel_residual=True, **common)
    raise ValueError(f"architecture {architecture!r} is not one of {list(MODEL_CLASSES)}")


def build(config: PretrainedConfig, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
          eos_token_id: int | None = None) -> PreTrainedModel:
    """A seeded model of ``config``'s kind; ``eos_token_id`` also pads and starts (as for our decoder)."""
    kind = KINDS[config.model_type]
    if eos_token_id is not None:
        config.eos_token_id = config.pad_token_id = config.bos_token_id = eos_token_id
    torch.manual_seed(seed)
    model = MODEL_CLASSES[kind](config).to(device=device, dtype=dtype)
    if eos_token_id is not None:
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_token_id
    return model


def meta_param_count(config: PretrainedConfig) -> int:
    """Parameters of ``config``'s model (tied weights once), counted on the meta device: no memory, no init."""
    with torch.device("meta"):
        return sum(t.numel() for t in MODEL_CLASSES[KINDS[config.model_type]](config).parameters())


def state_bytes(config: PretrainedConfig, context: int, dtype_bytes: int) -> int:
    """Analytical bytes an attention-free model (or Pythia) keeps for one sequence after ``context`` tokens."""
    if config.model_type == "mamba":
        return config.num_hidden_layers * config.intermediate_size * (config.conv_kernel * dtype_bytes
                                                                      + config.state_size * 4)
    if config.model_type == "rwkv":
        return config.num_hidden_layers * config.hidden_size * (2 * dtype_bytes + 3 * 4)
    if config.model_type == "gpt_neox":
        return 2 * config.num_hidden_layers * config.hidden_size * dtype_bytes * context
    raise ValueError(f"no state formula for model_type {config.model_type!r}")


def _tensors(obj) -> Iterable[torch.Tensor]:
    """Every tensor a cache object holds: an HF ``Cache``'s layers (keys/values, or conv/recurrent states), or
    RWKV's list of state tensors."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Cache):
        for layer in obj.layers:
            yield from _tensors(vars(layer))
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def cache_bytes(cache) -> int:
    """Bytes held by the tensors of a model's cache object (a tensor shared by several entries counted once)."""
    seen, total = set(), 0
    for tensor in _tensors(cache):
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def returned_cache(output):
    """The cache a forward with ``use_cache=True`` returned: ours and Mamba's ``cache``, GPT-NeoX's
    ``past_key_values``, RWKV's ``state``."""
    for name in ("cache", "past_key_values", "state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(output).__name__} holds no cache (cache, past_key_values or state)")


@torch.no_grad()
def measure_state_bytes(model: PreTrainedModel, input_ids: torch.Tensor) -> int:
    """Run one cached forward over ``input_ids`` (1, context) and return the bytes its cache holds."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"one sequence at a time: input_ids has batch {input_ids.shape[0]}")
    return cache_bytes(returned_cache(model(input_ids=input_ids, use_cache=True)))
