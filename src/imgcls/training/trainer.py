"""`fit`: the epoch loop (train, validate, best epoch, early stopping, checkpoint, resume).

Everything it is set up with (device, optimiser, scheduler, loss, imbalance) comes from
:mod:`imgcls.training.setup`; reading the checkpoint to resume is the caller's
(:func:`imgcls.training.checkpoint.read_resume`), so that the caller knows before the first
epoch whether, and from which MLflow run, the training goes on.

Long because the epoch loop, its scoring and its per-epoch timing read one another's state at
every step; split, they would pass a dozen values back and forth.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from imgcls.config import TrainConfig
from imgcls.models.bundle import Preprocess
from imgcls.task import Task, output_units, safe_name
from imgcls.training import checkpoint
from imgcls.training.batches import (
    TensorBatches,
    auto_workers,
    make_batches,
    set_epoch,
    shard_rows,
)
from imgcls.training.checkpoint import TrainState
from imgcls.training.distributed import Dist, gather_objects, gather_rows
from imgcls.training.ema import ModelEma
from imgcls.training.imbalance import describe_weights
from imgcls.training.loop import (
    NonFiniteLossError,
    Runtime,
    cross_entropy_from_logits,
    epoch_image_size,
    predict_logits,
    train_one_epoch,
    validates_epoch,
)
from imgcls.training.setup import (
    TrainingError,
    imbalance_setup,
    make_loss,
    make_optimizer,
    make_runtime,
    make_scheduler,
    per_process_batch,
    select_device,
)

log = logging.getLogger("imgcls.train")

EpochCallback = Callable[[int, dict[str, float]], None]

# Per-class validation recall goes into every epoch row (history, train.json, MLflow) up to this
# many classes; beyond that the rows would be mostly columns (evaluate reports every class).
PER_CLASS_MAX = 50


@dataclass
class FitConfig:
    """How :func:`fit` trains, besides the model and the data."""

    train: TrainConfig
    seed: int
    device: torch.device | None = None  # None: `train.device` (already set up by the caller)
    transform: Any = None  # albumentations train augmentation
    checkpoint_path: Path | None = None  # written after every epoch (rank 0)
    config_hash: str = ""  # stored in the checkpoint: what it is valid for
    resume: TrainState | None = None  # from `checkpoint.read_resume`
    on_epoch_end: EpochCallback | None = None  # rank 0, after the epoch's checkpoint
    # The MLflow run, stored in every checkpoint so that a resumed training continues it: its
    # key at once, its id as soon as known (never waited for: the logger runs at low priority).
    run_key: str | None = None
    run_id: Callable[[], str | None] | None = None
    progress: bool = True
    dist: Dist = field(default_factory=Dist)
    classes: list[str] | None = None  # names of the label indices (per-class recall, weights)
    task: Task = "multiclass"


def classification_scores(
    logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    classes: list[str] | None = None,
    task: Task = "multiclass",
) -> dict[str, float]:
    """Loss, accuracy, macro precision / recall / F1 and, given `classes`, per-class recall.

    Binary and multi-label heads are scored at the default 0.5 threshold (the tuned thresholds
    come from the best epoch, after training); multi-label `accuracy` is the exact-match
    (subset) accuracy, and `f1_micro` is added.
    """
    if len(labels) == 0:
        return {}
    if task == "multilabel":
        pred = (logits > 0).astype(np.int64)
        label_ids = list(range(num_classes))
    elif task == "binary":
        pred = (logits[:, 0] > 0).astype(np.int64)
        label_ids = [0, 1]
    else:
        pred = logits.argmax(1)
        label_ids = list(range(num_classes))
    p, r, f, _ = precision_recall_fscore_support(
        labels, pred, labels=label_ids, average="macro", zero_division=0
    )
    out = {
        "loss": cross_entropy_from_logits(logits, labels),
        "accuracy": float(accuracy_score(labels, pred)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f),
    }
    if task == "multilabel":
        _, _, f_micro, _ = precision_recall_fscore_support(
            labels, pred, labels=label_ids, average="micro", zero_division=0
        )
        out["f1_micro"] = float(f_micro)
    if classes:
        # Macro figures hide a rare class that is never predicted; its own recall shows it.
        _, recall, _, _ = precision_recall_fscore_support(
            labels, pred, labels=label_ids, average=None, zero_division=0
        )
        for name, value in zip(classes, recall, strict=True):
            key = f"recall_{safe_name(name)}"
            out[key if key not in out else f"recall_class_{safe_name(name)}"] = float(value)
    return out


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


@dataclass
class _Parts:
    """What one training is made of (built once by :func:`_build`)."""

    rt: Runtime
    train_batches: Any
    val_batches: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    ema: ModelEma | None
    train_net: nn.Module
    eval_net: nn.Module
    class_weights: np.ndarray | None


def _build(
    model: nn.Module,
    prep: Preprocess,
    train_data: tuple[np.ndarray, np.ndarray],
    val_data: tuple[np.ndarray, np.ndarray],
    names: list[str],
    cfg: FitConfig,
    device: torch.device,
) -> _Parts:
    """Runtime, batches, optimiser, scheduler, loss, EMA and the (DDP / compiled) network."""
    tc, dist = cfg.train, cfg.dist
    rt = make_runtime(tc, device)
    model.to(device)
    prep.to(device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    workers = tc.num_workers
    if workers == "auto":
        workers = auto_workers(device, dist.world_size)
    # From the full train labels, which every rank holds: identical weights on every rank.
    class_weights, sample_probs = imbalance_setup(tc, train_data[1], names, cfg.task)
    if dist.is_main and (class_weights is not None or sample_probs is not None):
        log.info(
            "imbalance: class_weights %s, sampler %s",
            describe_weights(class_weights, names),
            tc.sampler,
        )
    if class_weights is not None and sample_probs is not None and dist.is_main:
        log.warning(
            "train.class_weights and train.sampler: balanced both correct for imbalance; "
            "together they usually over-correct (the rare classes then dominate)"
        )
    train_batches = make_batches(
        *train_data,
        cfg.transform,
        per_process_batch(tc.batch_size, dist.world_size),
        shuffle=True,
        device=device,
        num_workers=workers,
        rank=dist.rank,
        world=dist.world_size,
        sample_probs=sample_probs,
        batched_augment=tc.batched_augment,
    )
    if dist.is_main and cfg.transform is not None and len(cfg.transform):
        on_batches = isinstance(train_batches, TensorBatches)  # with a transform: batched
        log.info(
            "augment.train: %s",
            f"on whole batches ({train_batches.augment})"
            if on_batches
            else "per image by albumentations, "
            + (f"{workers} DataLoader workers" if workers else "in the training process"),
        )
    rows = shard_rows(len(val_data[1]), dist.rank, dist.world_size)
    val_batches = make_batches(
        np.asarray(val_data[0])[rows],
        np.asarray(val_data[1])[rows],
        None,
        tc.batch_size,
        shuffle=False,
        device=device,
        num_workers=0,
    )
    optimizer = make_optimizer(model, tc)
    scheduler = make_scheduler(optimizer, tc, len(train_batches))
    scaler = torch.amp.GradScaler("cuda") if rt.autocast_dtype == torch.float16 else None
    ema = ModelEma(model, tc.ema_decay) if tc.ema_decay else None
    train_net: nn.Module = model
    if dist.enabled:
        # 1-channel convs give gradients whose strides DDP's buckets do not expect: harmless.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        train_net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tc.compile:
        train_net = torch.compile(train_net)
    # Validation runs on the plain model (DDP would try to sync buffers) or on the EMA copy.
    eval_net: nn.Module = ema.module if ema else train_net if not dist.enabled else model
    return _Parts(
        rt,
        train_batches,
        val_batches,
        optimizer,
        scheduler,
        scaler,
        make_loss(tc, class_weights, cfg.task).to(device),
        ema,
        train_net,
        eval_net,
        class_weights,
    )


def _restore(model: nn.Module, parts: _Parts, state: TrainState, dist: Dist) -> None:
    """Load a checkpoint's model, optimiser, scheduler, scaler, EMA and RNG states."""
    model.load_state_dict(state.model)
    parts.optimizer.load_state_dict(state.optimizer)
    parts.scheduler.load_state_dict(state.scheduler)
    if parts.scaler is not None and state.scaler:
        parts.scaler.load_state_dict(state.scaler)
    if parts.ema is not None and state.ema:
        parts.ema.load_state_dict(state.ema)
    per_rank = state.rng_per_rank or []
    checkpoint.set_rng_state(per_rank[dist.rank] if len(per_rank) == dist.world_size else state.rng)


