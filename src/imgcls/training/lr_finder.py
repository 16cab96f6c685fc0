"""Learning-rate range test: ramp the LR exponentially over mini-batches and watch the loss.

Leslie Smith's LR range test as popularised by fastai: a throwaway copy of the configured model
trains on the train split (same optimizer, augmentation, batch size, loss, sampler) while the
learning rate grows from `start` to `end`; the test stops once the smoothed loss exceeds
`DIVERGE_FACTOR` times its best value. The suggestion is where the smoothed loss falls fastest,
cross-checked against the "minimum / 10" rule. Nothing here touches checkpoints, the model file
or the caller's random state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from imgcls.config import Params
from imgcls.data.augment import build_transform
from imgcls.data.dataset import SplitData, channel_stats
from imgcls.errors import ImgclsError
from imgcls.io import atomic_path
from imgcls.training import checkpoint
from imgcls.training.batches import auto_workers, make_batches, set_epoch
from imgcls.training.loop import Preprocess, Runtime, backward_and_step
from imgcls.training.setup import (
    build_model,
    imbalance_setup,
    make_loss,
    make_optimizer,
    make_runtime,
    seed_everything,
    select_device,
)

DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of the best one
SMOOTHING = 0.9  # EMA factor: ~10 steps of memory, little lag over a 100-step ramp
DISAGREE_FACTOR = 10.0  # the two rules disagreeing by more than this => say the curve is noisy


class LrFindError(ImgclsError):
    """The range test cannot run with these arguments or this data."""


@dataclass
class LrFindResult:
    """The recorded curve and what it suggests."""

    lrs: np.ndarray  # (T,) learning rate of each step taken
    losses: np.ndarray  # (T,) raw mini-batch loss
    smoothed: np.ndarray  # (T,) bias-corrected exponential moving average of `losses`
    suggestion: float  # steepest descent of the smoothed loss
    min_loss_lr: float  # LR at the smoothed loss's minimum
    diverged: bool  # stopped early because the loss blew up
    falls: bool  # the smoothed loss fell at all (else the suggestion is a guess)
    start: float
    end: float
    iters: int

    @property
    def min_rule(self) -> float:
        """The "minimum / 10" cross-check."""
        return self.min_loss_lr / 10.0

    @property
    def rules_agree(self) -> bool:
        """Whether the two rules land within `DISAGREE_FACTOR` of each other."""
        ratio = self.suggestion / self.min_rule
        return 1.0 / DISAGREE_FACTOR <= ratio <= DISAGREE_FACTOR

    def frame(self) -> pd.DataFrame:
        """The curve as a table: step, lr, loss, smoothed_loss."""
        return pd.DataFrame(
            {
                "step": np.arange(1, len(self.lrs) + 1),
                "lr": self.lrs,
                "loss": self.losses,
                "smoothed_loss": self.smoothed,
            }
        )


def lr_ramp(start: float, end: float, iters: int) -> np.ndarray:
    """`iters` learning rates growing geometrically from `start` to `end` (both included)."""
    if not 0 < start < end:
        raise LrFindError(f"the LR range needs 0 < start < end, got start={start:g}, end={end:g}")
    if iters < 10:
        raise LrFindError(f"--iters {iters} is too few steps for a curve; use at least 10")
    return np.geomspace(start, end, iters)


def smooth(losses: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    """Bias-corrected exponential moving average (the first values are not pulled to zero)."""
    out = np.empty(len(losses))
    avg = 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(loss)
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, float, bool]:
    """(steepest-descent LR, min-loss LR, whether the loss fell) of a recorded curve.

    The steepest descent is sought between the first tenth of the ramp (still dominated by the
    moving average's start-up) and the minimum, where the loss is still falling.
    """
    low = int(np.argmin(smoothed))
    min_lr = float(lrs[low])
    skip = min(max(1, len(lrs) // 10), max(low - 2, 0))
    if low - skip < 2 or smoothed[low] >= smoothed[0]:
        return min_lr / 10.0, min_lr, False
    slope = np.gradient(smoothed[skip : low + 1], np.log10(lrs[skip : low + 1]))
    return float(lrs[skip + int(np.argmin(slope))]), min_lr, True


def _cycle(batches: Any, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches forever: a fresh seeded epoch each time the split is used up."""
    epoch = 0
    while True:
        set_epoch(batches, seed, epoch)
        yield from batches
        epoch += 1


def _step(
    model: nn.Module,
    prep: Preprocess,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    rt: Runtime,
    grad_clip: float | None,
    scaler: torch.amp.GradScaler | None,
) -> float:
    """One optimisation step; returns the mini-batch loss (as `train_one_epoch` computes it)."""
    x, y = rt.to_device(x), y.to(rt.device, non_blocking=True)
    with rt.autocast():
        loss = loss_fn(model(prep(x)), y)  # (B, K) logits -> scalar
    backward_and_step(loss, model, optimizer, scaler=scaler, grad_clip=grad_clip)
    return float(loss.detach().float().item())


def find_lr(
    params: Params,
    data: SplitData,
    *,
    start: float = 1e-7,
    end: float = 10.0,
    iters: int = 100,
    progress: bool = True,
) -> LrFindResult:
    """Run the range test on the train split with the configured model, optimizer and data."""
    lrs = lr_ramp(start, end, iters)
    cfg = params.train
    train_x, train_y = data.part("train")
    if len(train_y) == 0:
        raise LrFindError("the train split is empty; check split fractions in params.yaml")
    saved_rng, saved_threads = checkpoint.rng_state(), torch.get_num_threads()
    saved_deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        seed_everything(params.base.seed, cfg.deterministic)
        device = select_device(cfg.device)
        if device.type == "cpu" and isinstance(cfg.cpu_threads, int):  # auto: not measured here
            torch.set_num_threads(cfg.cpu_threads)
        rt = make_runtime(cfg, device)
        model = build_model(params, data).to(device)  # throwaway: never saved, never returned
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        prep = Preprocess(*channel_stats(train_x)).to(device)
        weights, sample_probs = imbalance_setup(cfg, train_y, data.classes, data.task)
        workers = cfg.num_workers
        batches = make_batches(
            train_x,
            train_y,
            build_transform(params.augment.train, "augment.train"),
            cfg.batch_size,
            shuffle=True,
            device=device,
            num_workers=auto_workers(device) if workers == "auto" else workers,
            sample_probs=sample_probs,
            batched_augment=cfg.batched_augment,
        )
        loss_fn = make_loss(cfg, weights, data.task).to(device)
        optimizer = make_optimizer(model, cfg)
        scaler = torch.amp.GradScaler("cuda") if rt.autocast_dtype == torch.float16 else None
        model.train()
        losses, diverged = _ramp(
            model, prep, batches, optimizer, loss_fn, rt, lrs, params, scaler, progress
        )
    finally:
        checkpoint.set_rng_state(saved_rng)
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic[0], warn_only=saved_deterministic[1])
    if len(losses) < 2:
        raise LrFindError(
            f"the loss was not finite from the first steps (lr {lrs[0]:g}); lower --start, "
            "or check the data and train.precision"
        )
    taken = lrs[: len(losses)]
    smoothed = smooth(np.asarray(losses))
    suggestion, min_lr, falls = suggest(taken, smoothed)
    return LrFindResult(
        taken, np.asarray(losses), smoothed, suggestion, min_lr, diverged, falls, start, end, iters
    )


