"""Which bitsandbytes kernel runs a 4-bit linear layer on the CPU: chosen, recorded, never left to chance.

bitsandbytes (0.48 and later) has two CPU paths for ``Linear4bit``:

=========== ==========================================================================================
dequantize  the 4-bit weight is dequantised to the compute dtype and multiplied with ``F.linear``:
            has a backward, honours ``bnb_4bit_compute_dtype`` (fp32 or bf16). The only path on CPUs
            without AVX512-BF16, and the path of every train-mode forward.
fused-bf16  on CPUs with AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16()``), the first forward
            in eval mode with an input that needs no grad *repacks* the weight in place
            (``_convert_weight_packed_for_cpu``: a blocked nibble layout, scales cast to bf16), and every
            later call of that layer runs a fused kernel that computes in bf16 whatever the compute dtype
            and has no backward -- in train mode too, since the weight stays packed.
=========== ==========================================================================================

Left to bitsandbytes, one model switches between the two with the phase: scoring a base before
training packs it, and training then runs a kernel that passes no gradient through the base layers;
a trained model whose inputs need grad (``prepare_model_for_kbit_training``) and the same adapter
reloaded score through different kernels. :func:`pin_kernel` therefore sets each layer's own switch
(``support_avx512bf16_for_cpu``) once, after loading, and :func:`kernel_report` says what a run used:

* fine-tuning (QLoRA) pins ``dequantize``: the only path with a backward, so training, scoring,
  merging and a reloaded adapter all run one kernel, on every CPU;
* inference (the quantization study) takes ``auto`` by default: ``fused-bf16`` where the CPU has
  AVX512-BF16 (what bitsandbytes itself would run, and faster), else ``dequantize``. The two agree
  within bf16 rounding of the scales (tested in ``tests/test_cpu_4bit.py``), and the record says which ran.

Layers the repack cannot take -- narrower than one quantisation block (in_features < blocksize, as in
tiny test models), or not a multiple of the kernel's 32-row tile -- stay 4-bit and are pinned to
``dequantize`` even under ``fused-bf16``, instead of crashing in the repack.

On a CPU without AVX512-BF16 the fused kernel does not exist; :func:`emulate_avx512bf16_cpu` makes
bitsandbytes behave as on a CPU with it, with :func:`reference_packed_matmul` (a plain-torch computation of
what the fused kernel computes) in place of the native kernel, and :func:`emulate_cpu_without_avx512bf16`
as on a CPU without it, so that tests and ``benchmarks/qlora_cpu_paths.py`` exercise both kinds of CPU on
any machine.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
import torch

from .records import cpu_flags

KERNELS = ("auto", "dequantize", "fused-bf16")
REPACK_TILE_ROWS = 32  # _convert_weight_packed_for_cpu's block_n: output rows per tile


def cpu_has_avx512bf16() -> bool:
    """What bitsandbytes itself asks (its native library's CPU check) to choose the fused path."""
    import bitsandbytes.functional as bnb_functional

    return bool(bnb_functional.has_avx512bf16())


def linear4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """bitsandbytes' ``Linear4bit`` layers (inside peft's LoRA wrappers too, which share the class name)."""
    from bitsandbytes.nn import Linear4bit

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]


def is_packed(layer: torch.nn.Module) -> bool:
    """Has the fused path repacked this layer's weight (its later calls then run the fused kernel)?"""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def repack_fits(layer: torch.nn.Module) -> bool:
    """Can ``_convert_weight_packed_for_cpu`` take this layer? It reshapes the scales to
    (out, in // blocksize) and tiles 32 output rows, so in must be a whole number of blocks."""
    state = layer.weight.quant_state
    blocksize = state.blocksize if state is not None else 64
    return (layer.in_features >= blocksize and layer.in_features % blocksize == 0
            and layer.out_features % REPACK_TILE_ROWS == 0)


def resolve(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"cpu_4bit_kernel {kernel!r} is not one of {KERNELS}")
    if kernel == "auto":
        return "fused-bf16" if cpu_has_avx512bf16() else "dequantize"
    if kernel == "fused-bf16" and not cpu_has_avx512bf16():
        raise RuntimeError("cpu_4bit_kernel 'fused-bf16' needs a CPU with AVX512-BF16: bitsandbytes registers its "
                           f"fused kernel only there, and this CPU has {cpu_flags() or 'unknown flags'}; "
                           "use 'auto' or 'dequantize'")
    return kernel


