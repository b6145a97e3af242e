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


# --- 2: vision generation's device and dtype paths (bf16 on the CPU stands in for a bf16 GPU pipeline) ----------

def tiny_sd3_pipeline(dtype=torch.float32):
    from efficientllm_utils.lvm import sd3
    from efficientllm_utils.lvm.presets import PRESETS

    shape = PRESETS["sd3-tiny"].shape
    comps = sd3.build_components(shape, ["a cat", "a truck"], seed=0)
    text = {k: v for k, v in comps.items() if k not in ("transformer", "vae")}
    return sd3.make_pipeline(comps["transformer"], comps["vae"], text).to(dtype=dtype), shape


def test_latents_are_encoded_in_the_vaes_dtype_and_kept_as_fp32_on_the_cpu():
    from efficientllm_utils.lvm import sd3

    pipe, shape = tiny_sd3_pipeline(torch.bfloat16)
    pixels = torch.rand(3, 3, shape.image_size, shape.image_size) * 2 - 1  # fp32, as the data loaders give them
    latents = sd3.to_latents(pipe.vae, pixels, batch_size=2)
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"
    latents.numpy()  # the fine-tuning study hashes them


def test_flow_loss_runs_where_the_transformer_is():
    """A transformer on another device than the CPU-made noise and latents (the meta device stands in for CUDA)."""
    from efficientllm_utils.lvm import sd3
    from efficientllm_utils.lvm.flow import velocity_loss
    from efficientllm_utils.lvm.presets import PRESETS

    shape = PRESETS["sd3-tiny"].shape
    transformer = sd3.build_transformer(shape, seed=0).to("meta")
    latents = torch.randn(2, shape.latent_channels, shape.latent_size, shape.latent_size)
    cond = {"encoder_hidden_states": torch.randn(2, 2 * shape.max_tokens, shape.t5_dim),
            "pooled_projections": torch.randn(2, 2 * shape.text_dim)}
    loss = velocity_loss(transformer, sd3.denoise, latents, cond, torch.Generator().manual_seed(0))
    assert loss.device.type == "meta"


def test_full_finetuning_upcast_samples_inside_a_bf16_pipeline():
    from types import SimpleNamespace

    from efficientllm_utils.lvm import sd3
    from efficientllm_utils.params import LVMFinetuneRun
    from efficientllm_utils.studies import lvm_finetune

    pipe, _ = tiny_sd3_pipeline(torch.bfloat16)
    p = LVMFinetuneRun(model="sd3-tiny", method="full", steps=2, batch_size=2, n_samples=2, grid_samples=1)
    built = lvm_finetune.build(SimpleNamespace(pipe=pipe, fam=sd3), p)
    assert next(built.model.parameters()).dtype == torch.float32  # fp32 masters of every trained weight
    cond = sd3.encode_captions(pipe, ["a cat", "a truck"])
    images = sd3.generate(pipe, cond, steps=1, seed=0)  # a bf16 pipeline feeding an fp32 transformer
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_sampling_in_batches_draws_the_noise_one_call_draws():
    from efficientllm_utils.lvm import sd3
    from efficientllm_utils.lvm.presets import PAPER_MODELS, sampling

    pipe, _ = tiny_sd3_pipeline()
    cond = sd3.encode_captions(pipe, ["a cat", "a truck", "a cat", "a truck", "a cat"])
    whole = sd3.generate(pipe, cond, steps=2, seed=3)
    batched = sd3.generate(pipe, cond, steps=2, seed=3, batch_size=2)
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)
    assert sampling("sd3-small") == {}  # a preset samples as before: its own size, one call
    assert all(sampling(m)["batch_size"] < 1000 and sampling(m)["size"] for m in PAPER_MODELS)


def test_paper_checkpoints_train_at_the_size_they_sample():
    from efficientllm_utils.lvm import data
    from efficientllm_utils.lvm.presets import PAPER_SAMPLING, upsampled

    small = data.Examples(torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 1]), ["a", "b"], "cifar")
    size = PAPER_SAMPLING["stabilityai/stable-diffusion-3.5-medium"].size
    big = upsampled(small, size)
    assert big.pixels.shape == (2, 3, size, size) and big.pixels.abs().max() <= 1 and "resized" in big.source
