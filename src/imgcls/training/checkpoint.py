"""The resume state (`models/checkpoints/last.pt`): what a killed training needs to go on exactly.

Written atomically and loaded weights-only (:func:`imgcls.models.bundle.save_weights`). Besides
the model, optimiser and RNG states it carries the MLflow run id, so that a resumed training
continues the same run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.models.bundle import load_weights, save_weights

# The file I/O, under the names the rest of the project (and its tests) use for checkpoints.
save = save_weights
load = load_weights


@dataclass
class TrainState:
    """Everything one epoch's checkpoint holds (the file is this dataclass as a plain dict)."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    ema: dict[str, Any] | None
    epoch: int  # epochs done
    history: list[dict[str, float]]  # one row per epoch done
    best_value: float
    best_epoch: int
    best_state: dict[str, Any]
    patience_left: int | None
    rng: dict[str, Any]  # rank 0's RNG states
    rng_per_rank: list[dict[str, Any]] | None
    world_size: int
    config_hash: str  # data + params the state is valid for
    complete: bool  # the training finished (or stopped early): nothing to resume
    run_id: str | None = None  # the MLflow run the epochs were logged to (once known)
    run_key: str | None = None  # the training's key, tag `imgcls.train_key` of that run

    def save(self, path: Path | str) -> None:
        """Write atomically (a kill mid-write leaves the previous checkpoint whole)."""
        # Shallow on purpose: `asdict` would deep-copy every tensor of the state once more.
        save_weights(path, {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        """From a loaded file (keys it lacks, written before they existed, get their defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


def read_resume(
    path: Path | None, config_hash: str, epochs: int, say: Callable[..., None]
) -> TrainState | None:
    """The checkpoint to resume from, or None; either way the log says which and why."""
    if path is None:
        return None
    if not path.is_file():
        say("no checkpoint at %s: starting fresh", path)
        return None
    try:
        state = TrainState.from_dict(load_weights(path))
    except Exception as err:  # a foreign or damaged file must not block a fresh start
        say("checkpoint %s is unreadable (%s): starting fresh", path, type(err).__name__)
        return None
    if state.config_hash != config_hash:
        say(
            "checkpoint %s was written for other data or params (model / augment / train / seed):"
            " starting fresh",
            path,
        )
        return None
    if state.complete or state.epoch >= epochs:
        say("checkpoint %s is from a finished run: starting fresh", path)
        return None
    say("resuming from %s: %d of %d epochs already done", path, state.epoch, epochs)
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    """random.setstate needs tuples where a round trip may have produced lists."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x
