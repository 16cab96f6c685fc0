"""Mini-batches for one process of a (possibly distributed) run.

Every rank draws the same global permutation from a per-epoch seed, cuts it into global batches
of `train.batch_size` and takes its strided share of each batch. One process and N processes
therefore see the same global batches, and a resumed run sees the same batches as an
uninterrupted one. Augmentation is seeded per batch from (epoch seed, batch, rank), so it does
not depend on the number of DataLoader workers either. The balanced sampler (`train.sampler`)
only swaps the permutation for a seeded draw with replacement; the rest is unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from imgcls.data.batch_augment import BatchAugment
from imgcls.data.dataset import ImageArrayDataset, label_tensor
from imgcls.training.imbalance import balanced_order

# Splits up to this size are sliced straight from one in-memory tensor (no DataLoader overhead);
# bigger ones stream from the memory-mapped cache through DataLoader workers.
IN_MEMORY_BYTES = 4 * 1024**3
# On CUDA a split this small lives on the GPU itself: batches are then sliced without any copy.
ON_DEVICE_BYTES = 2 * 1024**3


def epoch_permutation(
    n: int, *, shuffle: bool, seed: int, world: int = 1, probs: np.ndarray | None = None
) -> torch.Tensor:
    """The global sample order of one epoch, padded by wrapping to a multiple of `world`.

    Padding lets every rank run the same number of equally sized steps (DDP needs that); with
    one process nothing is padded. With `probs` (per-sample draw probabilities) the epoch is `n`
    draws with replacement instead of a permutation.
    """
    if probs is not None:
        order = balanced_order(probs, seed)
    elif shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    if world > 1 and n % world:
        order = torch.cat([order, order[: world - n % world]])
    return order


def num_batches(n: int, global_batch: int, world: int = 1) -> int:
    """Steps per epoch for `n` samples (after padding to a multiple of `world`)."""
    padded = n + (-n) % world if world > 1 else n
    return math.ceil(padded / global_batch)


def rank_batches(
    order: torch.Tensor, global_batch: int, rank: int, world: int
) -> Iterator[torch.Tensor]:
    """Cut `order` into global batches and yield this rank's strided share of each."""
    for i in range(0, len(order), global_batch):
        yield order[i : i + global_batch][rank::world]


def shard_rows(n: int, rank: int, world: int) -> np.ndarray:
    """Evaluation shard of a rank: every `world`-th row, no padding (results are gathered)."""
    return np.arange(rank, n, world)


def batch_seed(epoch_seed: int, batch: int, rank: int) -> int:
    """Seed of one batch's augmentation: the same for any number of workers and on resume."""
    return int(np.random.SeedSequence([epoch_seed, batch, rank]).generate_state(1)[0])


class TensorBatches:
    """Mini-batches sliced straight from an in-memory uint8 tensor (no per-item Python).

    With `augment` (a :class:`BatchAugment`) each batch is augmented whole, where it lives.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        device: torch.device | None = None,
        rank: int = 0,
        world: int = 1,
        probs: np.ndarray | None = None,
        augment: BatchAugment | None = None,
    ) -> None:
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
        y = label_tensor(labels)
        if device is not None and device.type == "cuda" and x.nbytes <= ON_DEVICE_BYTES:
            x, y = x.to(device), y.to(device)  # (N, C, S, S) uint8 on the GPU: no per-step copy
        self.x, self.y = x, y  # (N, C, S, S) uint8, (N,) int64 or (N, K) float32
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rank, self.world, self.probs = rank, world, probs
        self.augment = augment
        self.seed = 0

    def set_epoch_seed(self, seed: int) -> None:
        """Seed of the next epoch's permutation and augmentation (the same on every rank)."""
        self.seed = seed

    def __len__(self) -> int:
        return num_batches(len(self.y), self.batch_size * self.world, self.world)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.shuffle and self.world == 1 and self.probs is None and self.augment is None:
            for i in range(0, len(self.y), self.batch_size):  # views: no copy
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            return
        order = epoch_permutation(
            len(self.y), shuffle=self.shuffle, seed=self.seed, world=self.world, probs=self.probs
        ).to(self.x.device)
        batches = rank_batches(order, self.batch_size * self.world, self.rank, self.world)
        for b, idx in enumerate(batches):
            x = self.x[idx]
            if self.augment is not None:
                gen = torch.Generator().manual_seed(batch_seed(self.seed, b, self.rank))
                x = self.augment(x, gen)
            yield x, self.y[idx]


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's batches as `[(index, batch_seed), ...]` for ImageArrayDataset.__getitems__."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        rank: int = 0,
        world: int = 1,
        probs: np.ndarray | None = None,
    ) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.rank, self.world, self.probs = rank, world, probs
        self.seed = 0

    def set_epoch_seed(self, seed: int) -> None:
        """Seed of the next epoch's permutation and augmentation."""
        self.seed = seed

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size * self.world, self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_permutation(
            self.n, shuffle=self.shuffle, seed=self.seed, world=self.world, probs=self.probs
        )
        batches = rank_batches(order, self.batch_size * self.world, self.rank, self.world)
        for b, idx in enumerate(batches):
            seed = batch_seed(self.seed, b, self.rank)
            yield [(i, seed) for i in idx.tolist()]


