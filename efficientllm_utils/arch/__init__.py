"""The architecture axis: a Qwen2.5-style decoder with swappable attention, position encoding and FFN.

Importing this package registers ``model_type="efficient_decoder"`` with
``AutoConfig``/``AutoModelForCausalLM``, so saved checkpoints load with the
Auto classes.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .config import ATTENTION_KINDS, FFN_KINDS, PAPER_SHAPES, POSITION_KINDS, DecoderConfig, paper_config
from .model import EfficientDecoderForCausalLM, EfficientDecoderModel, lora_target_modules

AutoConfig.register(DecoderConfig.model_type, DecoderConfig, exist_ok=True)
AutoModelForCausalLM.register(DecoderConfig, EfficientDecoderForCausalLM, exist_ok=True)

__all__ = [
    "ATTENTION_KINDS", "FFN_KINDS", "PAPER_SHAPES", "POSITION_KINDS",
    "DecoderConfig", "EfficientDecoderForCausalLM", "EfficientDecoderModel", "lora_target_modules", "paper_config",
]
