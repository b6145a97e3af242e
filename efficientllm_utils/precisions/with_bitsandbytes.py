"""bitsandbytes: LLM.int8() and 4-bit (NF4, FP4) linear layers, through transformers' and diffusers'
``BitsAndBytesConfig``.

On the CPU a 4-bit model's kernel (dequantize, or bitsandbytes' fused bf16 kernel on CPUs with AVX512-BF16) is pinned
right after loading (:mod:`efficientllm_utils.cpu_4bit`). diffusers' bitsandbytes quantizer refuses to run without a
GPU, so on the CPU a denoiser is quantized by the same diffusers function that quantizer calls,
``replace_with_bnb_linear``, with the loaded fp32 weights quantized by bitsandbytes' own ``Int8Params``/``Params4bit``
(its CPU path); only ``nn.Linear`` layers are quantized, except the model's ``_keep_in_fp32_modules``.
"""
from __future__ import annotations

from .registry import Precision, register


def int8_matmul_dtype(device: str) -> str:
    """The arithmetic LLM.int8()'s main product runs in here, found by running bitsandbytes' op once with
    ``torch._int_mm`` watched: ``int8`` where bitsandbytes has an int8 kernel (CUDA; a CPU whose torch reports
    AVX-512, where it registers ``torch._int_mm``), else ``fp32`` (its default kernel multiplies the int8 operands
    as float32: on an AVX2 CPU an int8 layer's matmul is an fp32 one, and its MFU is held against the fp32 peak)."""
    if device != "cpu":
        return "int8"
    import bitsandbytes  # noqa: F401 (registers torch.ops.bitsandbytes)
    import torch

    calls, int_mm = [], torch._int_mm

    def watched(*args, **kwargs):
        calls.append(1)
        return int_mm(*args, **kwargs)

    a = torch.ones(16, 32, dtype=torch.int8)
    torch._int_mm = watched
    try:
        torch.ops.bitsandbytes.int8_linear_matmul(a, a)
    finally:
        torch._int_mm = int_mm
    return "int8" if calls else "fp32"


def _transformers_int8(skip_modules):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def _transformers_4bit(quant_type: str):
    def config(skip_modules):
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip_modules,
                                  bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.bfloat16)
    return config


def _diffusers_int8():
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _diffusers_nf4():
    import torch
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _denoiser_on_cpu(diffusers_config):
    """Quantize a loaded fp32 denoiser's linear layers on the CPU, as diffusers' quantizer would on a GPU."""
    def quantize(model):
        import bitsandbytes as bnb
        import torch
        from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

        config = diffusers_config()
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
        if config.load_in_4bit:
            _pin_4bit_kernel(model, "cpu", "dequantize")  # one kernel (fp32) on every CPU; the record says so
        return model
    return quantize


def _pin_4bit_kernel(model, device: str, cpu_4bit_kernel: str) -> None:
    """On the CPU: the kernel pinned, and the dequantize path computing in fp32 (the dtype the model loaded at there,
    ``_four_bit_load_dtype``); the fused kernel computes in bf16 whatever the layer's compute dtype."""
    if device == "cpu":
        import torch

        from ..cpu_4bit import linear4bit_layers, pin_kernel

        for _, layer in linear4bit_layers(model):
            layer.compute_dtype = torch.float32
        pin_kernel(model, cpu_4bit_kernel)


def _four_bit_load_dtype(device: str) -> str:
    """bf16 on a GPU (the paper's setting); fp32 on the CPU, where bitsandbytes' dequantize path multiplies in the
    layer's compute dtype, and bf16 matmuls run several times slower than fp32 ones on a CPU without AVX512-BF16
    (SmolLM2-135M's nf4 scoring of 40 PIQA items took 39.4 s in bf16 and 10.6 s in fp32 on a 2-core AVX2 EPYC, once,
    2026-12-06): the weights are then the only difference from an fp32 reference, as with torchao and quanto here."""
    return "float32" if device == "cpu" else "bfloat16"


