"""The denoising transformer at a precision, through diffusers' bitsandbytes integration, and its fidelity.

=========== =================================================================================================
fp32        float32 weights and compute: the reference
bf16, fp16  the transformer's weights and compute in that dtype (inputs cast on entry; text encoders and VAE fp32)
int8        bitsandbytes LLM.int8() linear layers (``Linear8bitLt``: int8 weights + row scales)
int4-nf4    bitsandbytes 4-bit NormalFloat linear layers (``Linear4bit``, bf16 compute)
=========== =================================================================================================

On CUDA, ``from_pretrained(..., quantization_config=diffusers.BitsAndBytesConfig(...))`` quantizes while
loading. diffusers' bitsandbytes quantizer refuses to run without a GPU, so on the CPU the same diffusers
function that quantizer calls, ``replace_with_bnb_linear``, swaps the linear layers for bitsandbytes' classes
and the loaded fp32 weights are quantized by bitsandbytes' own ``Int8Params``/``Params4bit`` (its CPU path).
Either way only ``nn.Linear`` layers are quantized, except those in the model's ``_keep_in_fp32_modules``
(Wan: its time embedding), as diffusers' quantizer leaves them; norms, the patch embedding and biases stay in the
float dtype. Sizes come from counted bytes (:func:`..models.count_model_bytes`).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4-nf4")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bnb_config(precision: str):
    """diffusers' ``BitsAndBytesConfig`` of an integer precision (None for float ones)."""
    from diffusers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if precision == "int4-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    if precision not in FLOAT_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return None


def _quantize_on_cpu(model: torch.nn.Module, config) -> torch.nn.Module:
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    weights = {name: (m.weight.data, None if m.bias is None else m.bias.data)
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # what diffusers' quantizer leaves in float: the model's fp32 modules and the config's skip list
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(config.llm_int8_skip_modules or [])
    model = replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=config)
    for name, module in model.named_modules():
        if name not in weights or not isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            continue
        weight, bias = weights[name]
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
        else:
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                              compress_statistics=False).to("cpu")
        if bias is not None:
            module.bias = torch.nn.Parameter(bias, requires_grad=False)
    return model


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
    config = bnb_config(precision)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    where = {"subfolder": subfolder} if subfolder else {}
    if config is not None and device == "cuda":
        model = cls.from_pretrained(source, quantization_config=config, torch_dtype=torch.bfloat16, **where)
    elif config is None and device != "cpu":  # at its dtype straight onto the GPU: no fp32 copy in host RAM
        model = cls.from_pretrained(source, torch_dtype=FLOAT_DTYPES[precision], device_map={"": device}, **where)
    else:
        model = cls.from_pretrained(source, torch_dtype=torch.float32, **where)
        if config is not None:
            model = _quantize_on_cpu(model, config)
            if precision.startswith("int4"):
                from ..cpu_4bit import pin_kernel

                pin_kernel(model, "dequantize")  # one kernel on every CPU; the record says so
        else:
            model = model.to(FLOAT_DTYPES[precision])
        model = model.to(device)
    dtype = FLOAT_DTYPES.get(precision, torch.float32 if device == "cpu" else torch.bfloat16)
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
