"""`auto` training settings chosen by measurement: precision, channels-last and CPU threads.

At the start of a training whose `train.precision`, `train.channels_last` or `train.cpu_threads`
is `auto`, :func:`resolve_auto` times forward + backward + optimiser step of the actual model
on a real batch for each candidate (bf16 autocast or fp32 — on CUDA also fp16 —, NHWC or not,
1 or N threads), interleaved round by round so that a load spike from other jobs hits every
candidate alike, and keeps the fastest one whose loss stays close to fp32's on the same batch.
A candidate other than the default (fp32 / NHWC / N threads on CPU, bf16 / NHWC on CUDA) must
beat the default by :data:`MARGIN`, so noise alone never flips the choice. The result is cached
per CPU (model name + flags) or GPU, torch version, model and batch shape, so later runs skip the
probe. It decides on the machine at hand, as loaded as it is at that moment. A training too short
to repay the probe (estimated from one timed step of the default, under :func:`min_train_s`)
keeps the default without measuring the rest, and that is not cached.

Long because candidates, timing, the numerical check, the choice and the cache are one
mechanism whose parts share its constants; apart, each would be a few lines of glue.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.config import TrainConfig
from imgcls.io import write_json
from imgcls.models.bundle import Preprocess

log = logging.getLogger("imgcls.train")

PROBE_VERSION = 2  # bump when what is measured or how it is chosen changes (old caches retire)
MARGIN = 0.05  # a non-default candidate must be this much faster than the default
LOSS_RTOL = 0.05  # a candidate's loss may differ from fp32's by this share (+ LOSS_ATOL)
LOSS_ATOL = 0.02
WARMUP_STEPS = 1  # first calls build kernels (oneDNN primitives, cuDNN plans): not timed
MIN_ROUNDS, MAX_ROUNDS = 3, 9
DROP_FACTOR = 1.5  # after a round, candidates this much slower than the best are dropped
# Thread counts compare like with like (same kernels), so their warm-up step already tells: one
# 3x slower (N threads on a loaded CPU can take 10x) is dropped before any timed round.
WARMUP_DROP_FACTOR = 3.0
# Per stage (threads, then precision x layout), timed rounds stop once this is spent: a share of
# the training's estimated time (steps x the fastest step so far), between the two bounds.
BUDGET_SHARE, BUDGET_MIN_S, BUDGET_MAX_S = 0.01, 0.5, 2.5
# The whole probe costs ~1.5-3 s (copies, warm-ups, two staged rounds); the fastest candidate
# typically beats the default by 0-30 %. Below this estimated training length the expected gain
# is smaller than that cost (the default pipeline trains ~9 s), so the default is kept.
MIN_TRAIN_S = 30.0
MIN_TRAIN_ENV = "IMGCLS_PROBE_MIN_TRAIN_S"  # overrides MIN_TRAIN_S; 0 always probes

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Candidate:
    """One combination of the settings the probe may choose."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    threads: int | None  # CPU torch threads; None on a GPU

    @property
    def label(self) -> str:
        """Short name for logs and figures, e.g. `bf16/nhwc/2t`."""
        threads = "" if self.threads is None else f"/{self.threads}t"
        return f"{self.precision}/{'nhwc' if self.channels_last else 'nchw'}{threads}"


@dataclass
class ProbeResult:
    """What the probe chose, from where, and the figures it chose by."""

    choice: Candidate
    source: str  # measured | cache
    step_ms: dict[str, float] = field(default_factory=dict)  # candidate label -> median ms/step
    rejected: dict[str, str] = field(default_factory=dict)  # candidate label -> why
    seconds: float = 0.0  # the probe's own cost in this process (0 from the cache)
    measured_s: float = 0.0  # what measuring cost when it was measured
    key: str = ""
    estimated_train_s: float | None = None  # set when skipped: the training's estimated length

    def line(self) -> str:
        """One log line: the choice, then every candidate's median step time."""
        figures = ", ".join(f"{k} {v:.1f}" for k, v in sorted(self.step_ms.items()))
        rejected = "".join(f"; {k} rejected: {v}" for k, v in sorted(self.rejected.items()))
        why = ""
        if self.source == "skipped":
            why = (
                f" (the default: training estimated at {self.estimated_train_s:.0f}s, under"
                f" {min_train_s():.0f}s, too short to repay measuring the others)"
            )
        return (
            f"train settings probe ({self.source}, {self.seconds:.1f}s): {self.choice.label}"
            f"{why} — ms/step: {figures}{rejected}"
        )

    def params(self) -> dict[str, Any]:
        """MLflow params: the chosen settings (`probe.*`)."""
        return {
            "probe.precision": self.choice.precision,
            "probe.channels_last": self.choice.channels_last,
            "probe.cpu_threads": self.choice.threads,
            "probe.source": self.source,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON form (cache file, MLflow artifact, train details)."""
        return {**asdict(self), "choice": {**asdict(self.choice), "label": self.choice.label}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        """Back from :meth:`to_dict`."""
        choice = {k: data["choice"][k] for k in ("precision", "channels_last", "threads")}
        return cls(**{**data, "choice": Candidate(**choice)})


def auto_keys(cfg: TrainConfig) -> list[str]:
    """The settings this config leaves to the probe."""
    keys = ("precision", "channels_last", "cpu_threads")
    return [k for k in keys if getattr(cfg, k) == "auto"]


def cpu_cores(world: int = 1) -> int:
    """CPU cores this process may use: its affinity set, shared by the local processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, world))