def pin_kernel(model: torch.nn.Module, kernel: str = "dequantize") -> dict:
    """Fix the CPU kernel of every 4-bit layer of ``model`` (see the module's docstring) right after loading,
    before any forward; returns :func:`kernel_report`.

    A layer that an eval forward has already repacked cannot be pinned to ``dequantize``: bitsandbytes' inverse
    repack re-quantises the bf16-rounded scales (and without double quantisation leaves them in the packed
    layout), so the weights would no longer be the loaded ones. That is an error here, not a silent change."""
    chosen = resolve(kernel)
    for name, layer in linear4bit_layers(model):
        fused = chosen == "fused-bf16" and repack_fits(layer)
        if not fused and is_packed(layer):
            raise ValueError(f"{name} was already repacked for the fused CPU kernel by an eval forward; pin the "
                             f"4-bit kernel right after loading, before the model runs")
        # bitsandbytes reads this per-layer switch on every CPU forward, before it would repack
        layer.support_avx512bf16_for_cpu = fused
    return kernel_report(model, requested=kernel)


def kernel_report(model: torch.nn.Module, requested: str | None = None) -> dict:
    """What a model's 4-bit layers run on the CPU, for a record's provenance: the kernel requested and
    chosen, the layers pinned to each path, the layers packed so far (fused kernel in use), the CPU."""
    layers = linear4bit_layers(model)
    pinned = Counter("fused-bf16" if getattr(m, "support_avx512bf16_for_cpu", False) else "dequantize"
                     for _, m in layers)
    packed = sum(is_packed(m) for _, m in layers)
    flags = cpu_flags()
    return {
        **({"requested": requested} if requested else {}),
        "kernel": "fused-bf16" if pinned["fused-bf16"] else "dequantize",
        "layers_4bit": len(layers),
        "layers_pinned": dict(pinned),
        "layers_packed": packed,  # > 0 once an eval forward ran on the fused path
        "layers_too_narrow_for_repack": sum(not repack_fits(m) for _, m in layers),
        "cpu_has_avx512bf16": cpu_has_avx512bf16(),
        "cpu_flags": flags,
    }


def run_provenance(model: torch.nn.Module) -> dict:
    """``{"cpu_4bit": kernel_report(model)}`` for a record's provenance when the model has 4-bit layers on
    the CPU, else ``{}``."""
    layers = linear4bit_layers(model)
    if not layers or layers[0][1].weight.device.type != "cpu":
        return {}
    return {"cpu_4bit": kernel_report(model)}


# --- the dequantize path, its weights dequantised once -------------------------------------------