def _already_batched(batch: Any) -> Any:
    """collate_fn for ImageArrayDataset.__getitems__, which returns whole batches."""
    return batch


def _single_threaded_opencv() -> None:
    """One OpenCV thread in this process, and so in the DataLoader workers forked from it.

    The workers already run in parallel, and without workers torch's threads are the ones that
    should have the cores, so an OpenCV pool would only compete. With workers this must
    happen in the parent, before the fork: calling `cv2.setNumThreads` in a forked worker hangs
    forever once the parent has started OpenCV's pool (e.g. by augmenting the augmentation grid),
    because the child inherits the pool's state but not its threads.
    """
    import cv2

    cv2.setNumThreads(1)


def auto_workers(device: torch.device, world: int = 1) -> int:
    """DataLoader workers for `train.num_workers: auto`: the CPUs left over per process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = max(1, (cpus or 1) // world)
    if device.type == "cpu":
        # On CPU the model competes with the workers for the same cores: few, and only if spare.
        return 0 if per_process <= 2 else min(4, per_process // 4)
    return max(1, min(8, per_process - 1))


def make_batches(
    images: np.ndarray,
    labels: np.ndarray,
    transform: Any,
    batch_size: int,
    *,
    shuffle: bool,
    device: torch.device,
    num_workers: int,
    rank: int = 0,
    world: int = 1,
    sample_probs: np.ndarray | None = None,
    batched_augment: bool = True,
) -> TensorBatches | DataLoader:
    """Tensor slicing when the split fits in memory and needs no per-image augmentation.

    Otherwise a DataLoader (with workers if `num_workers`) runs albumentations per image.
    `batched_augment` (`train.batched_augment`) lets a pipeline of flips / PadIfNeeded /
    RandomCrop run on whole batches instead (:mod:`imgcls.data.batch_augment`).
    `batch_size` is per process: each global batch of `batch_size * world` samples is split
    across the ranks. `sample_probs` (N,) switches shuffling to weighted draws with replacement.
    """
    augment = transform is not None and len(transform) > 0
    on_batches = BatchAugment.from_compose(transform) if augment and batched_augment else None
    if (not augment or on_batches is not None) and images.nbytes <= IN_MEMORY_BYTES:
        return TensorBatches(
            images,
            labels,
            batch_size,
            shuffle=shuffle,
            device=device,
            rank=rank,
            world=world,
            probs=sample_probs,
            augment=on_batches,
        )
    # Workers: the parent only collates. No workers: the main process augments between the
    # model's steps, and OpenCV's own pool would fight torch's threads for the same cores
    # (Fashion-MNIST, 2 cores: 4.5 ms of a 49 ms step at batch 64).
    _single_threaded_opencv()
    sampler = SeededBatchSampler(
        len(labels), batch_size, shuffle=shuffle, rank=rank, world=world, probs=sample_probs
    )
    return DataLoader(
        ImageArrayDataset(images, labels, transform),
        batch_sampler=sampler,
        collate_fn=_already_batched,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # An explicit generator keeps the DataLoader from drawing on the global torch RNG that
        # dropout uses: a resumed run must see the same dropout masks as an uninterrupted one.
        generator=torch.Generator(),
    )


def set_epoch(batches: TensorBatches | DataLoader, seed: int, epoch: int) -> None:
    """Seed the shuffling and augmentation of `epoch` (the same on every rank and on resume)."""
    epoch_seed = seed * 1000 + epoch
    if isinstance(batches, DataLoader):
        batches.batch_sampler.set_epoch_seed(epoch_seed)
    else:
        batches.set_epoch_seed(epoch_seed)