def candidates(
    cfg: TrainConfig, device: torch.device, model: nn.Module, world: int = 1
) -> list[Candidate]:
    """Every combination of the auto settings' options (fixed settings keep their value).

    The default candidate comes first: fp32 / NHWC (NCHW without convolutions) / one thread per
    core on CPU, bf16 (fp16 where unsupported) / NHWC on CUDA.
    """
    cuda = device.type == "cuda"
    if cfg.precision != "auto":
        precisions = [cfg.precision]
    elif cuda:
        first = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        precisions = [first, *[p for p in ("bf16", "fp16", "fp32") if p != first]]
        if first == "fp16":
            precisions.remove("bf16")
    else:
        precisions = ["fp32", "bf16"]
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if cfg.channels_last != "auto":
        layouts = [bool(cfg.channels_last)]
    else:
        layouts = [True, False] if has_conv else [False]  # NHWC only matters to convolutions
    if cuda:
        threads: list[int | None] = [None]
    elif cfg.cpu_threads == "auto":
        n = cpu_cores(world)
        threads = [n, 1] if n > 1 else [1]
    else:
        threads = [cfg.cpu_threads if isinstance(cfg.cpu_threads, int) else None]
    return [Candidate(p, c, t) for t in threads for p in precisions for c in layouts]


def apply_choice(cfg: TrainConfig, choice: Candidate) -> TrainConfig:
    """`cfg` with its auto settings replaced by the probe's choice (fixed ones untouched)."""
    update: dict[str, Any] = {}
    if cfg.precision == "auto":
        update["precision"] = choice.precision
    if cfg.channels_last == "auto":
        update["channels_last"] = choice.channels_last
    if cfg.cpu_threads == "auto":
        update["cpu_threads"] = choice.threads
    return cfg.model_copy(update=update)


