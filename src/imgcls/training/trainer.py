"""`fit`: epochs, validation, best-epoch selection, early stopping, checkpoints and resume."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from imgcls.config import TrainConfig
from imgcls.data.dataset import ImageArrayDataset
from imgcls.errors import ImgclsError
from imgcls.training import checkpoint
from imgcls.training.loop import (
    NonFiniteLossError,
    Preprocess,
    Runtime,
    cross_entropy_from_logits,
    predict_logits,
    train_one_epoch,
)

log = logging.getLogger("imgcls.train")

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingError(ImgclsError):
    """Training could not go on (non-finite loss, bad device request, ...)."""


def select_device(pref: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit request that cannot be met is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'"
        )
    if pref == "mps" and not has_mps:
        raise TrainingError("train.device is 'mps' but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(pref)


def make_runtime(cfg: TrainConfig, device: torch.device) -> Runtime:
    """Autocast dtype and memory format for the device and `train.precision`."""
    dtype = None
    if device.type == "cuda":
        wanted = "bf16" if cfg.precision == "auto" else cfg.precision
        if wanted == "bf16" and not torch.cuda.is_bf16_supported():
            wanted = "fp16"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(wanted)
    return Runtime(
        device=device,
        autocast_dtype=dtype,
        channels_last=cfg.channels_last and device.type == "cuda",
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; no weight decay on biases and norm parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: cosine / constant with linear warmup, one-cycle, or step decay."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TensorBatches:
    """Shuffled mini-batches sliced straight from an in-memory uint8 tensor (no per-item Python)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, pin: bool
    ) -> None:
        self.x = torch.from_numpy(
            np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))
        )  # (N, C, S, S)
        self.y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if pin:
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            if order is None:
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            else:
                idx = order[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]


def make_batches(
    images: np.ndarray,
    labels: np.ndarray,
    transform: Any,
    cfg: TrainConfig,
    *,
    shuffle: bool,
    device: torch.device,
) -> TensorBatches | DataLoader:
    """Fast tensor slicing without augmentation; a DataLoader with workers when augmenting."""
    pin = device.type == "cuda"
    if transform is None or len(transform) == 0:
        return TensorBatches(images, labels, cfg.batch_size, shuffle, pin)
    ds = ImageArrayDataset(images, labels, transform)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        num_workers=cfg.num_workers,
        pin_memory=pin,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator(),
    )


def _reseed(batches: TensorBatches | DataLoader, transform: Any, seed: int, epoch: int) -> None:
    """Per-epoch seeds make a resumed run shuffle and augment exactly like an uninterrupted one."""
    batches.generator.manual_seed(seed * 1000 + epoch)
    if transform is not None and len(transform):
        transform.set_random_seed(seed * 1000 + epoch)


