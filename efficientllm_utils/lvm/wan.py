"""Wan 2.1 (text-to-video, a 3D DiT denoiser, flow matching) through diffusers' own classes.

``paper``: ``WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")``. ``cpu``/``smoke``: the same
classes built small from configs (seeded): ``WanTransformer3DModel`` (self-attention over space-time patches,
cross-attention to the text), ``AutoencoderKLWan`` (causal 3D convolutions, 2x down-sampling in time and
space: 5 frames of 32x32x3 <-> 3 latent frames of 16x16x4), a ``UMT5EncoderModel`` with a word-level tokenizer
built locally (:mod:`.text`), and ``FlowMatchEulerDiscreteScheduler``. The text encoder stays at its seeded
initialisation (frozen); the VAE and the denoiser are pretrained here (:mod:`.base`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .text import word_tokenizer

PAPER_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
PIPELINE_CLASS = "WanPipeline"
TRANSFORMER_CLASS = "WanTransformer3DModel"
# the self- and cross-attention projections and the FFN of every block
ADAPTER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@dataclass(frozen=True)
class WanShape:
    image_size: int = 32
    frames: int = 5  # 1 + 2k: the VAE halves time after the first frame
    frame_stride: int = 1  # take every n-th frame of the source videos
    heads: int = 4
    head_dim: int = 16
    n_layers: int = 2
    ffn_dim: int = 128
    latent_channels: int = 4
    vae_base_dim: int = 16
    text_dim: int = 32
    max_tokens: int = 16


def build_vae(shape: WanShape, seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    z = shape.latent_channels
    return AutoencoderKLWan(base_dim=shape.vae_base_dim, z_dim=z, dim_mult=[1, 2], num_res_blocks=1,
                            temperal_downsample=[True], latents_mean=[0.0] * z, latents_std=[1.0] * z,
                            scale_factor_temporal=2, scale_factor_spatial=2)


def build_transformer(shape: WanShape, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=shape.heads,
                                 attention_head_dim=shape.head_dim, in_channels=shape.latent_channels,
                                 out_channels=shape.latent_channels, text_dim=shape.text_dim, freq_dim=64,
                                 ffn_dim=shape.ffn_dim, num_layers=shape.n_layers, rope_max_seq_len=64)


def build_components(shape: WanShape, captions, seed: int) -> dict:
    """Every pipeline component but the scheduler, seeded; the text encoder frozen."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer(captions, shape.max_tokens)
    torch.manual_seed(seed + 1)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=shape.text_dim, d_kv=8,
                                          d_ff=2 * shape.text_dim, num_layers=1, num_heads=4,
                                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    return {"transformer": build_transformer(shape, seed), "vae": build_vae(shape, seed),
            "tokenizer": tokenizer, "text_encoder": encoder.requires_grad_(False).eval()}


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """``encoder_hidden_states`` (n, max_tokens, text_dim) as the pipeline computes them (no guidance)."""
    embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                   max_sequence_length=pipe.tokenizer.model_max_length)
    return {"encoder_hidden_states": embeds}


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return (torch.tensor(vae.config.latents_mean).view(shape).to(like),
            torch.tensor(vae.config.latents_std).view(shape).to(like))


@torch.no_grad()
def to_latents(vae, pixels: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(n, 3, F, H, W) in [-1, 1] -> normalised latents (n, c, 1 + (F-1)/2, H/2, W/2), as the pipeline undoes."""
    # each batch on the VAE's device and in its dtype; the latents kept as fp32 on the CPU (batches go to the device)
    means = torch.cat([vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
                       for x in pixels.split(batch_size)])
    mean, std = _stats(vae, means)
    return (means - mean) / std


def set_latent_stats(vae, raw_latents: torch.Tensor) -> None:
    """Wan's VAE config holds a mean and a std per latent channel."""
    per_channel = raw_latents.transpose(0, 1).flatten(1)  # (c, n*f*h*w)
    vae.register_to_config(latents_mean=per_channel.mean(1).tolist(), latents_std=per_channel.std(1).tolist())


def generate(pipe, cond: dict[str, torch.Tensor], steps: int, seed: int, guidance_scale: float = 1.0,
             size: int | None = None, frames: int | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Clips (n, 3, F, H, W) in [-1, 1], one per conditioning row, with a seeded generator, in pipeline calls of
    ``batch_size`` clips (None: one call)."""
    from .flow import sample_in_batches

    size = size or PAPER_SIZE.get(pipe.transformer.config.num_layers, 32)
    frames = frames or (PAPER_FRAMES if size != 32 else 5)
    embeds = cond["encoder_hidden_states"]
    generator = torch.Generator().manual_seed(seed)

    def sample(rows: slice, noise: torch.Tensor | None) -> torch.Tensor:
        out = pipe(prompt_embeds=embeds[rows], latents=noise, height=size, width=size, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt", generator=generator)
        return out.frames.float().permute(0, 2, 1, 3, 4) * 2 - 1  # (n, F, 3, H, W) in [0, 1] -> (n, 3, F, H, W)

    return sample_in_batches(sample, len(embeds), batch_size, lambda: pipe.prepare_latents(
        len(embeds), pipe.transformer.config.in_channels, size, size, frames, torch.float32, embeds.device,
        generator))


PAPER_SIZE = {30: 480}  # Wan2.1-T2V-1.3B (30 blocks): 480p-class square samples; the small ones: 32 px
PAPER_FRAMES = 33


def denoise(transformer, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    """(b, c, f, h, w) latents at timesteps (b,) in [0, 1000] -> the predicted velocity (b, c, f, h, w)."""
    return transformer(hidden_states=latents, timestep=timesteps, return_dict=False, **cond)[0]


# --- data ---------------------------------------------------------------------------------------------

def examples(part: str, heldout: bool, heldout_size: int, shape: WanShape | None, images: str | None = None):
    """'base' clips (two videos) or 'new' clips (a third), their training or held-out (later) clips."""
    from . import data

    shape = shape or WanShape()
    videos = data.BASE_VIDEOS if part == "base" else data.NEW_VIDEOS
    fraction = data.BASE_HELDOUT_FRACTION if part == "base" else data.NEW_HELDOUT_FRACTION
    return data.clips(videos, shape.frames, shape.image_size, shape.frame_stride, "heldout" if heldout else "train",
                      fraction)