def _ramp(
    model: nn.Module,
    prep: Preprocess,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    rt: Runtime,
    lrs: np.ndarray,
    params: Params,
    scaler: torch.amp.GradScaler | None,
    progress: bool,
) -> tuple[list[float], bool]:
    """Step through `lrs`; stop when the smoothed loss diverges. Returns (losses, diverged)."""
    losses: list[float] = []
    avg, best = 0.0, math.inf
    stream = _cycle(batches, params.base.seed)
    for i, lr in enumerate(
        tqdm(lrs, desc="lr-find", unit="step", disable=None if progress else True)
    ):
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        x, y = next(stream)
        loss = _step(model, prep, x, y, optimizer, loss_fn, rt, params.train.grad_clip, scaler)
        if not math.isfinite(loss):
            return losses, True  # a non-finite loss is the end of the curve, not a data point
        losses.append(loss)
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        smoothed = avg / (1 - SMOOTHING ** (i + 1))
        best = min(best, smoothed)
        if smoothed > DIVERGE_FACTOR * best:
            return losses, True
    return losses, False


def format_lr(lr: float) -> str:
    """Two significant digits, always with a '.' so that every YAML parser reads a float."""
    text = f"{lr:.2g}"
    mantissa, _, exponent = text.partition("e")
    if exponent and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def dvc_command(lr: float) -> str:
    """The command that tries `lr` as a DVC experiment."""
    return f"dvc exp run -S train.lr={format_lr(lr)}"


