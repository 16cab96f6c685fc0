"""`fit`: epochs, validation, best-epoch selection, early stopping, checkpoints and resume."""

from __future__ import annotations

import copy
import logging
import math
import os
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
from imgcls.errors import ImgclsError
from imgcls.evaluation.metrics import safe_name  # evaluate's per-class key rule
from imgcls.task import Task, output_units
from imgcls.training import checkpoint, distributed
from imgcls.training.batches import auto_workers, make_batches, set_epoch, shard_rows
from imgcls.training.distributed import Dist, gather_objects, gather_rows
from imgcls.training.ema import ModelEma
from imgcls.training.imbalance import (
    ImbalanceError,
    SigmoidBCE,
    WeightedCrossEntropy,
    describe_weights,
    label_pos_weights,
    loss_class_weights,
    sample_weights,
)
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

# Per-class validation recall goes into every epoch row (history, train.json, MLflow) up to this
# many classes; beyond that the rows would be mostly columns (evaluate reports every class).
PER_CLASS_MAX = 50


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
    elif cfg.precision == "bf16":
        dtype = torch.bfloat16  # CPU autocast: pays off on CPUs with AMX / AVX-512 BF16
    elif cfg.precision == "fp16":
        raise TrainingError(
            f"train.precision fp16 needs a CUDA GPU (device is {device.type}); "
            "use bf16 or fp32 (auto)"
        )
    # NHWC pays off on CUDA, and on CPU only with bf16 (oneDNN's AMX kernels want it).
    nhwc = device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16)
    return Runtime(device=device, autocast_dtype=dtype, channels_last=cfg.channels_last and nhwc)


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


def make_loss(
    cfg: TrainConfig, class_weights: np.ndarray | None = None, task: Task = "multiclass"
) -> nn.Module:
    """The task's loss, optionally class-weighted and label-smoothed (the one place that maps).

    multiclass: softmax cross-entropy; binary: BCE on the single logit (`class_weights` (2,)
    per image); multilabel: BCE per label (`class_weights` (K,) are positive weights).
    """
    weight = None if class_weights is None else torch.as_tensor(class_weights).float()
    if task == "binary":
        return SigmoidBCE(weight=weight, label_smoothing=cfg.label_smoothing)
    if task == "multilabel":
        return SigmoidBCE(pos_weight=weight, label_smoothing=cfg.label_smoothing)
    if weight is None:
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return WeightedCrossEntropy(weight, label_smoothing=cfg.label_smoothing)


