"""The CUDA paths' defects of issue 27, reproduced on a CPU stand-in of the same code (mocks where only CUDA has the
behaviour); tests that need CUDA itself carry the ``gpu`` marker."""
import pytest
import torch

from efficientllm_utils.metrics import inference


def tiny_llama(vocab: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_generation_timing_accepts_a_list_of_eos_ids():
    model = tiny_llama()
    model.generation_config.eos_token_id = [1, 2]  # as Qwen2.5-*-Instruct, Phi-3.5 and Qwen2.5-VL ship it
    model.generation_config.pad_token_id = None
    assert inference.pad_token_id(model) == 1
    with torch.no_grad():
        timings = inference.time_one_request(model, torch.tensor([[3, 4, 5]]), new_tokens=4)
    assert timings["latency_s"] > 0
