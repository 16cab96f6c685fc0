"""Whole-batch flips, padding and crops: albumentations' distributions, used only when exact."""

import logging
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from imgcls.config import parse_params
from imgcls.data.augment import build_transform
from imgcls.data.batch_augment import BatchAugment
from imgcls.data.dataset import load_split_data
from imgcls.training.batches import TensorBatches, make_batches, set_epoch
from imgcls.training.train import train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Every pixel distinct and non-zero: an output tells exactly which flip, padding and crop made it.
IMAGE = (np.arange(1, 37, dtype=np.uint8).reshape(6, 6, 1) * 7) % 251 + 1
FLIP_PAD_CROP = [
    A.HorizontalFlip(p=0.5),
    A.PadIfNeeded(min_height=8, min_width=8, border_mode=0),
    A.RandomCrop(height=6, width=6),
]


def _batched(transforms: list, image: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` copies of `image` through the batched pipeline: (n, H, W, C) uint8."""
    batch = torch.from_numpy(np.repeat(image[None], n, 0)).permute(0, 3, 1, 2).contiguous()
    aug = BatchAugment.from_compose(A.Compose(transforms))
    assert aug is not None
    return aug(batch, torch.Generator().manual_seed(seed)).permute(0, 2, 3, 1).numpy()


def _albumentations(transforms: list, image: np.ndarray, n: int) -> list[np.ndarray]:
    """`n` draws of albumentations itself."""
    compose = A.Compose(transforms, seed=0)
    return [compose(image=image)["image"] for _ in range(n)]


def test_flip_pad_crop_draws_albumentations_outcomes_equally_often() -> None:
    n = 3600
    ours = Counter(x.tobytes() for x in _batched(FLIP_PAD_CROP, IMAGE, n))
    theirs = Counter(x.tobytes() for x in _albumentations(FLIP_PAD_CROP, IMAGE, n))
    # 2 mirrorings x 3 x 3 crop offsets in the 8 x 8 padded image: the same 18 images
    assert set(ours) == set(theirs) and len(ours) == 18
    expected = n / 18
    for counts in (ours, theirs):
        assert all(0.7 * expected < c < 1.3 * expected for c in counts.values()), counts


@pytest.mark.parametrize(
    "transform",
    [
        A.HorizontalFlip(p=1.0),
        A.VerticalFlip(p=1.0),
        A.PadIfNeeded(min_height=9, min_width=10, border_mode=0, fill=17),  # uneven padding
        A.PadIfNeeded(min_height=4, min_width=4, border_mode=0),  # already large enough
    ],
)
def test_deterministic_transforms_match_albumentations_pixel_for_pixel(transform) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    ours = _batched([transform], rgb, 3)
    theirs = A.Compose([transform])(image=rgb)["image"]
    assert all(np.array_equal(x, theirs) for x in ours)


def test_flip_probability_is_albumentations_p() -> None:
    flipped = _batched([A.HorizontalFlip(p=0.2)], IMAGE, 4000)
    share = np.mean([np.array_equal(x, IMAGE[:, ::-1]) for x in flipped])
    assert 0.17 < share < 0.23


@pytest.mark.parametrize(
    "transform",
    [
        A.Affine(rotate=10, p=1.0),  # no batched equivalent
        A.PadIfNeeded(min_height=8, min_width=8, border_mode=4),  # reflected border
        A.PadIfNeeded(min_height=8, min_width=8, border_mode=0, position="random"),
        A.PadIfNeeded(min_height=8, min_width=8, border_mode=0, fill=(0, 255, 0)),  # a colour
        A.PadIfNeeded(min_height=8, min_width=8, border_mode=0, p=0.5),
        A.RandomCrop(height=4, width=4, p=0.5),
        A.RandomCrop(height=9, width=9, pad_if_needed=True),
    ],
)
def test_anything_else_keeps_the_whole_list_on_albumentations(transform) -> None:
    assert BatchAugment.from_compose(A.Compose([A.HorizontalFlip(p=0.5), transform])) is None


def _batches(specs: list[dict], *, batched: bool = True) -> TensorBatches | DataLoader:
    params = parse_params({"augment": {"train": specs}, "train": {"batched_augment": batched}})
    images = np.random.default_rng(1).integers(0, 255, (40, 12, 12, 1), dtype=np.uint8)
    return make_batches(
        images,
        np.arange(40) % 3,
        build_transform(params.augment.train),
        16,
        shuffle=True,
        device=torch.device("cpu"),
        num_workers=0,
        batched_augment=params.train.batched_augment,
    )


PRESET_AUGMENT = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "PadIfNeeded", "min_height": 16, "min_width": 16, "border_mode": 0},
    {"name": "RandomCrop", "height": 12, "width": 12},
]


def test_make_batches_takes_the_batched_path_only_when_it_is_exact_and_allowed() -> None:
    assert isinstance(_batches(PRESET_AUGMENT), TensorBatches)
    assert isinstance(_batches(PRESET_AUGMENT, batched=False), DataLoader)
    assert isinstance(_batches([{"name": "Affine", "rotate": 5, "p": 1.0}]), DataLoader)


def test_batched_epochs_are_seeded_per_epoch_and_keep_labels_with_images() -> None:
    def epoch(e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = _batches(PRESET_AUGMENT)
        set_epoch(batches, 7, e)
        return list(batches)

    first = epoch(0)
    assert [x.shape for x, _ in first] == [(16, 1, 12, 12), (16, 1, 12, 12), (8, 1, 12, 12)]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, epoch(0), strict=True))
    assert not torch.equal(first[0][0], epoch(1)[0][0])
    # each of the 40 labels exactly once: the images were augmented, not re-drawn
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted((np.arange(40) % 3).tolist())


def test_a_crop_larger_than_the_images_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="PadIfNeeded"):
        _batched([A.RandomCrop(height=7, width=7)], IMAGE, 2)


def test_training_on_whole_batch_augmentation_learns_and_says_so(
    pattern_splits: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root, splits = pattern_splits
    shift = [
        {"name": "PadIfNeeded", "min_height": 18, "min_width": 18, "border_mode": 0},
        {"name": "RandomCrop", "height": 16, "width": 16},
    ]
    params = parse_params(
        {
            "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
            "augment": {"train": shift},
            "train": {"epochs": 6, "batch_size": 16, "lr": 0.01, "image_size": 16, "device": "cpu"},
        }
    )
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    with caplog.at_level(logging.INFO, logger="imgcls.train"):
        result, _ = train_model(params, data, checkpoint_path=None, progress=False)
    assert "augment.train: on whole batches (BatchAugment(PadIfNeeded, RandomCrop))" in caplog.text
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert max(h["val_accuracy"] for h in result.history) >= 0.8