def imbalance_setup(
    cfg: TrainConfig, labels: np.ndarray, names: list[str], task: Task
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Loss weights and per-image draw probabilities for `train.class_weights` / `sampler`."""
    if task == "multilabel":
        if cfg.sampler == "balanced":
            raise ImbalanceError(
                "train.sampler: balanced draws every class equally often, but multi-label "
                "images belong to several labels; use train.sampler: shuffle with "
                "train.class_weights: balanced (per-label positive weights) instead"
            )
        return label_pos_weights(cfg.class_weights, labels, names), None
    weights = loss_class_weights(cfg.class_weights, labels, names)
    probs = sample_weights(labels, len(names)) if cfg.sampler == "balanced" else None
    return weights, probs


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


def per_process_batch(batch_size: int, world: int) -> int:
    """`train.batch_size` is the global batch: split it evenly over the processes."""
    if batch_size % world:
        raise TrainingError(
            f"train.batch_size {batch_size} is the global batch and must divide evenly over "
            f"{world} processes; use a multiple of {world}"
        )
    return batch_size // world


@dataclass
class _Resume:
    """What a usable checkpoint restores."""

    epoch: int
    state: dict[str, Any]


def _read_checkpoint(
    path: Path | None, config_hash: str, epochs: int, say: Callable[..., None]
) -> _Resume | None:
    """The checkpoint to resume from, or None; either way the log says which and why."""
    if path is None:
        return None
    if not path.is_file():
        say("no checkpoint at %s: starting fresh", path)
        return None
    try:
        state = checkpoint.load(path)
    except Exception as err:  # a foreign or damaged file must not block a fresh start
        say("checkpoint %s is unreadable (%s): starting fresh", path, type(err).__name__)
        return None
    if state.get("config_hash") != config_hash:
        say(
            "checkpoint %s was written for other data or params (model / augment / train / seed):"
            " starting fresh",
            path,
        )
        return None
    if state.get("complete") or state["epoch"] >= epochs:
        say("checkpoint %s is from a finished run: starting fresh", path)
        return None
    say("resuming from %s: %d of %d epochs already done", path, state["epoch"], epochs)
    return _Resume(int(state["epoch"]), state)


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
    dist: Dist | None = None,
    classes: list[str] | None = None,
    task: Task = "multiclass",
) -> FitResult:
    """Train `model`, validating every epoch; resume a checkpoint of the same config.

    With several processes (`dist`), every rank trains on its share of each global batch under
    DDP, validation predictions are gathered so that every rank computes the same metrics (and
    takes the same early-stopping decision), and only rank 0 logs and writes the checkpoint.
    `classes` (names of the label indices) enables `train.class_weights` given as a mapping and
    the per-class validation recall in each epoch row. `task` picks the loss and the scores
    (imgcls.task): labels are (N,) class indices, or (N, K) multi-hot for multilabel.
    """
    dist = dist or Dist()
    device = distributed.setup(dist, select_device(cfg.device))
    rt = make_runtime(cfg, device)
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if device.type == "cuda":
        # cuDNN autotuning picks the fastest kernels for our fixed input size; TF32 speeds up
        # whatever still runs in fp32. Both are off when bit-for-bit repeatability is asked for.
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.set_float32_matmul_precision("highest" if cfg.deterministic else "high")
    say = log.info if dist.is_main else _quiet
    model.to(device)
    prep.to(device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    workers = cfg.num_workers
    if workers == "auto":
        workers = auto_workers(device, dist.world_size)
    names = classes or [str(i) for i in range(num_classes)]
    # From the full train labels, which every rank holds: identical weights on every rank.
    class_weights, sample_probs = imbalance_setup(cfg, train_data[1], names, task)
    if class_weights is not None or sample_probs is not None:
        say(
            "imbalance: class_weights %s, sampler %s",
            describe_weights(class_weights, names),
            cfg.sampler,
        )
    if class_weights is not None and sample_probs is not None and dist.is_main:
        log.warning(
            "train.class_weights and train.sampler: balanced both correct for imbalance; "
            "together they usually over-correct (the rare classes then dominate)"
        )
    train_batches = make_batches(
        *train_data,
        train_transform,
        per_process_batch(cfg.batch_size, dist.world_size),
        shuffle=True,
        device=device,
        num_workers=workers,
        rank=dist.rank,
        world=dist.world_size,
        sample_probs=sample_probs,
    )
    rows = shard_rows(len(val_data[1]), dist.rank, dist.world_size)
    val_batches = make_batches(
        np.asarray(val_data[0])[rows],
        np.asarray(val_data[1])[rows],
        None,
        cfg.batch_size,
        shuffle=False,
        device=device,
        num_workers=0,
    )
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(train_batches))
    scaler = torch.amp.GradScaler("cuda") if rt.autocast_dtype == torch.float16 else None
    loss_fn = make_loss(cfg, class_weights, task).to(device)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None
    train_net: nn.Module = model
    if dist.enabled:
        # 1-channel convs give gradients whose strides DDP's buckets do not expect: harmless.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        train_net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_net = torch.compile(train_net)
    # Validation runs on the plain model (DDP would try to sync buffers) or on the EMA copy.
    eval_net: nn.Module = ema.module if ema else train_net if not dist.enabled else model
    # Host-side NaN checks stall the GPU's queue, so CUDA checks every few steps.
    check_every = 25 if device.type == "cuda" else 1
    monitor = cfg.monitor.removeprefix("val_")
    minimise = cfg.monitor.endswith("loss")
    best_value = math.inf if minimise else -math.inf
    best_epoch, start_epoch, history = 0, 0, []
    best_state = copy.deepcopy(model.state_dict())

    patience_left = cfg.early_stopping_patience
    resume = _read_checkpoint(checkpoint_path, config_hash, cfg.epochs, say)
    if resume is not None:
        state = resume.state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        start_epoch, history = resume.epoch, state["history"]
        best_value, best_epoch, best_state = (
            state["best_value"],
            state["best_epoch"],
            state["best_state"],
        )
        patience_left = state.get("patience_left", patience_left)
        per_rank = state.get("rng_per_rank") or []
        checkpoint.set_rng_state(
            per_rank[dist.rank] if len(per_rank) == dist.world_size else state["rng"]
        )

    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        set_epoch(train_batches, seed, epoch)
        bar = tqdm(
            total=math.ceil(len(train_data[1]) / dist.world_size),  # this rank's images
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="img",
            disable=None if progress and dist.is_main else True,
            leave=False,
            dynamic_ncols=True,
        )
        lr = optimizer.param_groups[0]["lr"]
        try:
            stats = train_one_epoch(
                train_net,
                prep,
                train_batches,
                optimizer,
                scheduler,
                loss_fn,
                rt,
                grad_clip=cfg.grad_clip,
                scaler=scaler,
                on_step=(lambda: ema.update(model)) if ema else None,
                progress=bar,
                check_every=check_every,
            )
        except NonFiniteLossError as err:
            raise TrainingError(
                f"training stopped in epoch {epoch + 1}: {err}. "
                f"Try a lower train.lr (now {cfg.lr:g})"
                " or set train.grad_clip; the last good checkpoint is kept"
            ) from None
        finally:
            bar.close()
        val_logits, val_labels = predict_logits(eval_net, prep, val_batches, rt)
        if len(val_labels) == 0:
            val_logits = np.zeros((0, output_units(task, num_classes)), np.float32)
        val_logits, val_labels = gather_rows(val_logits), gather_rows(val_labels)
        val = classification_scores(
            val_logits,
            val_labels,
            num_classes,
            names if num_classes <= PER_CLASS_MAX else None,
            task,
        )
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
            best_state = copy.deepcopy((ema.module if ema else model).state_dict())
            patience_left = cfg.early_stopping_patience
        elif patience_left is not None:
            patience_left -= 1
        say(
            "epoch %d/%d  train_loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %s %.4f%s"
            "  %.0f img/s  %.1fs",
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
            stats.seconds,
        )
        stop = patience_left is not None and patience_left <= 0
        if checkpoint_path is not None:
            rng_per_rank = gather_objects(checkpoint.rng_state())  # collective: every rank
            if dist.is_main:
                checkpoint.save(
                    checkpoint_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler else None,
                        "ema": ema.state_dict() if ema else None,
                        "epoch": epoch + 1,
                        "history": history,
                        "best_value": best_value,
                        "best_epoch": best_epoch,
                        "best_state": best_state,
                        "patience_left": patience_left,
                        "rng": rng_per_rank[0],
                        "rng_per_rank": rng_per_rank if dist.enabled else None,
                        "world_size": dist.world_size,
                        "config_hash": config_hash,
                        "complete": stop or epoch + 1 == cfg.epochs,
                    },
                )
        if on_epoch_end is not None and dist.is_main:
            on_epoch_end(epoch + 1, row)
        if stop:
            say(
                "early stopping: %s did not improve for %d epochs",
                cfg.monitor,
                cfg.early_stopping_patience,
            )
            stopped_early = True
            break
    model.load_state_dict(best_state)
    extra = {"class_weights": describe_weights(class_weights, names), "sampler": cfg.sampler}
    return FitResult(
        model, history, best_epoch, float(best_value), stopped_early, start_epoch, extra
    )


def _quiet(*_: Any) -> None:
    """Logger stand-in for ranks other than 0."""


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every RNG; optionally ask torch for deterministic kernels."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is only repeatable with a fixed workspace; must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # Set both ways: a process may train twice (tests, notebooks) with different settings.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
