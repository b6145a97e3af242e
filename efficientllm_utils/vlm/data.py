"""Questions about real images, with closed answer sets, that ship offline.

* ``fashion_mnist`` and ``cifar10``: an offline image set's 10,000 labelled images (``vision/images.py``:
  Fashion-MNIST's clothing from Debian's package, or CIFAR-10's photos from BIG-bench's sdist where it answers),
  asked "What is in this picture? Answer with one word."; the answer set is the set's 10 classes. The images are
  shuffled with ``images.SPLIT_SEED`` and the first ``HELDOUT_IMAGES`` are the held-out test split (fixed for
  every run); the rest train (alignment captions use the train images only).
* ``easy_vqa``: easy-VQA (``easy-vqa==1.0``, MIT): 64x64 synthetic images of one coloured shape, 38,575 train and
  9,673 test questions with their own fixed split, 13 possible answers (colours, shapes, yes/no).

Every answer is one word, and with a leading space one SmolLM2 token, so a held-out item is scored like
``quality.choice_loglikelihoods``' one-token path: the log-probability of each answer's token at the last position
after the prompt "...<|im_start|>assistant\\n". Training targets are " {answer}<|im_end|>".
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .. import assets
from ..finetune.data import IGNORE_INDEX, Example
from ..params import one_of
from ..vision import images as image_sets
from .config import IMAGE_TASKS, TASKS

HELDOUT_IMAGES = 2000  # held-out images of an image set (the rest train)
IMAGE_QUESTION = "What is in this picture? Answer with one word."
CAPTION_QUESTION = "Describe the picture."
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class VQAItem:
    """One question about one image, with the task's closed answer set."""

    task: str
    row: int  # index of the question in its split (an image set: of the image)
    image: np.ndarray  # (h, w, 3) uint8
    question: str
    answer: str
    choices: tuple[str, ...]

    @property
    def gold(self) -> int:
        return self.choices.index(self.answer)


# --- sources ------------------------------------------------------------------------------

