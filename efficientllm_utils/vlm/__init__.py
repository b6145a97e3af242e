"""The vision-language axis: Qwen2.5-VL fine-tuned and quantized, answering questions about real images.

``config`` (settings, no heavy imports), ``model`` (the paper's model by hub id, or a small Qwen2.5-VL whose
language model is SmolLM2's real weights), ``processor`` (Qwen2.5-VL's processor without torchvision), ``data``
(image-set and easy-VQA questions with closed answer sets), ``align`` (the cached alignment stage), ``scoring``
(answers by log-likelihood). The studies are ``studies/vlm_finetune.py`` and ``studies/vlm_quantization.py``.
"""