def dequantized_weight(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight as bitsandbytes' CPU ``dequantize`` path computes it at every call (``gemm_4bit``'s
    default kernel: the block scales, double-quantised ones decoded first, then ``dequantize_4bit`` to the input's
    dtype), (out_features, in_features)."""
    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(layer.weight.data.view(-1, 1), absmax, state.blocksize,
                                                          state.quant_type, state.shape, dtype)


@contextmanager
def weights_dequantized_once(model: torch.nn.Module):
    """Inside the block, every 4-bit layer pinned to ``dequantize`` multiplies with its weight dequantised once
    (:func:`dequantized_weight`, at its first call) instead of at every call: the same arithmetic as bitsandbytes'
    own path (``F.linear`` of the input in the compute dtype with that weight, then back to the input's dtype), so
    the same outputs, bit for bit (``tests/test_cpu_4bit.py``), at the cost of the weights' full-precision size
    while the block lasts. On a CPU without AVX512-BF16, where every 4-bit layer dequantises, SmolLM2-135M scored
    100 PIQA items in 13.2 s this way against 14.8 s through the kernel (fp32 compute, 2-core AVX2 EPYC, measured
    once). For inference (no gradient reaches the 4-bit weights, which are frozen anyway); layers on the fused path
    are left alone. Restored on exit.

    The quantization study scores quality through it and times its requests without it: the latency is the kernel's."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    patched = []
    for _, layer in linear4bit_layers(model):
        if getattr(layer, "support_avx512bf16_for_cpu", False) or is_packed(layer) or layer.weight.device.type != "cpu":
            continue
        cache: dict[torch.dtype, torch.Tensor] = {}

        def forward(x: torch.Tensor, layer=layer, cache=cache) -> torch.Tensor:
            fix_4bit_weight_quant_state_from_module(layer)
            if not layer.compute_type_is_set:
                layer.set_compute_type(x)
                layer.compute_type_is_set = True
            out_dtype = x.dtype
            if layer.compute_dtype is not None:
                x = x.to(layer.compute_dtype)
            if x.dtype not in cache:
                cache[x.dtype] = dequantized_weight(layer, x.dtype)
            bias = None if layer.bias is None else layer.bias.to(x.dtype)
            return torch.nn.functional.linear(x, cache[x.dtype], bias).to(out_dtype)

        layer.forward = forward
        patched.append(layer)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward  # the class's forward again


# --- the fused path on any CPU: a plain-torch reference and an emulation -------------------------

def unpacked_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The 4-bit codes (N, K) of a weight held in the fused kernel's layout, (N, K/2) uint8: tiles of 32 output
    rows; within a tile, for each pair of columns, 64 codes are stored as 32 bytes (low nibbles first, then high)."""
    b = REPACK_TILE_ROWS
    low, high = packed.reshape(-1, b) & 0xF, packed.reshape(-1, b) >> 4  # each (N*K/64, 32)
    tiles = torch.cat([low, high], dim=-1).reshape(n // b, k // 2, b, 2)  # (N/32, K/2, 32, 2)
    return tiles.transpose(1, 2).reshape(n, k)  # (N, K)


def reference_packed_matmul(a: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """What the fused kernel computes for ``a @ W.T`` from a repacked weight: W = code[idx] * absmax
    (scales in bf16, stored (K/blocksize, N)), inputs and output in bf16, fp32 accumulation."""
    n, k = state.shape
    codes = unpacked_codes(packed.view(torch.uint8), n, k).long()  # (N, K)
    scales = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)  # (N, K)
    weight = (state.code.float()[codes] * scales).to(torch.bfloat16)  # (N, K)
    out = a.to(torch.bfloat16).float() @ weight.float().T  # (..., N)
    return out.to(torch.bfloat16)


def _reference_gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    # The native kernel is a custom op without an autograd formula: no gradient flows back through it to A.
    with torch.no_grad():
        result = reference_packed_matmul(A, B, state)
    if out is not None:
        return out.copy_(result)
    return result


@contextmanager
def _bitsandbytes_sees_avx512bf16(present: bool):
    """bitsandbytes' CPU check (``has_avx512bf16``, where its modules read it) answering ``present``; with the fused
    path on a CPU whose native kernel is missing, :func:`reference_packed_matmul` runs in its place. Yields whether
    this CPU really has AVX512-BF16. Restored on exit."""
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.modules as bnb_modules

    native = bnb_functional.has_avx512bf16()
    saved = (bnb_modules.has_avx512bf16, bnb_functional.has_avx512bf16, bnb_functional.gemv_4bit)
    bnb_modules.has_avx512bf16 = bnb_functional.has_avx512bf16 = lambda: present
    if present and not native:
        bnb_functional.gemv_4bit = _reference_gemv_4bit
    try:
        yield native
    finally:
        bnb_modules.has_avx512bf16, bnb_functional.has_avx512bf16, bnb_functional.gemv_4bit = saved


def emulate_avx512bf16_cpu():
    """Make bitsandbytes behave as on a CPU with AVX512-BF16: new ``Linear4bit`` layers take the fused path,
    and where the native fused kernel is missing (this CPU lacks AVX512-BF16) :func:`reference_packed_matmul`
    runs in its place. For tests and benchmarks only; restored on exit."""
    return _bitsandbytes_sees_avx512bf16(True)


def emulate_cpu_without_avx512bf16():
    """Make bitsandbytes (and :func:`resolve`) behave as on a CPU without AVX512-BF16: new ``Linear4bit`` layers
    dequantize, ``auto`` resolves to ``dequantize`` and ``fused-bf16`` is refused. For tests only; restored on exit.
    Layers already repacked keep their layout (and kernel)."""
    return _bitsandbytes_sees_avx512bf16(False)
