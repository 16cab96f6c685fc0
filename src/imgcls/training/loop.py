"""Train / eval epochs as pure functions: tensors in, numbers out, no file I/O."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from imgcls.config import ProgressiveResize, TrainConfig
from imgcls.models.bundle import Preprocess
from imgcls.training.distributed import all_reduce_sum


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf."""


@dataclass
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None  # bf16 / fp16 autocast on CUDA
    channels_last: bool = False

    def autocast(self):
        """Autocast context on CUDA, a no-op elsewhere."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move a uint8 batch to the device (non-blocking from pinned memory)."""
        x = x.to(self.device, non_blocking=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)  # batches from workers arrive with NHWC strides


@dataclass
class EpochStats:
    """What one training epoch measured."""

    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        """Training throughput."""
        return self.images / max(self.seconds, 1e-9)


def epoch_image_size(
    image_size: int, epoch: int, epochs: int, schedule: ProgressiveResize | None
) -> int:
    """Side the batches of `epoch` (0-based) train at under `train.progressive_resize`."""
    if schedule is None:
        return image_size
    full = min(round(schedule.full_at * epochs), epochs - 1)  # the last epoch is full size
    if epoch >= full:
        return image_size
    side = schedule.start_size + (image_size - schedule.start_size) * epoch / full
    side = int(side) // schedule.multiple * schedule.multiple
    return min(image_size, max(side, schedule.start_size))


def validates_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """Whether `fit` validates after `epoch` (0-based): not after a downscaled one by default."""
    schedule = cfg.progressive_resize
    if schedule is None or schedule.validate_small:
        return True
    return epoch_image_size(cfg.image_size, epoch, cfg.epochs, schedule) == cfg.image_size


def resize_batch(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Downscale a preprocessed (B, C, S, S) float batch to `size` (antialiased bilinear)."""
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def backward_and_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
) -> None:
    """Backward pass, optional gradient clipping, optimizer step (fp16 loss scaling aware)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_one_epoch(
    model: nn.Module,
    prep: Preprocess,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rt: Runtime,
    *,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[], None] | None = None,
    progress: tqdm | None = None,
    check_every: int = 1,
    size: int | None = None,
) -> EpochStats:
    """One pass over the training batches; NaN / inf losses are caught before they are stepped.

    `size` (progressive resizing) downscales each batch after preprocessing.

    The finiteness check reads the loss on the host, which stalls a GPU's queue; on CUDA it
    therefore runs every `check_every` steps (non-finite losses in between are remembered on the
    device). With several processes the flag is reduced so that every rank stops together.
    """
    model.train()
    t0 = time.perf_counter()
    total_loss = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    bad = torch.zeros((), device=rt.device, dtype=torch.bool)
    seen = 0
    for step, (x, y) in enumerate(batches):
        x, y = rt.to_device(x), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(resize_batch(prep(x), size))  # (B, K)
            loss = loss_fn(logits, y)
        bad |= ~torch.isfinite(loss.detach())
        if step % check_every == 0 and bool(all_reduce_sum(bad.float()) > 0):
            raise NonFiniteLossError(f"the loss is not finite (after {seen + len(y)} images)")
        backward_and_step(loss, model, optimizer, scaler=scaler, grad_clip=grad_clip)
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step()
        n = y.shape[0]
        # Accumulate on device: a .item() per step would force a sync on CUDA.
        total_loss += loss.detach().float() * n
        correct += count_correct(logits.detach(), y)
        seen += n
        if progress is not None:
            progress.update(n)
            if progress.n == n or progress.n % (n * 10) < n:  # refresh the postfix now and then
                elapsed = time.perf_counter() - t0
                progress.set_postfix(
                    loss=f"{total_loss.item() / seen:.4f}",
                    acc=f"{correct.item() / seen:.3f}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                    refresh=False,
                )
    if bool(all_reduce_sum(bad.float()) > 0):
        raise NonFiniteLossError(f"the loss became non-finite in the last {check_every} steps")
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # Sums over every rank (a no-op for one process); the slowest rank sets the pace.
    count = torch.tensor(float(seen), device=rt.device)
    sums = torch.stack([total_loss.double(), correct.double(), count.double()])
    loss_sum, n_correct, n_seen = all_reduce_sum(sums).tolist()
    return EpochStats(
        loss=loss_sum / max(n_seen, 1),
        accuracy=n_correct / max(n_seen, 1),
        images=int(n_seen),
        seconds=seconds,
    )


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions in a batch: arg-max, one binary logit > 0, or every label right.

    The task shows in the shapes: (B, K) targets are multi-label (exact match counts), a single
    logit column is a binary head, anything else is softmax over K classes.
    """
    if y.ndim == 2:
        return ((logits > 0) == (y > 0.5)).all(1).sum()
    if logits.shape[1] == 1:
        return ((logits[:, 0] > 0).long() == y).sum()
    return (logits.argmax(1) == y).sum()


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    prep: Preprocess,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    rt: Runtime,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the model over batches; return (N, K) float32 logits and the batches' labels."""
    model.eval()
    outs, labels = [], []
    for x, y in batches:
        with rt.autocast():
            logits = model(prep(rt.to_device(x)))
        outs.append(logits.float().cpu())
        labels.append(y.cpu())  # a split held on the GPU yields labels there too
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


def cross_entropy_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean validation loss of numpy logits as the task trains it (cross-entropy or BCE).

    Binary cross-entropy for a single logit column or multi-hot labels, else softmax
    cross-entropy; computed from logits already predicted (no second pass).
    """
    if len(labels) == 0:
        return math.nan
    t, y = torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(labels))
    if y.ndim == 2:
        return float(nn.functional.binary_cross_entropy_with_logits(t, y.float()).item())
    if t.shape[1] == 1:
        return float(nn.functional.binary_cross_entropy_with_logits(t[:, 0], y.float()).item())
    return float(nn.functional.cross_entropy(t, y).item())
