"""Everything the train stage does between reading `splits.csv` and writing `models/model.pt`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

import imgcls
from imgcls.config import Params
from imgcls.data.augment import build_transform

# SplitData / load_split_data live in imgcls.data.dataset; re-exported here for existing callers.
from imgcls.data.dataset import SplitData, channel_stats, read_splits
from imgcls.data.dataset import load_split_data as load_split_data
from imgcls.data.dataset import split_data as _split_data
from imgcls.errors import ImgclsError
from imgcls.models.registry import create_model
from imgcls.task import (
    label_classes,
    order_classes,
    output_units,
    probs_numpy,
    resolve_task,
    tune_thresholds,
)
from imgcls.training import distributed
from imgcls.training.batches import make_batches
from imgcls.training.distributed import Dist
from imgcls.training.loop import Preprocess, Runtime, predict_logits
from imgcls.training.trainer import (
    EpochCallback,
    FitResult,
    fit,
    seed_everything,
    select_device,
)


def load_training_data(
    params: Params, splits_csv: Path, root: Path, cache_dir: Path, *, progress: bool = True
) -> SplitData:
    """splits.csv decoded for training: the task from `model.head` / `data.multi_label`.

    Every image is held to `data.max_image_pixels`, the limit ingest checked it against.
    """
    frame = read_splits(splits_csv)
    multi = params.data.multi_label
    found = label_classes(frame["label"], "multilabel" if multi else "multiclass")
    task = resolve_task(params.model.head, multi, found)
    classes = order_classes(found, task, params.model.positive_class)
    cfg = params.train
    return _split_data(
        frame,
        splits_csv,
        root,
        cfg.image_size,
        cfg.channels,
        cache_dir,
        classes,
        task,
        progress,
        params.data.max_image_pixels,
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


def train_model(
    params: Params,
    data: SplitData,
    *,
    checkpoint_path: Path | None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    dist: Dist | None = None,
) -> tuple[FitResult, dict[str, Any]]:
    """Build the configured model and fit it on the train split, validating on val.

    With several processes (`dist`, from torchrun) every rank calls this; only rank 0 logs,
    calls `on_epoch_end` and writes the checkpoint.
    """
    cfg = params.train
    dist = dist or Dist()
    seed_everything(params.base.seed, cfg.deterministic)
    train_x, train_y = data.part("train")
    val_x, val_y = data.part("val")
    if len(train_y) == 0:
        raise ImgclsError("the train split is empty; check split fractions in params.yaml")
    mean, std = channel_stats(train_x)
    distributed.setup(dist, select_device(cfg.device))
    with distributed.main_first(dist):  # one download into the hub cache, not one per rank
        net = build_model(params, data)
    if dist.rank:  # same initial weights on every rank, but each draws its own dropout masks
        seed_everything(params.base.seed + dist.rank, cfg.deterministic)
    transform = build_transform(params.augment.train, "augment.train")
    result = fit(
        net,
        Preprocess(mean, std),
        (train_x, train_y),
        (val_x, val_y),
        len(data.classes),
        cfg,
        seed=params.base.seed,
        train_transform=transform,
        checkpoint_path=checkpoint_path,
        config_hash=config_hash(params, data.key),
        on_epoch_end=on_epoch_end,
        progress=progress,
        dist=dist,
        classes=data.classes,
        task=data.task,
    )
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
    logits, _ = predict_logits(model, prep.to(device), batches, Runtime(device=device))
    probs = probs_numpy(data.task, logits)
    return tune_thresholds(data.task, labels, probs, params.train.threshold_metric)


# What `metrics/train.json` keeps for DVC's tables; the best epoch's whole row (per-class val
# recall, lr, throughput) goes to the details file.
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
