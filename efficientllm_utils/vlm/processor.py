"""Qwen2.5-VL's processor without torchvision.

``Qwen2_5_VLProcessor`` checks every sub-processor's class, and looking up the video processor's class walks
``VIDEO_PROCESSOR_MAPPING``, which without torchvision has no ``_extra_content``: the constructor fails even
for images only. torchvision cannot be installed beside the CPU build of torch here, so :class:`ImageOnlyProcessor`
skips that one check when no video processor is given, and the image side uses the PIL image processor
(``Qwen2VLImageProcessorPil``), which needs no torchvision either. Everything else (``<|image_pad|>`` expanded
to ``grid_t*grid_h*grid_w / merge_size^2`` tokens, ``pixel_values``, ``image_grid_thw``) is transformers' own.
"""
from __future__ import annotations

from transformers import Qwen2_5_VLProcessor


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` that accepts ``video_processor=None`` (images and text only)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None  # the class lookup needs torchvision; there is nothing to check
        return super().check_argument_for_proper_class(argument_name, argument)


def image_processor(patch_size: int, merge_size: int, image_size: int | None = None, **kwargs):
    """Qwen2-VL's image processor (PIL backend). With ``image_size`` every image becomes image_size^2 pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if image_size is not None:
        kwargs["size"] = {"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size}
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2, **kwargs)


def build_processor(tokenizer, vision) -> ImageOnlyProcessor:
    """The processor of the small model (``model.VisionSettings``), around a tokenizer with the vision tokens."""
    return ImageOnlyProcessor(image_processor=image_processor(vision.patch_size, vision.merge_size, vision.image_size),
                              tokenizer=tokenizer, video_processor=None)


def load_processor(source: str, tokenizer) -> ImageOnlyProcessor:
    """A released model's processor (hub id or directory): its ``preprocessor_config.json`` settings."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(source), tokenizer=tokenizer,
                              video_processor=None)
