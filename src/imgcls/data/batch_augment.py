"""Flips, padding and random crops of `augment.train` applied to whole uint8 batches at once.

albumentations runs per image in Python: ~28 us an image for flip + pad + crop, 3 ms of every
40 ms step at batch 64 on 2 cores (Fashion-MNIST), and on a GPU a data path that CPU workers
must keep fed. When every entry of the train pipeline is one of the transforms below, with
arguments whose meaning is plain array indexing, the same random transforms are drawn for the
whole batch from one seeded generator and applied with a few tensor ops, on the device that
holds the batch. The per-image distribution is albumentations' own (a flip with probability
`p`; `PadIfNeeded`'s centred padding from albumentations' own function; a crop offset uniform
over every position); only the random stream differs. Anything else keeps albumentations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import albumentations as A
import cv2
import torch
from albumentations.augmentations.geometric.functional import get_padding_params

Op = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Flip:
    """Mirror each image with probability `p` along `dim` (-1: horizontal, -2: vertical)."""

    p: float
    dim: int

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        draw = torch.rand(len(x), generator=gen) < self.p
        mask = draw.to(x.device).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(mask, x.flip(self.dim), x)


@dataclass(frozen=True)
class PadTo:
    """`PadIfNeeded` with a constant border, centred: every image gets the same padding."""

    min_height: int
    min_width: int
    fill: int

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        # albumentations' own arithmetic: the odd pixel of an uneven padding goes where it puts it
        top, bottom, left, right = get_padding_params(
            (h, w), self.min_height, self.min_width, None, None
        )
        if not (top or bottom or left or right):
            return x
        out = x.new_full((*x.shape[:-2], h + top + bottom, w + left + right), self.fill)
        out[..., top : top + h, left : left + w] = x
        return out


@dataclass(frozen=True)
class Crop:
    """`RandomCrop`: a `height` x `width` window at an offset uniform over every position."""

    height: int
    width: int

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, h, w = len(x), *x.shape[-2:]
        if self.height > h or self.width > w:
            raise ValueError(
                f"RandomCrop of {self.height}x{self.width} from {h}x{w} images; pad first "
                "(PadIfNeeded) or crop less"
            )
        top = torch.randint(0, h - self.height + 1, (b,), generator=gen).to(x.device)
        left = torch.randint(0, w - self.width + 1, (b,), generator=gen).to(x.device)
        windows = x.unfold(-2, self.height, 1).unfold(-2, self.width, 1)  # (B, C, nh, nw, h, w)
        return windows[torch.arange(b, device=x.device), :, top, left]  # (B, C, height, width)


def _uint8_fill(fill: object) -> int | None:
    """A constant border that is one integral value in [0, 255] for every channel, else None.

    A per-channel colour is left to albumentations (what OpenCV does with a colour of another
    channel count is OpenCV's business).
    """
    values = set(fill) if isinstance(fill, tuple | list) else {fill}
    if len(values) != 1:
        return None
    (v,) = values
    ok = isinstance(v, int | float) and float(v).is_integer() and 0 <= v <= 255
    return int(v) if ok else None


def _as_op(t: A.BasicTransform) -> Op | None:
    """The batched equivalent of one albumentations transform, or None when there is none."""
    kind = type(t)
    if kind is A.HorizontalFlip:
        return Flip(t.p, -1)
    if kind is A.VerticalFlip:
        return Flip(t.p, -2)
    if kind is A.PadIfNeeded:
        fill = _uint8_fill(t.fill)
        plain = (
            t.p == 1.0
            and t.position == "center"
            and t.border_mode == cv2.BORDER_CONSTANT
            and t.pad_height_divisor is None
            and t.pad_width_divisor is None
            and t.min_height is not None
            and t.min_width is not None
        )
        return PadTo(t.min_height, t.min_width, fill) if plain and fill is not None else None
    if kind is A.RandomCrop:
        return Crop(t.height, t.width) if t.p == 1.0 and not t.pad_if_needed else None
    return None


class BatchAugment:
    """A train pipeline of flips / PadIfNeeded / RandomCrop run on (B, C, H, W) uint8 batches."""

    def __init__(self, ops: list[Op], names: list[str]) -> None:
        self.ops, self.names = ops, names

    @classmethod
    def from_compose(cls, transform: A.Compose | None) -> BatchAugment | None:
        """The batched pipeline of `transform`, or None if any entry has no exact equivalent."""
        if transform is None or len(transform) == 0 or transform.p != 1.0:
            return None
        ops = [_as_op(t) for t in transform.transforms]
        if any(op is None for op in ops):
            return None
        return cls(ops, [type(t).__name__ for t in transform.transforms])

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augment a (B, C, H, W) batch; `gen` (a CPU generator) draws every random choice."""
        for op in self.ops:
            x = op(x, gen)
        return x

    def __repr__(self) -> str:
        return f"BatchAugment({', '.join(self.names)})"
