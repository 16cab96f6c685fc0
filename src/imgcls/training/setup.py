"""What a training is set up with: device, runtime, optimiser, scheduler, loss, imbalance, seeds."""

from __future__ import annotations

import ctypes
import math
import os
import sys

import numpy as np
import torch
from torch import nn

from imgcls.config import Params, TrainConfig
from imgcls.data.dataset import SplitData
from imgcls.errors import ImgclsError
from imgcls.models.registry import create_model
from imgcls.task import Task, output_units
from imgcls.training.imbalance import (
    ImbalanceError,
    SigmoidBCE,
    WeightedCrossEntropy,
    label_pos_weights,
    loss_class_weights,
    sample_weights,
)
from imgcls.training.loop import Runtime


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


# glibc's mallopt(3) parameters, and its upper limit for the mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024**2


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (Linux only).

    Every training step allocates and frees the same activation-sized blocks. By default glibc
    returns them to the kernel (trimming the heap, unmapping big blocks), and the next step
    page-faults them in again: 1,900-8,700 faults and 3-15 ms of kernel time per step of the
    Fashion-MNIST preset on a 2-core VM, 0-240 faults and <= 0.3 ms with the thresholds raised
    (bench/bench_page_faults.py).
    The process then keeps its peak memory until it exits. False where the libc has no mallopt.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


def configure_backend(cfg: TrainConfig, device: torch.device) -> None:
    """CPU threads, cuDNN autotuning, TF32 and malloc's reuse of freed memory (process-wide)."""
    keep_freed_memory()
    if device.type == "cpu" and isinstance(cfg.cpu_threads, int):
        torch.set_num_threads(cfg.cpu_threads)  # None / unmeasured auto: torch's one per core
    if device.type == "cuda":
        # cuDNN autotuning picks the fastest kernels for our fixed input size; TF32 speeds up
        # whatever still runs in fp32. Both are off when bit-for-bit repeatability is asked for.
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.set_float32_matmul_precision("highest" if cfg.deterministic else "high")


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
    nhwc = cfg.channels_last
    if nhwc == "auto":  # unmeasured (imgcls.training.probe fills in a measured choice)
        # NHWC pays off on CUDA, and on CPU: oneDNN's NCHW convolutions reorder to blocked
        # layouts on every call, and their speed varies from one process to the next (74-120 ms
        # against NHWC's 69-86 ms per step measured on one VM; docs/training.md).
        nhwc = device.type in ("cuda", "cpu")
    return Runtime(device=device, autocast_dtype=dtype, channels_last=bool(nhwc))


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    # The fused kernel: the same update in one pass (CPU: 0.37 instead of 0.9-1.5 ms a step for
    # the Fashion-MNIST preset's net); torch has it for float params on CPU and CUDA.
    params = decay + no_decay
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for p in params
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)


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


def per_process_batch(batch_size: int, world: int) -> int:
    """`train.batch_size` is the global batch: split it evenly over the processes."""
    if batch_size % world:
        raise TrainingError(
            f"train.batch_size {batch_size} is the global batch and must divide evenly over "
            f"{world} processes; use a multiple of {world}"
        )
    return batch_size // world


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
    # Set both ways: a process may train twice (tests, notebooks) with different settings. But
    # only when it changes: the call imports ~900 torch modules (torch._inductor & co, 1.4 s on
    # a quiet 2-core CPU, 3 s on a loaded one) even to switch off what is already off.
    wanted = (deterministic, True)  # (enabled, warn_only)
    current = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if current != wanted and (deterministic or current[0]):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)


def build_model(params: Params, data: SplitData) -> nn.Module:
    """The configured architecture for this data's channels and classes (fresh weights)."""
    return create_model(
        params.model.name,
        in_chans=data.channels,
        num_classes=output_units(data.task, len(data.classes)),
        image_size=params.train.image_size,
        pretrained=params.model.pretrained,
        pretrained_path=params.model.pretrained_path,
        **params.model.kwargs,
    )