def plot_lr_find(result: LrFindResult, path: Path | str) -> None:
    """Save the loss-vs-LR curve (log x axis) with the suggestion and the cross-check marked."""
    import matplotlib

    matplotlib.use("Agg")  # headless: stages and CI have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="mini-batch loss")
        ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
        ax.axvline(
            result.suggestion,
            color="C3",
            ls="--",
            label=f"suggested (steepest descent) {format_lr(result.suggestion)}",
        )
        ax.axvline(
            result.min_rule,
            color="C2",
            ls=":",
            label=f"min-loss / 10: {format_lr(result.min_rule)}",
        )
        ax.set_xscale("log")
        # From the starting loss down: a diverged tail must not squash the interesting part.
        low = float(np.min(result.smoothed))
        top = max(float(result.smoothed[0]), min(float(np.max(result.smoothed)), 4 * low))
        bottom = min(float(np.min(result.losses)), low)
        pad = 0.08 * (top - bottom) + 1e-9
        ax.set_ylim(bottom - pad, top + pad)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title("LR range test")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def summary(result: LrFindResult) -> str:
    """What the CLI prints: both rules, a warning where they are doubtful, the command to run."""
    lines = [
        f"  steepest descent of the smoothed loss:  lr = {format_lr(result.suggestion)}"
        "   <- suggested",
        f"  minimum of the smoothed loss / 10:      lr = {format_lr(result.min_rule)}",
    ]
    if not result.falls:
        lines.append(
            "  warning: the loss never fell over the range; start lower (--start), check the"
            " data, or run more steps (--iters)"
        )
    elif not result.rules_agree:
        lines.append(
            f"  note: the two rules disagree by more than {DISAGREE_FACTOR:g}x (a noisy curve);"
            " look at the plot, or rerun with more --iters"
        )
    if not result.diverged:
        lines.append(
            f"  note: the loss did not diverge up to {result.end:g}; the range may end too early"
        )
    lines.append(f"Try it:  {dvc_command(result.suggestion)}")
    return "\n".join(lines)


def log_to_mlflow(
    params: Params, result: LrFindResult, plot: Path, *, splits_csv: Path, device: str
) -> str:
    """Log the curve, plot and suggestion as their own run in the configured experiment."""
    from imgcls import tracking  # mlflow is imported only when asked for

    tags = {
        **tracking.pipeline_tags(splits_csv, device),
        "mlflow.source.name": "imgcls lr-find",
        "imgcls.kind": "lr-find",
        "model.name": params.model.name,
        "lr_find.command": dvc_command(result.suggestion),
    }
    run = tracking.Run.start(params.tracking, run_name="lr-find", tags=tags)
    resolved = params.to_dict()
    run.log_params(
        {
            **{k: resolved[k] for k in ("base", "model", "augment", "train")},
            "lr_find": {"start": result.start, "end": result.end, "iters": result.iters},
        }
    )
    run.log_metrics(
        {
            "lr_find.suggested_lr": result.suggestion,
            "lr_find.min_loss_lr": result.min_loss_lr,
            "lr_find.min_loss_lr_div10": result.min_rule,
            "lr_find.min_smoothed_loss": float(np.min(result.smoothed)),
            "lr_find.steps": len(result.lrs),
            "lr_find.diverged": float(result.diverged),
        }
    )
    run.log_artifact(plot, "lr_find")
    run.log_text(result.frame().to_csv(index=False), "lr_find/curve.csv")
    run.end("FINISHED")
    run.warn_not_logged("lr-find")
    return run.run_id
