"""Stable Diffusion 3.5 (text-to-image, MMDiT denoiser, flow matching) through diffusers' own classes.

``paper``: ``StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")``.
``cpu``/``smoke``: the same classes built small from configs (seeded): ``SD3Transformer2DModel`` (joint
text-image attention blocks), ``AutoencoderKL`` (one 2x down-sampling: 32x32x3 pixels <-> 16x16x4 latents),
two ``CLIPTextModelWithProjection`` and a ``T5EncoderModel``, word-level tokenizers built locally
(:mod:`.text`), and ``FlowMatchEulerDiscreteScheduler``. No weights come from a hub: the text encoders stay
at their seeded initialisation (frozen, they still map each caption to its own vectors); the VAE and the
denoiser are pretrained here (:mod:`.base`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .text import word_tokenizer

PAPER_REPO = "stabilityai/stable-diffusion-3.5-medium"
PIPELINE_CLASS = "StableDiffusion3Pipeline"
TRANSFORMER_CLASS = "SD3Transformer2DModel"
# modules the adapters wrap: the joint attention's projections (image and text streams) and both FFNs
ADAPTER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "ff.net.0.proj", "ff.net.2"]


@dataclass(frozen=True)
class SD3Shape:
    image_size: int = 32  # pixels
    hidden_heads: int = 4  # attention heads of the MMDiT
    head_dim: int = 16
    n_layers: int = 2
    patch_size: int = 2  # on the latent
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32)  # one down-sampling per extra entry
    text_dim: int = 32  # each CLIP's width (and projection)
    t5_dim: int = 64  # T5's width = the joint attention width
    max_tokens: int = 16

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(shape: SD3Shape, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(shape.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=shape.vae_channels,
                         latent_channels=shape.latent_channels, layers_per_block=1, norm_num_groups=8,
                         sample_size=shape.image_size, scaling_factor=1.0, shift_factor=0.0,
                         use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)


def build_transformer(shape: SD3Shape, seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=shape.latent_size, patch_size=shape.patch_size, in_channels=shape.latent_channels,
        out_channels=shape.latent_channels, num_layers=shape.n_layers, attention_head_dim=shape.head_dim,
        num_attention_heads=shape.hidden_heads, joint_attention_dim=shape.t5_dim,
        caption_projection_dim=shape.hidden_heads * shape.head_dim, pooled_projection_dim=2 * shape.text_dim,
        pos_embed_max_size=shape.latent_size // shape.patch_size)


def build_text_encoders(shape: SD3Shape, captions, seed: int) -> dict:
    """Two CLIP text encoders with projection, a T5 encoder and their tokenizers, seeded, frozen, eval."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok = word_tokenizer(captions, shape.max_tokens, add_bos=True)
    t5_tok = word_tokenizer(captions, shape.max_tokens)
    out = {"tokenizer": clip_tok, "tokenizer_2": clip_tok, "tokenizer_3": t5_tok}
    for i, key in enumerate(("text_encoder", "text_encoder_2")):
        torch.manual_seed(seed + 1 + i)
        config = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=shape.text_dim, intermediate_size=2 * shape.text_dim,
                                num_hidden_layers=2, num_attention_heads=2, projection_dim=shape.text_dim,
                                max_position_embeddings=shape.max_tokens, pad_token_id=clip_tok.pad_token_id,
                                bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id)
        out[key] = CLIPTextModelWithProjection(config)
    torch.manual_seed(seed + 3)
    out["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=shape.t5_dim, d_kv=16,
                                                    d_ff=2 * shape.t5_dim, num_layers=1, num_heads=4,
                                                    pad_token_id=t5_tok.pad_token_id,
                                                    eos_token_id=t5_tok.eos_token_id))
    for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        out[key].requires_grad_(False).eval()
    return out


def build_components(shape: SD3Shape, captions, seed: int) -> dict:
    """Every pipeline component but the scheduler, seeded."""
    return {"transformer": build_transformer(shape, seed), "vae": build_vae(shape, seed),
            **build_text_encoders(shape, captions, seed)}


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """The denoiser's text conditioning for each caption, as the pipeline computes it (no guidance):
    ``encoder_hidden_states`` (n, 2*max_tokens, t5_dim) and ``pooled_projections`` (n, 2*text_dim)."""
    embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                              max_sequence_length=pipe.tokenizer_3.model_max_length)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


@torch.no_grad()
def to_latents(vae, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1] -> the denoiser's latents (n, c, H/2, W/2): the posterior mean, shifted and
    scaled as the pipeline undoes before decoding."""
    # each batch on the VAE's device and in its dtype; the latents kept as fp32 on the CPU (batches go to the device)
    means = [vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu() for x in pixels.split(batch_size)]
    return (torch.cat(means) - vae.config.shift_factor) * vae.config.scaling_factor


def generate(pipe, cond: dict[str, torch.Tensor], steps: int, seed: int, guidance_scale: float = 1.0,
             size: int | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Images (n, 3, H, W) in [-1, 1], one per conditioning row, from the pipeline with a seeded generator, in
    pipeline calls of ``batch_size`` images (None: one call) at ``size`` px (None: the VAE's own)."""
    from .flow import sample_in_batches

    size = size or pipe.vae.config.sample_size
    embeds, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
    generator = torch.Generator().manual_seed(seed)

    def sample(rows: slice, noise: torch.Tensor | None) -> torch.Tensor:
        out = pipe(prompt_embeds=embeds[rows], pooled_prompt_embeds=pooled[rows], latents=noise, height=size,
                   width=size, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                   generator=generator)
        return out.images.float() * 2 - 1

    return sample_in_batches(sample, len(embeds), batch_size, lambda: pipe.prepare_latents(
        len(embeds), pipe.transformer.config.in_channels, size, size, embeds.dtype, embeds.device, generator))


def denoise(transformer, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    """(b, c, h, w) latents at timesteps (b,) in [0, 1000] -> the predicted velocity (b, c, h, w)."""
    return transformer(hidden_states=latents, timestep=timesteps, return_dict=False, **cond)[0]


# --- data and latent statistics -------------------------------------------------------------------

# per image set: the classes the base learns, and the two it never sees (what fine-tuning adapts it to)
BASE_CLASSES = {"fashion_mnist": ("top", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "boot"),
                "cifar10": ("airplane", "automobile", "bird", "deer", "dog", "frog", "horse", "ship")}
NEW_CLASSES = {"fashion_mnist": ("trousers", "bag"), "cifar10": ("cat", "truck")}


def examples(part: str, heldout: bool, heldout_size: int, shape: SD3Shape, images: str):
    """``part`` 'base' (pretraining) or 'new' (fine-tuning) images of image set ``images``, training or held-out
    side."""
    from . import data

    classes = (BASE_CLASSES if part == "base" else NEW_CLASSES)[images]
    return data.images(images, list(classes), heldout_size, heldout)


def set_latent_stats(vae, raw_latents: torch.Tensor) -> None:
    """SD3's VAE config holds one shift and one scale for all latent channels."""
    vae.register_to_config(shift_factor=float(raw_latents.mean()), scaling_factor=float(1 / raw_latents.std()))