def fit(
    model: nn.Module,
    prep: Preprocess,
    train_data: tuple[np.ndarray, np.ndarray],
    val_data: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    cfg: FitConfig,
) -> FitResult:
    """Train `model`, validating every full-size epoch; go on from `cfg.resume` if given.

    With several processes (`cfg.dist`), every rank trains on its share of each global batch
    under DDP, validation predictions are gathered so that every rank computes the same metrics
    (and takes the same early-stopping decision), and only rank 0 logs and writes the
    checkpoint. `cfg.task` picks the loss and the scores (imgcls.task): labels are (N,) class
    indices, or (N, K) multi-hot for multilabel.
    """
    tc, dist = cfg.train, cfg.dist
    device = cfg.device or select_device(tc.device)
    say = log.info if dist.is_main else _quiet
    names = cfg.classes or [str(i) for i in range(num_classes)]
    parts = _build(model, prep, train_data, val_data, names, cfg, device)
    # Host-side NaN checks stall the GPU's queue, so CUDA checks every few steps.
    check_every = 25 if device.type == "cuda" else 1
    monitor = tc.monitor.removeprefix("val_")
    minimise = tc.monitor.endswith("loss")
    best_value = math.inf if minimise else -math.inf
    best_epoch, start_epoch, history = 0, 0, []
    best_state = copy.deepcopy(model.state_dict())
    patience_left = tc.early_stopping_patience
    if cfg.resume is not None:
        state = cfg.resume
        _restore(model, parts, state, dist)
        start_epoch, history = state.epoch, state.history
        best_value, best_epoch, best_state = state.best_value, state.best_epoch, state.best_state
        patience_left = state.patience_left

    ema = parts.ema
    stopped_early = False
    timing: list[dict[str, float]] = []  # this process's epochs: where each one's time went
    for epoch in range(start_epoch, tc.epochs):
        set_epoch(parts.train_batches, cfg.seed, epoch)
        size = epoch_image_size(tc.image_size, epoch, tc.epochs, tc.progressive_resize)
        smaller = size != tc.image_size  # progressive resizing: this epoch trains downscaled
        bar = tqdm(
            total=math.ceil(len(train_data[1]) / dist.world_size),  # this rank's images
            desc=f"epoch {epoch + 1}/{tc.epochs}" + (f" @{size}px" if smaller else ""),
            unit="img",
            disable=None if cfg.progress and dist.is_main else True,
            leave=False,
            dynamic_ncols=True,
        )
        lr = parts.optimizer.param_groups[0]["lr"]
        try:
            stats = train_one_epoch(
                parts.train_net,
                prep,
                parts.train_batches,
                parts.optimizer,
                parts.scheduler,
                parts.loss_fn,
                parts.rt,
                grad_clip=tc.grad_clip,
                scaler=parts.scaler,
                on_step=(lambda: ema.update(model)) if ema else None,
                progress=bar,
                check_every=check_every,
                size=size if smaller else None,  # full size: batches as augmentation made them
            )
        except NonFiniteLossError as err:
            raise TrainingError(
                f"training stopped in epoch {epoch + 1}: {err}. "
                f"Try a lower train.lr (now {tc.lr:g})"
                " or set train.grad_clip; the last good checkpoint is kept"
            ) from None
        finally:
            bar.close()
        t_val = time.perf_counter()
        validate = validates_epoch(tc, epoch)  # progressive resizing: full-size epochs only
        val = _validate(parts, prep, num_classes, names, cfg) if validate else {}
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
        t_checkpoint = time.perf_counter()
        improved = False
        if validate:
            value = val.get(monitor, -stats.loss if not minimise else stats.loss)
            improved = _better(value, best_value, tc.monitor)
            if improved:
                best_value, best_epoch = value, epoch + 1
                best_state = copy.deepcopy((ema.module if ema else model).state_dict())
                patience_left = tc.early_stopping_patience
            elif patience_left is not None:
                patience_left -= 1
            say(
                "epoch %d/%d  train_loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %s %.4f%s"
                "  %.0f img/s  %.1fs",
                epoch + 1,
                tc.epochs,
                stats.loss,
                stats.accuracy,
                val.get("loss", math.nan),
                val.get("accuracy", math.nan),
                tc.monitor,
                value,
                " *" if improved else "",
                stats.images_per_s,
                stats.seconds,
            )
        else:
            say(
                "epoch %d/%d @%dpx  train_loss %.4f  acc %.4f  (validated at full size only)"
                "  %.0f img/s  %.1fs",
                epoch + 1,
                tc.epochs,
                size,
                stats.loss,
                stats.accuracy,
                stats.images_per_s,
                stats.seconds,
            )
        stop = patience_left is not None and patience_left <= 0
        if cfg.checkpoint_path is not None:
            rng_per_rank = gather_objects(checkpoint.rng_state())  # collective: every rank
            if dist.is_main:
                TrainState(
                    model=model.state_dict(),
                    optimizer=parts.optimizer.state_dict(),
                    scheduler=parts.scheduler.state_dict(),
                    scaler=parts.scaler.state_dict() if parts.scaler else None,
                    ema=ema.state_dict() if ema else None,
                    epoch=epoch + 1,
                    history=history,
                    best_value=best_value,
                    best_epoch=best_epoch,
                    best_state=best_state,
                    patience_left=patience_left,
                    rng=rng_per_rank[0],
                    rng_per_rank=rng_per_rank if dist.enabled else None,
                    world_size=dist.world_size,
                    config_hash=cfg.config_hash,
                    complete=stop or epoch + 1 == tc.epochs,
                    run_id=cfg.run_id() if cfg.run_id else None,
                    run_key=cfg.run_key,
                ).save(cfg.checkpoint_path)
        t_log = time.perf_counter()
        if cfg.on_epoch_end is not None and dist.is_main:
            cfg.on_epoch_end(epoch + 1, row)
        timing.append(
            {
                "epoch": epoch + 1,
                "train_s": round(stats.seconds, 3),
                "image_size": size,  # progressive resizing: the side this epoch trained at
                "val_s": round(t_checkpoint - t_val, 3),
                "checkpoint_s": round(t_log - t_checkpoint, 3),  # best-state copy + file
                "log_s": round(time.perf_counter() - t_log, 3),  # queued to the logger
            }
        )
        if stop:
            say(
                "early stopping: %s did not improve for %d epochs",
                tc.monitor,
                tc.early_stopping_patience,
            )
            stopped_early = True
            break
    model.load_state_dict(best_state)
    extra = {
        "class_weights": describe_weights(parts.class_weights, names),
        "sampler": tc.sampler,
        "timing": timing,
    }
    return FitResult(
        model, history, best_epoch, float(best_value), stopped_early, start_epoch, extra
    )


def _validate(
    parts: _Parts, prep: Preprocess, num_classes: int, names: list[str], cfg: FitConfig
) -> dict[str, float]:
    """Scores of the validation split (gathered from every rank), keys without `val_`."""
    logits, labels = predict_logits(parts.eval_net, prep, parts.val_batches, parts.rt)
    if len(labels) == 0:
        logits = np.zeros((0, output_units(cfg.task, num_classes)), np.float32)
    logits, labels = gather_rows(logits), gather_rows(labels)
    per_class = names if num_classes <= PER_CLASS_MAX else None
    return classification_scores(logits, labels, num_classes, per_class, cfg.task)


def _quiet(*_: Any) -> None:
    """Logger stand-in for ranks other than 0."""