def probe_key(
    device: torch.device,
    arch: str,
    model: nn.Module,
    shape: tuple[int, ...],
    cands: list[Candidate],
) -> str:
    """Cache key: hardware, torch, model (name, kwargs, size) and batch shape, candidates."""
    blob = {
        "version": PROBE_VERSION,
        "hardware": hardware_id(device),
        "torch": torch.__version__,
        "arch": arch,
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "shape": list(shape),
        "candidates": [c.label for c in cands],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def hardware_id(device: torch.device) -> str:
    """GPU name, or CPU model name + a hash of its feature flags (AMX, AVX-512 BF16, ...)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    name, flags = platform.processor() or platform.machine(), ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        # the last core's entries: every core of one machine reports the same model
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    except OSError:  # not Linux: the name platform knows
        info = {}
    name = info.get("model name", name)
    features = info.get("flags", info.get("Features", ""))
    if features:
        flags = hashlib.sha256(" ".join(sorted(features.split())).encode()).hexdigest()[:12]
    return f"cpu:{name}:{flags}:{cpu_cores()}cores"


def _timed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    step: Callable[[], torch.Tensor],
    device: torch.device,
) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward + optimiser step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    loss = step()
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, float(loss.detach().float())


def measure(
    model: nn.Module,
    prep: Preprocess,
    loss_fn: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    cands: list[Candidate],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    train_steps: int | None = None,
    warmup_drop: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms per training step of each candidate, and those rejected (with the reason).

    Works on copies of `model` (its weights, BN statistics and the RNG streams are left as they
    were) and restores torch's thread count.
    """
    x, y = batch[0].to(device), batch[1].to(device)
    prep = prep.to(device)
    ref_loss = _eval_loss(model, prep, loss_fn, x, y, device, None, False)
    runs, rejected = {}, {}
    for cand in cands:
        dtype = _DTYPES.get(cand.precision)
        try:
            loss = _eval_loss(model, prep, loss_fn, x, y, device, dtype, cand.channels_last)
        except RuntimeError as err:  # e.g. a dtype the device has no kernel for
            rejected[cand.label] = f"failed: {str(err).splitlines()[0][:120]}"
            continue
        if not math.isfinite(loss) or abs(loss - ref_loss) > LOSS_RTOL * abs(ref_loss) + LOSS_ATOL:
            rejected[cand.label] = f"loss {loss:.4f} vs fp32 {ref_loss:.4f}"
            continue
        net = copy.deepcopy(model).to(device)
        if cand.channels_last:
            net.to(memory_format=torch.channels_last)
        net.train()
        opt = make_optimizer(net)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        runs[cand] = (net, opt, scaler, _step_fn(net, prep, loss_fn, x, y, device, dtype, cand))
    times: dict[Candidate, list[float]] = {c: [] for c in runs}
    step_ms: dict[str, float] = {}
    warm: dict[Candidate, float] = {}
    budget_s = BUDGET_MAX_S
    t0 = time.perf_counter()
    for rnd in range(-WARMUP_STEPS, MAX_ROUNDS):
        spent = time.perf_counter() - t0
        # Enough rounds within budget, or over twice the budget with one timed round.
        if (rnd >= MIN_ROUNDS and spent > budget_s) or (rnd >= 1 and spent > 2 * budget_s):
            break
        for cand, (net, opt, scaler, step) in list(runs.items()):
            if cand.threads is not None:
                torch.set_num_threads(cand.threads)
            seconds, loss = _timed_step(net, opt, scaler, step, device)
            if not math.isfinite(loss):
                rejected[cand.label] = f"loss became {loss} after {len(times[cand]) + 1} steps"
                del runs[cand], times[cand]
            elif rnd >= 0:
                times[cand].append(seconds)
            else:
                warm[cand] = seconds
        if rnd == -1 and warmup_drop and warm:
            fastest = min(warm.values())
            for cand in [c for c, t in warm.items() if t > WARMUP_DROP_FACTOR * fastest]:
                step_ms[cand.label] = round(warm[cand] * 1000, 3)  # a warm-up figure, for the log
                del runs[cand], times[cand]
        if rnd < 0 or not times:
            continue
        medians = {c: statistics.median(t) for c, t in times.items()}
        if train_steps:
            budget_s = probe_budget(train_steps * min(medians.values()))
        for cand, median in medians.items():
            step_ms[cand.label] = round(median * 1000, 3)
            if median > DROP_FACTOR * min(medians.values()):  # clearly slower: stop timing it
                del runs[cand], times[cand]
        if len(runs) < 2:
            break
    return step_ms, rejected


def min_train_s() -> float:
    """Estimated training seconds below which the probe keeps the default unmeasured."""
    raw = os.environ.get(MIN_TRAIN_ENV, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else MIN_TRAIN_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %s", MIN_TRAIN_ENV, raw, MIN_TRAIN_S)
        return MIN_TRAIN_S


def probe_budget(train_s: float) -> float:
    """Seconds one probe stage may spend on a training estimated to take `train_s`."""
    return min(BUDGET_MAX_S, max(BUDGET_MIN_S, BUDGET_SHARE * train_s))


def _step_fn(
    net: nn.Module,
    prep: Preprocess,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    cand: Candidate,
) -> Callable[[], torch.Tensor]:
    """The forward pass + loss of one training step under the candidate's settings."""
    fmt = torch.channels_last if cand.channels_last else torch.contiguous_format

    def step() -> torch.Tensor:
        xb = x.contiguous(memory_format=fmt)  # a copy per step, as the training loop makes
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return loss_fn(net(prep(xb)), y)

    return step


@torch.no_grad()
def _eval_loss(
    model: nn.Module,
    prep: Preprocess,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
) -> float:
    """The untrained model's loss on the batch in eval mode (no dropout: comparable)."""
    net = copy.deepcopy(model).to(device).eval()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return float(loss_fn(net(prep(x.contiguous(memory_format=fmt))), y).float())


def choose(cands: list[Candidate], step_ms: dict[str, float], margin: float = MARGIN) -> Candidate:
    """The fastest measured candidate, unless the default (the first) is within `margin` of it."""
    measured = [c for c in cands if c.label in step_ms]
    if not measured:
        return cands[0]
    best = min(measured, key=lambda c: step_ms[c.label])
    default = cands[0]
    if default.label in step_ms and step_ms[best.label] > (1 - margin) * step_ms[default.label]:
        return default
    return best


def resolve_auto(
    cfg: TrainConfig,
    model: nn.Module,
    prep: Preprocess,
    loss_fn: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    *,
    arch: str,
    cache_dir: Path | None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    world: int = 1,
    train_steps: int | None = None,
) -> tuple[TrainConfig, ProbeResult | None]:
    """`cfg` with its `auto` settings measured (or read from the cache) and filled in.

    Nothing is measured (and `auto` keeps its fixed meaning, see :func:`make_runtime`) when no
    setting is auto, with `train.deterministic` (a timing must not change the numbers), on
    devices other than CPU and CUDA, or when there is a single candidate. `train_steps` (the
    training's optimiser steps) scales the probe's time budget to the training's length, and a
    training estimated under :func:`min_train_s` keeps the default (source `skipped`).
    """
    if not auto_keys(cfg) or cfg.deterministic or device.type not in ("cpu", "cuda"):
        return cfg, None
    cands = candidates(cfg, device, model, world)
    if len(cands) < 2:
        return cfg, None
    key = probe_key(device, arch, model, tuple(batch[0].shape), cands)
    path = cache_dir / f"{key}.json" if cache_dir is not None else None
    result = _read_cache(path)
    if result is None:

        def run(cs: list[Candidate], drop: bool) -> tuple[dict[str, float], dict[str, str]]:
            return measure(
                model,
                prep,
                loss_fn,
                batch,
                device,
                cs,
                make_optimizer,
                train_steps=train_steps,
                warmup_drop=drop,
            )

        t0 = time.perf_counter()
        saved_threads = torch.get_num_threads()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                result = _skip_if_short(cands, train_steps, run)
                if result is None:
                    choice, step_ms, rejected = _staged(cands, run)
        finally:
            torch.set_num_threads(saved_threads)
        seconds = round(time.perf_counter() - t0, 2)
        if result is not None:  # skipped: not cached, a longer training measures
            result.seconds = result.measured_s = seconds
            result.key = key
            return apply_choice(cfg, result.choice), result
        result = ProbeResult(choice, "measured", step_ms, rejected, seconds, seconds, key)
        if path is not None:
            write_json(path, result.to_dict())
    return apply_choice(cfg, result.choice), result


Measure = Callable[[list[Candidate], bool], tuple[dict[str, float], dict[str, str]]]


def _skip_if_short(
    cands: list[Candidate], train_steps: int | None, measure_: Measure
) -> ProbeResult | None:
    """The default, unmeasured further, when one timed step says the training is too short."""
    limit = min_train_s()
    if not train_steps or limit <= 0:
        return None
    step_ms, rejected = measure_(cands[:1], False)
    if cands[0].label not in step_ms:  # the default failed: the others must be measured
        return None
    estimate = train_steps * step_ms[cands[0].label] / 1000
    if estimate >= limit:
        return None
    return ProbeResult(cands[0], "skipped", step_ms, rejected, estimated_train_s=round(estimate, 1))


def _staged(
    cands: list[Candidate], measure_: Measure
) -> tuple[Candidate, dict[str, float], dict[str, str]]:
    """Threads first (at the default precision and layout), then precision x layout at those.

    Two small stages instead of the whole grid: a thread count that a loaded machine makes
    10x slower is paid for once, not once per precision and layout.
    """
    step_ms: dict[str, float] = {}
    rejected: dict[str, str] = {}
    threads = cands[0].threads
    if len({c.threads for c in cands}) > 1:
        first = [c for c in cands if (c.precision, c.channels_last) == _style(cands[0])]
        ms, rej = measure_(first, True)
        step_ms.update(ms)
        rejected.update(rej)
        threads = choose(first, ms).threads
    second = [c for c in cands if c.threads == threads]
    ms, rej = measure_(second, False) if len(second) > 1 else ({}, {})
    step_ms.update(ms)  # the second stage's figure wins for a candidate timed twice
    rejected.update(rej)
    return choose(second, ms), step_ms, rejected


def _style(cand: Candidate) -> tuple[str, bool]:
    """A candidate's precision and layout."""
    return cand.precision, cand.channels_last


def _read_cache(path: Path | None) -> ProbeResult | None:
    """A cached probe result (None if absent or unreadable: it is then measured again)."""
    if path is None or not path.is_file():
        return None
    try:
        result = ProbeResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    result.source, result.seconds = "cache", 0.0
    return result
