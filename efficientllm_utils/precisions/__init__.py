"""The one registry of precisions, shared by the LLM, VLM and LVM quantization studies.

A precision is a float dtype or a quantization method of a field library; each declares what it stands for in the
paper, its transformers config (and diffusers' counterpart for a denoiser, with its CPU path), the dtype it loads and
computes in, how its bytes are counted, the devices it has run on and its kernel notes (``registry.Precision``).
One module per library registers its methods:

============= ================= ==================================================================================
fp32/bf16/fp16 ``floats``        float32 / bfloat16 / float16 weights and compute; fp32 is the studies' reference
int8          ``with_bitsandbytes`` LLM.int8() linear layers (weights int8, outliers in fp16)
int4-nf4      ``with_bitsandbytes`` 4-bit NormalFloat linear layers, bf16 compute (fp32 on a CPU without AVX512-BF16; the paper's int4 in its claims)
int4-fp4      ``with_bitsandbytes`` 4-bit float linear layers, bf16 compute (fp32 on a CPU without AVX512-BF16)
int8-torchao  ``with_torchao``   torchao int8 weight-only linear layers, fp32 compute
int4-quanto   ``with_quanto``    optimum-quanto int4 weight-only linear layers (groups of 128), fp32 compute
============= ================= ==================================================================================

Adding a method: a module here that calls ``register`` (imported below), and a params line. No torch import at
module level (the report layer reads the registry); ``counting.py`` counts a loaded model's bytes.
"""
from __future__ import annotations

# each registers its precisions; this order is the registry's (the first standing for a paper name represents it)
from . import floats  # noqa: F401
from . import with_bitsandbytes  # noqa: F401
from . import with_torchao  # noqa: F401
from . import with_quanto  # noqa: F401
from .registry import (STUDIES, Precision, all_precisions, check, get, names, one_of_each_kind, register,
                       representative, resolve_claim_name, standing_for, unregister)

__all__ = ["STUDIES", "Precision", "all_precisions", "check", "get", "names", "one_of_each_kind", "register",
           "representative", "resolve_claim_name", "standing_for", "unregister"]