def _image_split(task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = image_sets.image_set(task).load()
    order = image_sets.shuffled_order(len(images))
    index = order[:HELDOUT_IMAGES] if split == "test" else order[HELDOUT_IMAGES:]
    return images[index], labels[index]


@lru_cache(maxsize=4)
def _easy_vqa_questions(split: str) -> list[tuple[str, str, int]]:
    return [tuple(q) for q in json.loads((assets.easy_vqa_data() / split / "questions.json").read_text())]


@lru_cache(maxsize=1)
def easy_vqa_answers() -> tuple[str, ...]:
    return tuple(a.strip() for a in (assets.easy_vqa_data() / "answers.txt").read_text().split() if a.strip())


def _easy_vqa_image(split: str, image_id: int) -> np.ndarray:
    from PIL import Image

    with Image.open(assets.easy_vqa_data() / split / "images" / f"{image_id}.png") as im:
        return np.asarray(im.convert("RGB"))


def check_task(task: str) -> str:
    return one_of(task, TASKS, "task")


def load_items(task: str, split: str, n: int | None, seed: int = 0) -> list[VQAItem]:
    """A seeded sample of ``n`` questions of ``task``'s ``split`` ("train" or "test"); all with ``n=None``."""
    check_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{task}-{split}-{seed}")
    if task in IMAGE_TASKS:
        images, labels = _image_split(task, split)
        classes = image_sets.image_set(task).classes
        rows = list(range(len(images)))
        rng.shuffle(rows)
        return [VQAItem(task, r, images[r], IMAGE_QUESTION, classes[labels[r]], classes) for r in rows[:n]]
    questions = _easy_vqa_questions(split)
    rows = list(range(len(questions)))
    rng.shuffle(rows)
    answers = easy_vqa_answers()
    return [VQAItem(task, r, _easy_vqa_image(split, questions[r][2]), questions[r][0], questions[r][1], answers)
            for r in rows[:n]]


def majority_share(items: list[VQAItem]) -> tuple[str, float]:
    """The most frequent gold answer and its share: the accuracy of always answering it."""
    answer, count = Counter(i.answer for i in items).most_common(1)[0]
    return answer, count / len(items)


def captions(n_per_task: int, seed: int = 0, images: str = "fashion_mnist"
             ) -> list[tuple[np.ndarray, str, tuple[str, ...]]]:
    """(image, caption, its content words) from the TRAIN splits, for the alignment stage: "a photo of a {class}."
    for the image set ``images``; "a {colour} {shape}." for easy-VQA, read off each image's own colour and shape
    questions."""
    pairs = [(i.image, f"a photo of {'an' if i.answer[0] in 'aeiou' else 'a'} {i.answer}.", (i.answer,))
             for i in load_items(images, "train", n_per_task, seed)]
    colour, shape = {}, {}
    shapes = {"circle", "rectangle", "triangle"}
    for question, answer, image_id in _easy_vqa_questions("train"):
        if question.startswith("what"):  # "what color is the shape?", "what shape is present?", ...
            (shape if answer in shapes else colour)[image_id] = answer
    ids = sorted(set(colour) & set(shape))
    random.Random(f"captions-{seed}").shuffle(ids)
    pairs += [(_easy_vqa_image("train", i), f"a {colour[i]} {shape[i]}.", (colour[i], shape[i])) for i in ids[:n_per_task]]
    return pairs


# --- encoding ---------------------------------------------------------------------------------

def prompt_text(question: str, processor) -> str:
    """The chat turn with one image before the question, up to the answer (SmolLM2's chat format, no system turn)."""
    image = f"<|vision_start|>{processor.image_token}<|vision_end|>"
    return f"<|im_start|>user\n{image}{question}{END_OF_TURN}\n<|im_start|>assistant\n"


def encode(processor, image: np.ndarray, question: str, answer: str | None, row: int) -> Example:
    """One tokenised sequence: the prompt with the image's tokens expanded by the processor, then (for training)
    " {answer}<|im_end|>", labelled; ``model_inputs`` carries pixel_values (patches, C*T*P*P), image_grid_thw (1, 3)
    and mm_token_type_ids (one per token)."""
    from PIL import Image

    prompt = prompt_text(question, processor)
    enc = processor(images=[Image.fromarray(image)], text=[prompt], return_tensors="pt")
    prompt_ids = enc["input_ids"][0].tolist()
    answer_ids = [] if answer is None else processor.tokenizer(f" {answer}{END_OF_TURN}", add_special_tokens=False).input_ids
    ids = tuple(prompt_ids + answer_ids)
    types = tuple(enc["mm_token_type_ids"][0].tolist()) + (0,) * len(answer_ids)
    labels = (IGNORE_INDEX,) * len(prompt_ids) + tuple(answer_ids)
    return Example(row, ids, labels, prompt, answer or "",
                   {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
                    "mm_token_type_ids": types})


def answer_token_ids(processor, choices: tuple[str, ...]) -> list[list[int]]:
    """The tokens of each " {choice}" (mostly one; SmolLM2 splits " teal" in two)."""
    return [processor.tokenizer(f" {c}", add_special_tokens=False).input_ids for c in choices]


def extend(example: Example, ids: list[int]) -> Example:
    """``example`` with ``ids`` appended as text tokens (unlabelled)."""
    inputs = dict(example.model_inputs or {})
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = tuple(inputs["mm_token_type_ids"]) + (0,) * len(ids)
    return Example(example.row, example.input_ids + tuple(ids), example.labels + (IGNORE_INDEX,) * len(ids),
                   example.prompt, example.answer, inputs)


def training_examples(items: list[VQAItem], processor) -> list[Example]:
    return [encode(processor, i.image, i.question, i.answer, row) for row, i in enumerate(items)]


def interleave(*lists: list) -> list:
    """Round-robin over lists (tasks alternate, so any prefix and any batch mixes them)."""
    out = []
    for group in zip(*lists):
        out.extend(group)
    longest = max(map(len, lists))
    for lst in lists:
        out.extend(lst[min(map(len, lists)):longest])
    return out
