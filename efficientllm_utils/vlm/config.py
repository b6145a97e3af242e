"""Settings of the vision-language axis (no heavy imports: ``studies/vlm_run.py`` builds them from a run's fields)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

TASKS = ("fashion_mnist", "cifar10", "easy_vqa")  # data.py's question sets: two image sets (vision/images.py), easy-VQA
IMAGE_TASKS = ("fashion_mnist", "cifar10")  # "What is in this picture?" over an image set's classes


class VisionSettings(BaseModel):
    """The small vision tower (Qwen2.5-VL's ViT with window attention, then the 2x2 patch merger)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(32, ge=16, description="images are resized to image_size x image_size pixels")
    patch_size: int = Field(8, ge=2, description="ViT patch side in pixels (Qwen2.5-VL-7B: 14)")
    merge_size: int = Field(2, ge=1, description="merger joins merge_size^2 patches into one LM token")
    depth: int = Field(4, ge=1, description="vision transformer blocks")
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_heads: int = Field(4, ge=1)
    seed: int = 0

    @property
    def image_tokens(self) -> int:
        """LM tokens one image becomes: (image_size / patch_size)^2 / merge_size^2."""
        return (self.image_size // self.patch_size) ** 2 // self.merge_size ** 2

    def check(self) -> "VisionSettings":
        unit = self.patch_size * self.merge_size
        if self.image_size % unit:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size*merge_size={unit}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size={self.hidden_size} / num_heads={self.num_heads} must be a multiple of 4")
        return self


class AlignSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    captions_per_task: int = Field(512, ge=1, description="captioned train images per task")
    images: str = Field("fashion_mnist", description="the image set whose classes caption the photos (IMAGE_TASKS)")
    # stage 1: the vision tower and merger alone, their image tokens regressed onto the language model's input
    # embeddings of the caption's content words (no language-model pass: cheap, so many images and steps)
    embed_captions_per_task: int = Field(2000, ge=1)
    embed_steps: int = Field(300, ge=0)
    embed_batch_size: int = Field(64, ge=1)
    embed_lr: float = Field(3e-3, gt=0)
    # stage 2: captions through the frozen language model, only the merger trained (LLaVA's stage 1: the projector)
    steps: int = Field(12, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0, description="peak lr of the patch merger (the vision transformer is frozen)")
    warmup_steps: int = Field(2, ge=0)
    seed: int = 0
    num_threads: int | None = Field(None, ge=1)