def classification_scores(
    logits: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Loss, accuracy and macro precision / recall / F1 (scikit-learn)."""
    if len(labels) == 0:
        return {}
    pred = logits.argmax(1)
    p, r, f, _ = precision_recall_fscore_support(
        labels, pred, labels=list(range(num_classes)), average="macro", zero_division=0
    )
    return {
        "loss": cross_entropy_from_logits(logits, labels),
        "accuracy": float(accuracy_score(labels, pred)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f),
    }


@dataclass
class FitResult:
    """The trained model (best epoch's weights) and what happened."""

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    best_value: float
    stopped_early: bool
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _better(value: float, best: float, monitor: str) -> bool:
    """Loss-like metrics are minimised, everything else maximised."""
    if math.isnan(value):
        return False
    return value < best if monitor.endswith("loss") else value > best


def fit(
    model: nn.Module,
    prep: Preprocess,
    train_data: tuple[np.ndarray, np.ndarray],
    val_data: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    cfg: TrainConfig,
    *,
    seed: int,
    train_transform: Any = None,
    checkpoint_path: Path | None = None,
    config_hash: str = "",
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> FitResult:
    """Train `model`, validating every epoch; resume a checkpoint of the same config."""
    device = select_device(cfg.device)
    rt = make_runtime(cfg, device)
    model.to(device)
    prep.to(device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    train_batches = make_batches(*train_data, train_transform, cfg, shuffle=True, device=device)
    val_batches = make_batches(*val_data, None, cfg, shuffle=False, device=device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(train_batches))
    scaler = torch.amp.GradScaler("cuda") if rt.autocast_dtype == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step_model = torch.compile(model) if cfg.compile else model
    monitor = cfg.monitor.removeprefix("val_")
    minimise = cfg.monitor.endswith("loss")
    best_value = math.inf if minimise else -math.inf
    best_epoch, start_epoch, history = 0, 0, []
    best_state = copy.deepcopy(model.state_dict())

    if checkpoint_path is not None and checkpoint_path.is_file():
        state = checkpoint.load(checkpoint_path)
        if state.get("config_hash") != config_hash:
            log.warning("checkpoint %s is from a different config; starting fresh", checkpoint_path)
        elif state["epoch"] >= cfg.epochs or state.get("complete"):
            log.info("checkpoint %s is from a finished run; starting fresh", checkpoint_path)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch, history = state["epoch"], state["history"]
            best_value, best_epoch, best_state = (
                state["best_value"],
                state["best_epoch"],
                state["best_state"],
            )
            checkpoint.set_rng_state(state["rng"])
            log.info("resuming from %s after epoch %d", checkpoint_path, start_epoch)

    patience_left = cfg.early_stopping_patience
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        _reseed(train_batches, train_transform, seed, epoch)
        bar = tqdm(
            total=len(train_data[1]),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="img",
            disable=None if progress else True,
            leave=False,
            dynamic_ncols=True,
        )
        lr = optimizer.param_groups[0]["lr"]
        try:
            stats = train_one_epoch(
                step_model,
                prep,
                train_batches,
                optimizer,
                scheduler,
                loss_fn,
                rt,
                grad_clip=cfg.grad_clip,
                scaler=scaler,
                progress=bar,
            )
        except NonFiniteLossError as err:
            raise TrainingError(
                f"training stopped in epoch {epoch + 1}: {err}. "
                f"Try a lower train.lr (now {cfg.lr:g})"
                " or set train.grad_clip; the last good checkpoint is kept"
            ) from None
        finally:
            bar.close()
        val_logits, val_labels = predict_logits(step_model, prep, val_batches, rt)
        val = classification_scores(val_logits, val_labels, num_classes)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "epoch_time_s": stats.seconds,
            "images_per_s": stats.images_per_s,
            **{f"val_{k}": v for k, v in val.items()},
        }
        history.append(row)
        value = val.get(monitor, -stats.loss if not minimise else stats.loss)
        improved = _better(value, best_value, cfg.monitor)
        if improved:
            best_value, best_epoch = value, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
            patience_left = cfg.early_stopping_patience
        elif patience_left is not None:
            patience_left -= 1
        log.info(
            "epoch %d/%d  train_loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %s %.4f%s"
            "  %.0f img/s",
            epoch + 1,
            cfg.epochs,
            stats.loss,
            stats.accuracy,
            val.get("loss", math.nan),
            val.get("accuracy", math.nan),
            cfg.monitor,
            value,
            " *" if improved else "",
            stats.images_per_s,
        )
        stop = patience_left is not None and patience_left <= 0
        if checkpoint_path is not None:
            checkpoint.save(
                checkpoint_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "epoch": epoch + 1,
                    "history": history,
                    "best_value": best_value,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "rng": checkpoint.rng_state(),
                    "config_hash": config_hash,
                    "complete": stop or epoch + 1 == cfg.epochs,
                },
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
        if stop:
            log.info(
                "early stopping: %s did not improve for %d epochs",
                cfg.monitor,
                cfg.early_stopping_patience,
            )
            stopped_early = True
            break
    model.load_state_dict(best_state)
    return FitResult(model, history, best_epoch, float(best_value), stopped_early, start_epoch)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every RNG; optionally ask torch for deterministic kernels."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
