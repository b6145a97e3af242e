"""Qwen2.5-VL models: the paper's by hub id, or a small one whose language model is SmolLM2-135M-Instruct.

The small model is ``Qwen2_5_VLForConditionalGeneration`` built from a config, with SmolLM2's real
weights transplanted into its language model. This is exact, not approximate, because:

* SmolLM2 is a Llama; a Qwen2 decoder block is the same block plus biases on q/k/v, set to zero here;
* multimodal RoPE (``mrope_section``) splits the rotary frequencies into temporal/height/width parts, and
  on text tokens the three position ids are equal, so it is plain RoPE; the sections only have to sum to
  head_dim / 2 (32 for SmolLM2's 64) and ``rope_theta`` stays SmolLM2's;
* the vision special tokens are appended to SmolLM2's tokenizer, so every text token keeps its id and its
  (tied) embedding row.

``tests/test_vlm.py`` checks that the language model's logits on text equal SmolLM2's. The vision tower and
the merger start random and small; ``align.py`` trains them (language model frozen) before fine-tuning.
"""
from __future__ import annotations

import torch

from .config import VisionSettings

# Qwen2.5-VL's vision special tokens, added to a tokenizer that lacks them (in this order)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PAPER_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


def mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the head's head_dim/2 rotary frequencies, in Qwen2.5-VL's 2:3:3 ratio
    ([16, 24, 24] for its head_dim 128; [8, 12, 12] for SmolLM2's 64)."""
    half = head_dim // 2
    t = half * 2 // 8
    h = (half - t) // 2
    return [t, h, half - t - h]


def small_vlm_config(lm_config, vision: VisionSettings, vocab_size: int, token_ids: dict[str, int]):
    """A Qwen2.5-VL config whose text part has ``lm_config``'s (a Llama config's) shapes."""
    from transformers import Qwen2_5_VLConfig

    vision.check()
    head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // lm_config.num_attention_heads
    if head_dim * lm_config.num_attention_heads != lm_config.hidden_size:
        raise ValueError("the language model's head_dim * heads must equal its hidden size (Qwen2 derives it)")
    rope_theta = lm_config.rope_parameters["rope_theta"]
    text = dict(
        vocab_size=vocab_size, hidden_size=lm_config.hidden_size, intermediate_size=lm_config.intermediate_size,
        num_hidden_layers=lm_config.num_hidden_layers, num_attention_heads=lm_config.num_attention_heads,
        num_key_value_heads=lm_config.num_key_value_heads, hidden_act=lm_config.hidden_act,
        max_position_embeddings=lm_config.max_position_embeddings, rms_norm_eps=lm_config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section(head_dim)},
        bos_token_id=lm_config.bos_token_id, eos_token_id=lm_config.eos_token_id, pad_token_id=lm_config.pad_token_id,
        tie_word_embeddings=lm_config.tie_word_embeddings)
    window = vision.patch_size * vision.merge_size * (vision.image_size // (vision.patch_size * vision.merge_size))
    vis = dict(
        depth=vision.depth, hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_heads=vision.num_heads, patch_size=vision.patch_size, spatial_merge_size=vision.merge_size,
        temporal_patch_size=2, out_hidden_size=lm_config.hidden_size, window_size=window,
        fullatt_block_indexes=[vision.depth - 1])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vis, tie_word_embeddings=lm_config.tie_word_embeddings,
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"])


def add_vision_tokens(tokenizer) -> dict[str, int]:
    """Append Qwen2.5-VL's vision tokens to the tokenizer (existing ids unchanged); returns their ids."""
    missing = [t for t in VISION_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}


def language_model(vlm):
    """The text decoder inside a Qwen2.5-VL (embeddings, layers, final norm)."""
    return vlm.model.language_model


@torch.no_grad()
def transplant(vlm, lm) -> dict:
    """Copy a Llama causal LM's weights into ``vlm``'s language model; the q/k/v biases become zero and the
    embedding rows of the appended vision tokens the mean of the text rows. Returns what was copied."""
    source = lm.state_dict()
    target = language_model(vlm)
    own = target.state_dict()
    copied, zeroed = 0, 0
    for name, value in own.items():
        key = f"model.{name}"
        if name == "embed_tokens.weight":
            n = source[key].shape[0]
            value[:n] = source[key]
            value[n:] = source[key].mean(0)  # the new tokens' rows: the mean embedding (transformers' mean_resizing)
            copied += 1
        elif key in source:
            if source[key].shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(source[key].shape)} does not fit {tuple(value.shape)}")
            value.copy_(source[key])
            copied += 1
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            value.zero_()  # Llama has no attention bias: zero keeps the function
            zeroed += 1
        else:
            raise KeyError(f"{name}: no counterpart in the language model being transplanted")
    unused = sorted(k for k in source if k.startswith("model.") and k[len("model."):] not in own)
    if unused:
        raise KeyError(f"weights of the language model left behind: {unused[:5]}")
    target.load_state_dict(own)
    if not vlm.config.tie_word_embeddings:
        vlm.lm_head.weight[: lm.lm_head.weight.shape[0]] = lm.lm_head.weight
    else:
        vlm.tie_weights()
    return {"tensors_copied": copied, "biases_zeroed": zeroed, "text_vocab": source["model.embed_tokens.weight"].shape[0]}


def build_small_vlm(lm_source: str, vision: VisionSettings):
    """``(model, processor)``: a small Qwen2.5-VL, fp32, whose language model is ``lm_source``'s real weights
    (an offline name such as ``smollm2-135m-instruct``) and whose vision tower is random (seeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from ..models import resolve_source
    from .processor import build_processor

    path = resolve_source(lm_source)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_vocab = len(tokenizer)
    token_ids = add_vision_tokens(tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lm.config.model_type != "llama":
        raise ValueError(f"{lm_source}: the transplant takes a Llama language model, not {lm.config.model_type!r}")
    vocab = max(len(tokenizer), lm.config.vocab_size)
    config = small_vlm_config(lm.config, vision, vocab, token_ids)
    torch.manual_seed(vision.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    info = transplant(model, lm)
    info["tokenizer_text_vocab"] = text_vocab
    model.config.efficientllm_transplant = {"language_model": lm_source, **info}
    return model.eval(), build_processor(tokenizer, vision)


def load_pretrained_vlm(source: str = PAPER_MODEL, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                        quantization_config=None):
    """``(model, processor)`` of a released Qwen2.5-VL (hub id or local directory) through transformers'
    ``Qwen2_5_VLForConditionalGeneration`` and its own processor's settings (built without torchvision)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from .processor import load_processor

    kwargs: dict = {"dtype": dtype, "device_map": {"": device}}  # straight onto the device: no copy in host RAM
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, **kwargs)
    return model.eval(), load_processor(source, AutoTokenizer.from_pretrained(source))
