"""Log an evaluated model to its MLflow run: the `mlflow.pytorch` model and the servable pyfunc.

The evaluate stage calls :func:`log_models` once the model's evaluation succeeded, on the run the
train stage started, so the registry only ever holds evaluated models, with their test metrics
on the same run. With `tracking.register_model` (default `imgcls`) the servable model becomes a
new version of that registered model with the alias `challenger` (MLflow aliases replace the
deprecated registry stages); `imgcls promote` then moves `champion` (imgcls.inference.aliases).
Every step is best-effort, like the rest of tracking: a store that drops does not fail the
stage, and what was lost is listed in the returned record's `not_logged`.

:class:`Publisher` runs :func:`log_models` in a child process started at the beginning of the
evaluate stage, which meanwhile imports and warms up what model logging needs (the cold part
of its cost) and samples the run's system metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # `imgcls promote` imports this module's aliases: no torch at CLI start
    from torch import nn

log = logging.getLogger("imgcls.inference")

CHALLENGER = "challenger"  # alias of the newest evaluated version: the candidate to promote
CHAMPION = "champion"  # alias of the promoted version: `models:/<name>@champion` serves it


class ModelRun(Protocol):
    """What :func:`log_models` needs of `imgcls.tracking.Run`."""

    uri: str
    run_id: str
    not_logged: list[str]

    def log_pytorch_model(
        self,
        model: Any,
        *,
        input_example: Any,
        metadata: dict[str, Any],
        registered_name: str | None = None,
        bundle: Path | None = None,
    ) -> str | None: ...


def empty_record(run_id: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """The record when no model was logged (tracking off, or `tracking.log_model: false`)."""
    return {
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "model_uri": None,
        "serving_model_uri": None,
        "registered_model": None,
        "not_logged": [],
    }


def log_models(
    run: ModelRun,
    model_path: Path,
    clf: nn.Module,
    meta: dict[str, Any],
    input_example: np.ndarray,
    registered_name: str | None = None,
) -> dict[str, Any]:
    """Log `model` (mlflow.pytorch) and `serving` (pyfunc, registered) from `model_path`.

    `clf` must be the module loaded from `model_path` (the logged pytorch model is then exactly
    the file's weights); `input_example` holds >= 2 images so the exported batch size stays
    dynamic. Returns the record the evaluate stage writes (URIs None where logging failed).
    """
    from imgcls.inference.serving import log_serving_model_info

    _skip_requirement_scan()
    record = empty_record(run.run_id, run.uri)
    lost = len(run.not_logged)
    example = np.array(input_example[:2])  # a writable copy: torch.export rejects mmap'd arrays
    if len(example) >= 2:
        record["model_uri"] = run.log_pytorch_model(
            clf, input_example=example, metadata=dict(meta), bundle=Path(model_path)
        )
    else:  # fewer than 2 images in the whole data set: nothing to export a dynamic batch from
        run.not_logged.append("model")
    try:
        uri, version = log_serving_model_info(model_path, run.run_id, run.uri, registered_name)
    except Exception as err:  # a dropped store must not fail an evaluation that succeeded
        first = (str(err).splitlines() or [""])[0][:300]
        log.warning("MLflow: could not log the serving model: %s: %s", type(err).__name__, first)
        run.not_logged.append("serving model")
    else:
        record["serving_model_uri"] = uri
        if registered_name and version is not None:
            record["registered_model"] = {"name": registered_name, "version": version}
            if set_alias(run.uri, registered_name, version, CHALLENGER):
                record["registered_model"]["alias"] = CHALLENGER
            else:
                run.not_logged.append(f"alias {CHALLENGER}")
    record["not_logged"] = run.not_logged[lost:]
    return record


def set_alias(uri: str, name: str, version: int, alias: str) -> bool:
    """Point `alias` of registered model `name` at `version` (best-effort: False if it failed)."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri, registry_uri=uri).set_registered_model_alias(name, alias, str(version))
    except Exception as err:  # a dropped store must not fail an evaluation that succeeded
        first = (str(err).splitlines() or [""])[0][:300]
        log.warning("MLflow: could not set alias %s of %s: %s", alias, name, first)
        return False
    return True


# ---------------------------------------------------------------------- the publisher process

# The publisher skips interpreter shutdown (os._exit) once it has replied, like the train
# stage's logger: tearing down mlflow and SQLAlchemy would only make the stage wait.
_PUBLISHER_CODE = (
    "import os, sys; from imgcls.inference.publish import publisher_main; "
    "publisher_main(int(sys.argv[1])); sys.stdout.flush(); sys.stderr.flush(); os._exit(0)"
)


@dataclass(frozen=True)
class _Start:
    """The run to log into, and whether to sample system metrics meanwhile."""

    run_id: str
    uri: str
    system_metrics: bool


@dataclass(frozen=True)
class _Publish:
    """The evaluation succeeded: log these models (rebuilt from the saved bundle)."""

    model_path: str
    example: np.ndarray
    registered_name: str | None


class Publisher:
    """A child process that gets model logging ready while the evaluate stage evaluates.

    Cold, logging the two models cost the evaluate stage ~7 s of CPU on top of the logging
    itself (importing mlflow's model flavours and torch.export, MLflow's scan of every installed
    package). The child does that work while the parent evaluates, then logs the models from
    the saved bundle once the parent calls :meth:`publish` (after the evaluation succeeded: the
    registry never holds a model whose evaluation failed). It also samples the machine's system
    metrics into the run for the stage's duration. POSIX only (the pipe is inherited).
    """

    def __init__(self, start: _Start) -> None:
        ours, theirs = multiprocessing.Pipe()
        fd = theirs.fileno()
        cmd = [sys.executable, "-c", _PUBLISHER_CODE, str(fd)]
        self._proc = subprocess.Popen(cmd, pass_fds=[fd])
        theirs.close()
        self._conn = ours
        self._conn.send(start)

    def publish(
        self,
        run: ModelRun,
        model_path: Path,
        clf: nn.Module,
        meta: dict[str, Any],
        input_example: np.ndarray,
        registered_name: str | None = None,
    ) -> dict[str, Any]:
        """:func:`log_models` in the child (`clf` and `meta` are reloaded there from the file).

        What the child could not log is added to `run.not_logged`.
        """
        del clf, meta  # the child loads the same module from `model_path`: nothing to pickle
        record = empty_record(run.run_id, run.uri)
        lost = ["model", "serving model"]
        try:
            self._conn.send(_Publish(str(model_path), np.array(input_example[:2]), registered_name))
            record = self._conn.recv()
            lost = record["not_logged"]
        except (EOFError, OSError):  # the child died: say so; the evaluation's files stand
            log.warning("MLflow: the model-logging process exited (%s)", self._proc.poll())
        finally:
            self.close()
        run.not_logged.extend(lost)
        record["not_logged"] = lost
        return record

    def close(self) -> None:
        """Stop the child without logging models (idempotent; waits for its exit)."""
        if self._conn.closed:
            return
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._conn.close()
        self._proc.wait()


def start_publisher(run_file: Path, log_model: bool, system_metrics: bool) -> Publisher | None:
    """Start the child for the run the train stage started (None: no run, or no models to log).

    Call it first in the evaluate stage: the child warms up while the parent evaluates. It
    samples the stage's system metrics too (only then: a child importing torch and mlflow just
    to sample would cost more than it measures).
    """
    info = json.loads(run_file.read_text()) if run_file.is_file() else {}
    if not info.get("run_id") or not log_model or not _use_a_process():
        return None
    return Publisher(_Start(info["run_id"], info["tracking_uri"], system_metrics))


def _use_a_process() -> bool:
    """Whether a child process pays: only when a core is idle while the parent evaluates.

    Measured (bench/bench_evaluate_models.py): with a spare core the child's warm-up is free
    and the stage waits only for the logging itself; on a machine whose every core is busy the
    child's own imports (torch, mlflow) make the stage ~2 s slower than logging in-process.
    IMGCLS_MODEL_PUBLISHER=process / inline forces either (tests, benchmarks).
    """
    forced = os.environ.get("IMGCLS_MODEL_PUBLISHER", "auto")
    if forced in ("process", "inline"):
        return forced == "process"
    cpus = os.cpu_count() or 1
    return cpus >= 2 and os.getloadavg()[0] <= cpus - 1


def publisher_main(fd: int) -> None:
    """The child: warm up (and sample system metrics) until told to publish or to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the evaluate stage closes it
    from imgcls.stage import setup_logging

    setup_logging()
    conn = Connection(fd)
    start: _Start = conn.recv()
    monitor: list[Any] = []  # the system-metrics monitor, once the warm-up has started it
    done = threading.Event()
    warm = threading.Thread(target=_warm_up, args=(start, monitor, done), daemon=True)
    warm.start()
    try:
        message = conn.recv()
    except (EOFError, OSError):  # the evaluate stage died: stop sampling and exit
        message = None
    done.set()
    warm.join()
    try:
        if isinstance(message, _Publish):
            conn.send(_publish(start, message))
    finally:
        for m in monitor:
            m.stop()


def _warm_up(start: _Start, monitor: list[Any], done: threading.Event) -> None:
    """Import and initialise what model logging needs; skip what the evaluation outran."""
    from imgcls.tracking.sysmetrics import start_system_metrics

    started = (
        start_system_metrics(start.uri, start.run_id, resume=True) if start.system_metrics else None
    )
    if started is not None:
        monitor.append(started)
    steps = (_import_model_logging, _skip_requirement_scan, _log_a_tiny_model)
    for step in steps:
        if done.is_set() and step is _log_a_tiny_model:  # only worth it while evaluation runs
            return
        try:
            step()
        except Exception as err:  # only an optimisation: the real logging reports real problems
            log.debug("warming up model logging: %s failed: %s", step.__name__, err)


def _import_model_logging() -> None:
    """The imports of model logging (mlflow's flavours, torch.export and torch._dynamo)."""
    import importlib

    import torch

    torch.set_num_threads(1)  # the parent evaluates meanwhile: don't compete for every core
    # torch.export._trace pulls in torch._dynamo: ~5 s of imports, cold
    for name in (
        "mlflow.pyfunc",
        "mlflow.pytorch",
        "torch.export._trace",
        "imgcls.inference.serving",
    ):
        importlib.import_module(name)


def _skip_requirement_scan() -> None:
    """Turn off MLflow's check of the models' requirements against the installed packages.

    Both models pin exactly the installed versions (`importlib.metadata.version`), so the check
    cannot find a mismatch; it scans every installed distribution's files (~4 s of CPU, cold).
    """
    import mlflow.pyfunc
    import mlflow.utils.environment

    for module in (mlflow.utils.environment, mlflow.pyfunc):
        if hasattr(module, "warn_dependency_requirement_mismatches"):
            module.warn_dependency_requirement_mismatches = lambda *args, **kwargs: None


def _log_a_tiny_model() -> None:
    """Save, load and run a tiny pt2 model in a temp dir (never the store): warms torch.export."""
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch

    from imgcls.models.bundle import ImageClassifier

    layers = [torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(8, 2))
    model = ImageClassifier(net, [0.5], [0.25]).eval()
    example = np.zeros((2, 4, 4, 1), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model")
        mlflow.pytorch.save_model(model, path, input_example=example, pip_requirements=[])
        mlflow.pyfunc.load_model(path).predict(example)


def _publish(start: _Start, message: _Publish) -> dict[str, Any]:
    """In the child: :func:`log_models` from the saved bundle; the record for the parent."""
    from imgcls.models.bundle import load_bundle
    from imgcls.tracking import Run

    path = Path(message.model_path)
    try:
        run = Run(start.uri, start.run_id)
        clf, meta = load_bundle(path)
    except Exception as err:  # the store or the file vanished since the parent opened them
        first = (str(err).splitlines() or [""])[0][:300]
        log.warning("MLflow: could not log the models: %s: %s", type(err).__name__, first)
        record = empty_record(start.run_id, start.uri)
        record["not_logged"] = ["model", "serving model"]
        return record
    return log_models(run, path, clf, meta, message.example, message.registered_name)
