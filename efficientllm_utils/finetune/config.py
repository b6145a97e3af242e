"""Settings of the fine-tuning axis: the method, the training loop, the data, and three profiles.

``smoke`` proves the code path in seconds, ``cpu`` runs all eight methods on the real
SmolLM2-135M-Instruct on two CPU cores in about a quarter of an hour, ``paper`` holds
the EfficientLLM settings (rank 64, alpha 128, dropout 0.1, all linear layers,
lr 1e-4 for the LoRA family, LoRA+ ratio 16) for a GPU run.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHOD_NAMES = ("lora", "loraplus", "rslora", "dora", "pissa", "freeze", "full", "qlora")


class MethodSettings(BaseModel):
    """What a method builder needs. Fields a method does not use are ignored by it."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(64, ge=1, description="LoRA rank r (lora, loraplus, rslora, dora, pissa, qlora)")
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
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads during the loop (None = leave torch's setting)")


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: Literal["boolq", "openo1-sft", "medical-o1-sft"] = "boolq"
    max_length: int = Field(128, ge=16, description="rows whose prompt+answer+EOS exceed this are skipped")
    n_train: int | None = Field(None, ge=1, description="training examples kept (None = all that fit)")
    n_heldout: int = Field(64, ge=2, description="held-out evaluation items")
    heldout_fraction: float = Field(0.25, gt=0, lt=1, description="share of rows reserved for held-out")
    balance: bool = Field(True, description="BoolQ: alternate yes/no so any prefix is balanced")
    seed: int = 0


class FinetuneProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    model: str = Field(description="models.load_causal_lm source")
    methods: list[str] = Field(default_factory=lambda: list(METHOD_NAMES))
    method: MethodSettings
    overrides: dict[str, dict] = Field(
        default_factory=dict, description="per-method MethodSettings fields, e.g. {'full': {'lr': 1e-5}}")
    train: TrainSettings
    data: DataSettings
    eval_batch_tokens: int = Field(2048, description="max_batch_tokens of quality.mc_accuracy")
    notes: str = ""

    @model_validator(mode="after")
    def _check(self):
        unknown = (set(self.methods) | set(self.overrides)) - set(METHOD_NAMES)
        if unknown:
            raise ValueError(f"unknown fine-tuning method(s) {sorted(unknown)}; allowed: {', '.join(METHOD_NAMES)}")
        for method in self.overrides:
            self.settings_for(method)  # validates the override fields
        return self

    def settings_for(self, method: str) -> MethodSettings:
        """The shared method settings with this method's overrides applied (validated)."""
        return MethodSettings.model_validate({**self.method.model_dump(), **self.overrides.get(method, {})})


PROFILES: dict[str, FinetuneProfile] = {
    "smoke": FinetuneProfile(
        name="smoke",
        model="smollm2-135m-instruct",
        method=MethodSettings(rank=4, alpha=8, dropout=0.0, lr=1e-3, freeze_trainable_layers=2, pissa_niter=2,
                              qlora_compute_dtype="fp32"),
        overrides={"full": {"lr": 1e-4}, "freeze": {"lr": 3e-4}, "pissa": {"lr": 1e-4}},
        train=TrainSettings(steps=3, batch_size=2, warmup_steps=0, schedule="constant", num_threads=1),
        data=DataSettings(max_length=96, n_train=16, n_heldout=8),
        notes="code path only: 3 steps, 8 held-out items",
    ),
    "cpu": FinetuneProfile(
        name="cpu",
        model="smollm2-135m-instruct",
        method=MethodSettings(rank=8, alpha=16, dropout=0.05, lr=1e-3, loraplus_lr_ratio=16.0,
                              freeze_trainable_layers=4, pissa_niter=4, qlora_compute_dtype="fp32"),
        overrides={"loraplus": {"lr": 1.5e-4}, "pissa": {"lr": 5e-5, "dropout": 0.0},
                   "full": {"lr": 3e-5}, "freeze": {"lr": 1e-4}},
        # num_threads=1: on the shared 2-core machine a LoRA step took ~6 s with 1 thread and
        # 22-40 s with 2 (OpenMP threads stalling on a busy second core).
        train=TrainSettings(steps=8, batch_size=4, warmup_steps=1, schedule="cosine", min_lr_ratio=0.1,
                            num_threads=1),
        data=DataSettings(max_length=112, n_heldout=48),
        notes=("sized for 2 CPU cores: all 8 methods with held-out evaluation took 869 s on a shared, busy "
               "2-core Xeon (step s: lora 6.6, loraplus 6.5, rslora 5.5, dora 16.2, pissa 7.2, freeze 2.7, "
               "full 9.4, qlora 9.8; evaluation of 48 items ~30 s, dora 50 s); rank 8 because the run is "
               "8 steps of 4 sequences, where rank 64 adds adapter cost and nothing measurable"),
    ),
    "paper": FinetuneProfile(
        name="paper",
        model="meta-llama/Llama-3.2-1B-Instruct",
        method=MethodSettings(rank=64, alpha=128, dropout=0.1, lr=1e-4, loraplus_lr_ratio=16.0,
                              freeze_trainable_layers=2, pissa_niter=16, qlora_compute_dtype="bf16",
                              gradient_checkpointing=True),
        overrides={"full": {"lr": 1e-5}, "freeze": {"lr": 1e-5}},
        train=TrainSettings(steps=1000, batch_size=4, grad_accum=4, warmup_steps=100, schedule="cosine"),
        data=DataSettings(dataset="openo1-sft", max_length=2048, n_heldout=500),
        notes=("EfficientLLM: r=64, alpha=128, dropout 0.1, all linear layers, lr 1e-4 (LoRA family), "
               "LoRA+ ratio 16; full/freeze lr, steps and batch are this study's choices, not the paper's"),
    ),
}


def profile(name: str) -> FinetuneProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown fine-tuning profile {name!r}; allowed: {sorted(PROFILES)}")
    return PROFILES[name].model_copy(deep=True)
