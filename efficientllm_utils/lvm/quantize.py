"""The denoising transformer at a precision, through diffusers' quantization integrations, and its fidelity.

The precisions are the registry's that the lvm study offers (:mod:`efficientllm_utils.precisions`, study ``lvm``): the
float dtypes (the transformer's weights and compute in that dtype; inputs cast on entry, text encoders and VAE fp32)
and the methods with a diffusers counterpart (bitsandbytes' LLM.int8() and NF4). On CUDA,
``from_pretrained(..., quantization_config=<the method's diffusers config>)`` quantizes while loading; on the CPU the
method quantizes the loaded fp32 transformer itself (``Precision.quantize_denoiser_on_cpu``: bitsandbytes' CPU path,
as diffusers' quantizer would), and the quantized transformer computes in fp32. Only ``nn.Linear`` layers are
quantized, except those in the model's ``_keep_in_fp32_modules`` (Wan: its time embedding); norms, the patch embedding
and biases stay in the float dtype. Sizes come from counted bytes (:func:`..precisions.counting.count_model_bytes`).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import precisions


def cast_inputs_hook(dtype: torch.dtype):
    """A forward pre-hook casting floating inputs to the transformer's dtype (the pipeline passes fp32)."""
    def hook(module, args, kwargs):
        cast = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        return args, cast
    return hook


def output_dtype_hook(dtype: torch.dtype):
    """A forward hook returning the prediction in ``dtype``, the dtype of the pipeline's latents (its scheduler
    step would otherwise hand the VAE latents in the denoiser's dtype)."""
    def hook(module, args, kwargs, output):
        if isinstance(output, tuple):
            return (output[0].to(dtype), *output[1:])
        output.sample = output.sample.to(dtype)
        return output
    return hook


float32_output_hook = output_dtype_hook(torch.float32)


def load_transformer(cls, source: str, precision: str, device: str = "cpu", subfolder: str | None = None):
    """``cls`` (e.g. ``SD3Transformer2DModel``) from ``source`` (a folder or hub id, with ``subfolder``) at
    ``precision``, in eval mode."""
    method = precisions.get(precision, "lvm")
    for message in method.silenced_warnings:
        warnings.filterwarnings("ignore", message=message)
    where = {"subfolder": subfolder} if subfolder else {}
    if not method.is_float and device == "cuda":
        model = cls.from_pretrained(source, quantization_config=method.diffusers_config(),
                                    torch_dtype=method.torch_dtype(), **where)
    elif method.is_float and device != "cpu":  # at its dtype straight onto the GPU: no fp32 copy in host RAM
        model = cls.from_pretrained(source, torch_dtype=method.torch_dtype(), device_map={"": device}, **where)
    else:
        model = cls.from_pretrained(source, torch_dtype=torch.float32, **where)
        model = method.quantize_denoiser_on_cpu(model) if not method.is_float else model.to(method.torch_dtype())
        model = model.to(device)
    dtype = method.torch_dtype() if method.is_float else torch.float32 if device == "cpu" else torch.bfloat16
    model.register_forward_pre_hook(cast_inputs_hook(dtype), with_kwargs=True)
    model.register_forward_hook(float32_output_hook, with_kwargs=True)
    return model.eval().requires_grad_(False)


# --- fidelity to the reference ---------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB of (n, ..., 3, H, W)-shaped images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per image (or frame) SSIM (scikit-image, Gaussian-weighted as Wang et al. 2004) of (n, 3, H, W) in [-1, 1]."""
    from skimage.metrics import structural_similarity

    a_np = a.float().permute(0, 2, 3, 1).numpy()
    b_np = b.float().permute(0, 2, 3, 1).numpy()
    return np.array([structural_similarity(x, y, channel_axis=-1, data_range=2.0, gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False) for x, y in zip(a_np, b_np)])