def _four_bit_compute_dtype(device: str) -> str:
    """What ``cpu_4bit_kernel: auto`` runs on the CPU: the fused bf16 kernel where the CPU has AVX512-BF16, else the
    dequantize path in fp32 (a run that pins ``dequantize`` on such a CPU computes in fp32 but is held against the
    bf16 peak)."""
    if device != "cpu":
        return "bf16"
    from ..cpu_4bit import cpu_has_avx512bf16

    return "bf16" if cpu_has_avx512bf16() else "fp32"


def _state_tensors(weight) -> list:
    """Tensors a bitsandbytes weight keeps beside its data: a 4-bit weight's ``quant_state`` (absmax, code, and
    those of the nested state of double quantisation), LLM.int8()'s row statistics ``SCB``."""
    import torch

    tensors = [getattr(weight, "SCB", None)]
    state = getattr(weight, "quant_state", None)
    if state is not None:
        tensors += [state.absmax, getattr(state, "code", None)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            tensors += [nested.absmax, getattr(nested, "code", None)]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


INT8_NOTES = ("LLM.int8(): int8 weights with a float32 scale per row, activation outliers (>6) in fp16; its main "
              "product runs in int8 where bitsandbytes has an int8 kernel (CUDA, AVX-512 CPUs) and in fp32 elsewhere "
              "(int8_matmul_dtype finds which, once per run)")
FOUR_BIT_NOTES = ("4-bit weights in blocks of 64 with an absmax each (double-quantised in transformers' loader), bf16 "
                  "compute on a GPU; on the CPU the model loads in fp32 and the kernel is pinned after loading "
                  "(cpu_4bit.py: dequantize, computing in fp32, or the fused bf16 kernel of CPUs with AVX512-BF16)")


def _int4_planned(numel: float, rows: float) -> float:
    # half a byte per weight, an 8-bit absmax per 64 weights and a float32 one per 256 of those (double quantisation)
    return numel / 2 + numel / 64 + 4 * numel / 64 / 256


def _register(name: str, stands_for: str, description: str, studies: set[str], compute_dtype: str,
              diffusers_config=None, **fields) -> None:
    """Register a bitsandbytes precision: loaded in bf16 (unless ``load_dtype_on`` says otherwise), its quantisation
    state counted with the weights, and, where diffusers quantizes a denoiser with it (``diffusers_config``), the same on the CPU."""
    register(Precision(
        name=name, stands_for=stands_for, library="bitsandbytes", description=description,
        studies=frozenset(studies), devices=("cpu", "cuda"), load_dtype="bfloat16", compute_dtype=compute_dtype,
        diffusers_config=diffusers_config,
        quantize_denoiser_on_cpu=None if diffusers_config is None else _denoiser_on_cpu(diffusers_config),
        extra_tensors=_state_tensors, **fields))


def _register_4bit(quant_type: str, kind: str, studies: set[str], diffusers_config=None) -> None:
    """A 4-bit precision (``nf4`` or ``fp4``): bf16 on a GPU, fp32 on the CPU's dequantize path, the CPU kernel
    pinned after loading."""
    _register(f"int4-{quant_type}", "int4",
              f"bitsandbytes 4-bit {kind} linear layers, bf16 compute (fp32 on a CPU without AVX512-BF16)", studies,
              "bf16", diffusers_config, kernel_notes=FOUR_BIT_NOTES, transformers_config=_transformers_4bit(quant_type),
              after_load=_pin_4bit_kernel, planned_linear_bytes=_int4_planned, load_dtype_on=_four_bit_load_dtype,
              compute_dtype_on=_four_bit_compute_dtype)


_register("int8", "int8", "bitsandbytes LLM.int8() linear layers (weights int8, outliers in fp16)",
          {"llm", "vlm", "lvm"}, "int8", _diffusers_int8, compute_dtype_on=int8_matmul_dtype, kernel_notes=INT8_NOTES,
          transformers_config=_transformers_int8, planned_linear_bytes=lambda numel, rows: numel + 4 * rows,
          silenced_warnings=("MatMul8bitLt: inputs will be cast",))
_register_4bit("nf4", "NormalFloat", {"llm", "vlm", "lvm"}, _diffusers_nf4)
_register_4bit("fp4", "float", {"llm"})
