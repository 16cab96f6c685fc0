"""The tune's shared pieces: options, result, errors, the Ctrl-C flag and constants."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    pass


log = logging.getLogger("imgcls.tune")

# Keys of the train section that change how fast a trial runs, not what it learns.
_RUNTIME_KEYS = ("device", "num_workers", "cpu_threads")
# A SQLite study shared by several worker processes: wait for the lock instead of failing.
_SQLITE_TIMEOUT_S = 60
# Set by Ctrl-C: a KeyboardInterrupt raised inside a finaliser (gc after each trial, SQLAlchemy)
# is printed and dropped by Python, so the next epoch end or trial end raises it again.
_INTERRUPTED = threading.Event()
# Heartbeats let a rerun mark trials of a killed process as failed (after the grace period).
_HEARTBEAT_S, _GRACE_S = 10, 30


class TuneError(ImgclsError):
    """The search cannot start or go on (no data, bad metric, ...)."""


@dataclass
class TuneOptions:
    """What `imgcls tune` was asked for (command-line values win over `tune:`)."""

    params_path: Path = Path("params.yaml")
    splits: Path = Path("data/processed/splits.csv")
    cache_dir: Path = Path("data/cache")
    out_dir: Path = Path("reports/tune")
    n_trials: int | None = None
    timeout: float | None = None
    jobs: int = 1


@dataclass
class TuneResult:
    """How the study stands after this invocation."""

    study_name: str
    storage: str
    metric: str
    direction: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    baseline_value: float | None
    counts: dict[str, int]
    ran_now: int
    wall_s: float
    command: str | None
    parent_run_id: str | None
    files: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------- study identity
