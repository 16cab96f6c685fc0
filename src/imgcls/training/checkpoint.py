"""Atomic checkpoints and the model file: always written whole, always loaded with weights_only."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.io import atomic_path


def save(path: Path | str, payload: dict[str, Any]) -> None:
    """Serialise in memory, check the free space, write a temp file, then rename over `path`.

    Serialising first tells how many bytes are needed before a byte is written, and a full disk
    then fails in plain file I/O (one DiskFullError) rather than inside torch's C++ writer.
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    with atomic_path(path, needed=len(data)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())  # delayed allocation may report ENOSPC only here


def load(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint or model file safely (no pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
