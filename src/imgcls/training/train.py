"""Training as a library: seeds, distributed setup and transforms once, then `fit`.

:func:`train_model` builds the configured model and fits it; the train stage
(:mod:`imgcls.training.stage`) wraps it with the MLflow run and the output files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import imgcls
from imgcls.config import Params
from imgcls.data.augment import build_transform
from imgcls.data.dataset import (
    SplitData,
    channel_stats,
    label_tensor,
    load_split_data,
    read_splits,
)
from imgcls.errors import ImgclsError
from imgcls.models.bundle import Preprocess, WithTTA
from imgcls.task import (
    label_classes,
    order_classes,
    probs_numpy,
    resolve_task,
    tune_thresholds,
)
from imgcls.tracking import RunProcess
from imgcls.training import distributed
from imgcls.training.batches import make_batches
from imgcls.training.checkpoint import read_resume
from imgcls.training.distributed import Dist, gather_objects
from imgcls.training.loop import Runtime, predict_logits
from imgcls.training.probe import ProbeResult, apply_choice, resolve_auto
from imgcls.training.setup import (
    build_model,
    configure_backend,
    make_loss,
    make_optimizer,
    per_process_batch,
    seed_everything,
    select_device,
)
from imgcls.training.trainer import EpochCallback, FitConfig, FitResult, fit

log = logging.getLogger("imgcls.train")


@dataclass(frozen=True)
class TrainContext:
    """Where this process trains and with what augmentation: built once per training."""

    dist: Dist
    device: torch.device
    transform: Any  # augment.train as an albumentations Compose

    @classmethod
    def create(cls, params: Params, dist: Dist | None = None) -> TrainContext:
        """Join the process group (torchrun) and build the transforms (a bad entry fails here)."""
        dist = dist or Dist()
        device = distributed.setup(dist, select_device(params.train.device))
        build_transform(params.augment.eval, "augment.eval")  # fail before training, not after
        return cls(dist, device, build_transform(params.augment.train, "augment.train"))


def load_training_data(
    params: Params, splits_csv: Path, root: Path, cache_dir: Path, *, progress: bool = True
) -> SplitData:
    """splits.csv decoded for training: the task from `model.head` / `data.multi_label`.

    Every image is held to `data.max_image_pixels`, the limit ingest checked it against.
    """
    labels = read_splits(splits_csv)["label"]
    multi = params.data.multi_label
    found = label_classes(labels, "multilabel" if multi else "multiclass")
    task = resolve_task(params.model.head, multi, found)
    return load_split_data(
        splits_csv,
        root,
        params.train.image_size,
        params.train.channels,
        cache_dir,
        classes=order_classes(found, task, params.model.positive_class),
        task=task,
        progress=progress,
        max_pixels=params.data.max_image_pixels,
    )


def config_hash(params: Params, data_key: str) -> str:
    """What a checkpoint must match to be resumed: data, model, augmentation, training, seed."""
    relevant = {k: params.to_dict()[k] for k in ("base", "model", "augment", "train")}
    relevant["train"] = {
        k: v
        for k, v in relevant["train"].items()
        if k not in {"num_workers", "device", "cpu_threads"}
    }
    blob = json.dumps({"params": relevant, "data": data_key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _EpochLog:
    """Each epoch's row to the MLflow run (which must have started), then the caller's hook."""

    run: RunProcess | None
    then: EpochCallback | None

    def __call__(self, epoch: int, row: dict[str, float]) -> None:
        if self.run is not None:
            self.run.check()  # a run that could not be created stops training at the first epoch
            self.run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if self.then is not None:
            self.then(epoch, row)


def train_model(
    params: Params,
    data: SplitData,
    *,
    checkpoint_path: Path | None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    ctx: TrainContext | None = None,
    run: RunProcess | None = None,
    probe_cache: Path | None = None,
) -> tuple[FitResult, dict[str, Any]]:
    """Build the configured model and fit it on the train split, validating on val.

    Resumes `checkpoint_path` when it holds an unfinished training of the same data and params;
    `run` (the train stage's MLflow run, rank 0) is then begun as the checkpoint's run, so one
    run holds every epoch. With several processes (`ctx.dist`, from torchrun) every rank calls
    this; only rank 0 logs, calls `on_epoch_end` and writes the checkpoint.

    With a `probe_cache` folder, `train.precision` / `channels_last` / `cpu_threads: auto` are
    measured on this model at start (or read from that cache): imgcls.training.probe. Without
    one they keep their fixed meaning (tune's trials then all train alike).
    """
    cfg = params.train
    ctx = ctx or TrainContext.create(params)
    dist = ctx.dist
    configure_backend(cfg, ctx.device)  # TF32 / cuDNN autotuning also while the probe times
    seed_everything(params.base.seed, cfg.deterministic)
    train_x, train_y = data.part("train")
    val_x, val_y = data.part("val")
    if len(train_y) == 0:
        raise ImgclsError("the train split is empty; check split fractions in params.yaml")
    mean, std = channel_stats(train_x)
    with distributed.main_first(dist):  # one download into the hub cache, not one per rank
        net = build_model(params, data)
    say = log.info if dist.is_main else _quiet
    probe = None
    if probe_cache is not None:
        probe = probe_settings(params, net, Preprocess(mean, std), data, ctx, probe_cache)
    if probe is not None:
        cfg = apply_choice(cfg, probe.choice)
        say("%s", probe.line())
        if run is not None:
            run.log_params(probe.params())
            run.log_dict(probe.to_dict(), "config/probe.json")
        configure_backend(cfg, ctx.device)  # the chosen thread count
    if dist.rank:  # same initial weights on every rank, but each draws its own dropout masks
        seed_everything(params.base.seed + dist.rank, cfg.deterministic)
    digest = config_hash(params, data.key)
    resume = read_resume(checkpoint_path, digest, cfg.epochs, say)
    run_key = None
    if run is not None:
        run_key = run.begin(
            resume.run_id if resume else None,
            resume_key=resume.run_key if resume else None,
            resumed_from=resume.epoch if resume else 0,
            history=resume.history if resume else (),
        )
    fit_cfg = FitConfig(
        train=cfg,
        seed=params.base.seed,
        device=ctx.device,
        transform=ctx.transform,
        checkpoint_path=checkpoint_path,
        config_hash=digest,
        resume=resume,
        on_epoch_end=_EpochLog(run, on_epoch_end) if run or on_epoch_end else None,
        run_key=run_key,
        run_id=run.known_run_id if run is not None else None,
        progress=progress,
        dist=dist,
        classes=data.classes,
        task=data.task,
    )
    result = fit(
        net, Preprocess(mean, std), (train_x, train_y), (val_x, val_y), len(data.classes), fit_cfg
    )
    result.extra["probe"] = probe.to_dict() if probe is not None else None
    thresholds = None
    if data.task != "multiclass":
        thresholds = val_thresholds(result.model, Preprocess(mean, std), data, params)
    meta = {
        "arch": params.model.name,
        "model_kwargs": params.model.kwargs,
        "classes": data.classes,
        "task": data.task,
        "thresholds": thresholds,  # binary / multilabel decision thresholds, tuned on val
        "threshold_metric": cfg.threshold_metric if thresholds else None,
        "image_size": cfg.image_size,
        "tta": params.model.tta,  # applied by every user of the file (ImageClassifier)
        "channels": data.channels,
        "mean": mean,
        "std": std,
        "resize": "bilinear, stretched to a square",
        "input": "uint8 (B, H, W, C) RGB or grayscale",
        "best_epoch": result.best_epoch,
        "monitor": cfg.monitor,
        "monitor_value": result.best_value,
        "weights": "ema" if cfg.ema_decay else "trained",  # which weights the best epoch kept
        "class_weights": result.extra["class_weights"],  # as applied to the loss
        "sampler": cfg.sampler,
        "imgcls_version": imgcls.__version__,
        # What `imgcls predict` and serving accept per image: the limit this project set for
        # its own data (ingest, validate, the decode cache), not Pillow's default.
        "limits": {"max_image_pixels": params.data.max_image_pixels},
    }
    return result, meta


def _quiet(*_: Any) -> None:
    """Logger stand-in for ranks other than 0."""


def probe_settings(
    params: Params,
    net: nn.Module,
    prep: Preprocess,
    data: SplitData,
    ctx: TrainContext,
    cache: Path,
) -> ProbeResult | None:
    """The `auto` settings' probe on this model and a real train batch (rank 0 decides).

    Under torchrun rank 0 measures (or reads its cache) and every rank takes its choice, so
    all ranks train alike even where their caches or timings would differ.
    """
    cfg, dist = params.train, ctx.dist
    result = None
    if dist.is_main:
        images, labels = data.part("train")
        n = per_process_batch(cfg.batch_size, dist.world_size)
        batch = (
            torch.from_numpy(np.ascontiguousarray(np.asarray(images[:n]).transpose(0, 3, 1, 2))),
            label_tensor(np.asarray(labels[:n])),
        )
        # Dropout rates change no step's cost: left out, tune's trials share one probe.
        kwargs = {k: v for k, v in params.model.kwargs.items() if "drop" not in k}
        arch = json.dumps([params.model.name, kwargs], sort_keys=True, default=str)
        t0 = time.perf_counter()
        _, result = resolve_auto(
            cfg,
            net,
            prep,
            make_loss(cfg, None, data.task),
            batch,
            ctx.device,
            arch=arch,
            cache_dir=cache,
            make_optimizer=lambda m: make_optimizer(m, cfg),
            world=dist.world_size,
            train_steps=cfg.epochs * math.ceil(len(labels) / cfg.batch_size),
        )
        if result is not None:
            result.seconds = round(time.perf_counter() - t0, 2)  # the cache read included
    if dist.enabled:
        shared = gather_objects(result.to_dict() if result is not None else None)[0]
        result = ProbeResult.from_dict(shared) if shared is not None else None
    return result


def val_thresholds(
    model: nn.Module, prep: Preprocess, data: SplitData, params: Params
) -> list[float] | None:
    """Decision thresholds that maximise `train.threshold_metric` on the val split.

    Without val images there is nothing honest to tune on: the thresholds stay at 0.5 (the test
    split must never choose them).
    """
    images, labels = data.part("val")
    if len(labels) == 0:
        return tune_thresholds(data.task, labels[:0], np.zeros((0, len(data.classes))))
    device = next(model.parameters()).device
    batches = make_batches(
        images,
        labels,
        None,
        params.evaluate.batch_size,
        shuffle=False,
        device=device,
        num_workers=0,
    )
    # tuned on what the model file will answer: with its test-time augmentation, if any
    net = WithTTA(model, params.model.tta) if params.model.tta != "none" else model
    logits, _ = predict_logits(net, prep.to(device), batches, Runtime(device=device))
    probs = probs_numpy(data.task, logits)
    return tune_thresholds(data.task, labels, probs, params.train.threshold_metric)


# What `metrics/train.json` keeps for DVC's tables (the stage adds its `timing` parts); the
# best epoch's whole row (per-class val recall, lr, throughput) goes to the details file.
TRAIN_HEADLINE_KEYS = ("best_epoch", "epochs_run", "train_time_s", "val_accuracy", "val_loss")


def train_metrics(result: FitResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """(headline for metrics/train.json, every figure of the best epoch for the details file)."""
    history = pd.DataFrame(result.history)
    best = history[history["epoch"] == result.best_epoch].iloc[0].to_dict()
    details: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(history),
        "stopped_early": result.stopped_early,
        # every epoch's own time, resumed ones included: the cost of this model, not of one run
        "train_time_s": round(float(history["epoch_time_s"].sum()), 1),
        **{k: float(v) for k, v in best.items() if k != "epoch"},
    }
    headline = {k: details[k] for k in TRAIN_HEADLINE_KEYS if k in details}
    return headline, details
