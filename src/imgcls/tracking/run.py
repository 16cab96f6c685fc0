"""The best-effort MLflow run: every logging call survives a dropped store and says what was lost.

One pipeline execution is one MLflow run: the train stage creates it (through its logger
process, :mod:`imgcls.tracking.logger`) and writes its id to `models/run.json`; the evaluate
stage reopens it with :func:`resume_run`, logs its metrics and both models, and closes it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imgcls.config import TrackingConfig
from imgcls.tracking.store import (
    apply_http_defaults,
    experiment_id,
    flatten,
    probe,
    resolve_uri,
    store_error,
)

log = logging.getLogger("imgcls.tracking")

# After a connection failure, skip calls for this long instead of paying the retries each epoch.
RETRY_AFTER_S = 30.0


def open_store(experiment: str, uri: str) -> tuple[Any, str]:
    """(MlflowClient, experiment id) for `uri`; a :class:`TrackingError` if it is unusable."""
    apply_http_defaults(uri)
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)  # opens (and migrates) a SQLite store
        return client, experiment_id(client, experiment, uri)
    except Exception as err:  # mlflow raises many types for an unreachable store
        raise store_error(uri, err) from None


def _is_connection_error(err: BaseException) -> bool:
    """True when the store did not answer (as opposed to rejecting one request)."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    text = str(err)
    return any(
        s in text
        for s in (
            "Max retries exceeded",
            "Connection refused",
            "failed with exception",
            "timed out",
            "database is locked",
            "unable to open database",
        )
    )


def describe_not_logged(items: list[str]) -> str:
    """'metrics (step 4)', 'metrics (step 5)', 'model' -> 'metrics at steps 4-5; model'."""
    steps: list[int] = []
    other: list[str] = []
    for item in items:
        if item.startswith("metrics (step ") and item.endswith(")"):
            steps.append(int(item[len("metrics (step ") : -1]))
        elif item not in other:
            other.append(item)
    parts = []
    if steps:
        lo, hi = min(steps), max(steps)
        span = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        parts.append(f"metrics at {span} ({len(steps)} batches)")
    return "; ".join(parts + other)


def warn_not_logged(stage: str, uri: str, run_id: str | None, items: list[str]) -> None:
    """One warning that lists everything a stage could not log (no-op if nothing)."""
    if items:
        log.warning(
            "%s: could not log everything to the MLflow store at %s; local files are "
            "complete, but these were NOT logged to run %s: %s",
            stage,
            uri,
            run_id,
            describe_not_logged(items),
        )


class Run:
    """One MLflow run shared by the train and evaluate stages.

    Every logging call is best-effort once the run has started: if the store drops mid-run,
    training goes on, local files are still written, and :attr:`not_logged` says what was lost.
    """

    def __init__(self, uri: str, run_id: str, client: Any = None) -> None:
        apply_http_defaults(uri)
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
        self.uri, self.run_id, self.client = uri, run_id, client
        self.not_logged: list[str] = []
        self._down_since: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        root: Path | None = None,
    ) -> Run:
        """Create the experiment if needed and start a run; fail fast if unreachable."""
        uri = resolve_uri(cfg, root)
        probe(uri)  # seconds, before MLflow's own (long) retry loop could start
        client, exp_id = open_store(cfg.experiment, uri)
        return cls.create(client, uri, exp_id, run_name=run_name, tags=tags)

    @classmethod
    def create(
        cls,
        client: Any,
        uri: str,
        exp_id: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Run:
        """A new run in experiment `exp_id` of an open store."""
        try:
            run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
        except Exception as err:  # e.g. a 401 from an auth-enabled server
            raise store_error(uri, err) from None
        log.info("MLflow run %s (experiment %s) at %s", run.info.run_id, exp_id, uri)
        return cls(uri, run.info.run_id, client)

    @classmethod
    def reopen(cls, client: Any, uri: str, run_id: str, exp_id: str) -> Run:
        """An earlier run of experiment `exp_id` set back to RUNNING (a resumed training).

        Raises when the run is not there (another store, deleted, another experiment): the
        caller then starts a new run.
        """
        info = client.get_run(run_id).info
        if info.experiment_id != exp_id or info.lifecycle_stage != "active":
            raise ValueError(f"run {run_id} is not an active run of experiment {exp_id}")
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow run %s reopened (was %s) at %s", run_id, info.status, uri)
        return cls(uri, run_id, client)

    def logged_params(self) -> dict[str, str]:
        """The params the run already holds (empty if the store cannot say)."""
        got = self._safe("params", self.client.get_run, self.run_id)
        return dict(got.data.params) if got is not None else {}

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric `key` was logged (empty if the store cannot say)."""
        history = self._safe("metrics", self.client.get_metric_history, self.run_id, key)
        return {m.step for m in history or []}

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run finished (or FAILED)."""
        self._safe("run status", self.client.set_terminated, self.run_id, status)

    def warn_not_logged(self, stage: str) -> None:
        """One warning that lists everything this process could not log (no-op if nothing)."""
        warn_not_logged(stage, self.uri, self.run_id, self.not_logged)

    # ------------------------------------------------------------------ logging

    def _safe(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call an mlflow function; on failure warn once per kind and remember what was lost."""
        if self._down_since is not None and time.monotonic() - self._down_since < RETRY_AFTER_S:
            self.not_logged.append(what)  # the store was down moments ago: don't stall again
            return None
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # a dropped store must not kill a long training run
            kind = what.split(" (")[0]
            if not any(item.split(" (")[0] == kind for item in self.not_logged):
                first = (str(err).splitlines() or [""])[0][:300]
                log.warning("MLflow: could not log %s: %s: %s", what, type(err).__name__, first)
            if _is_connection_error(err):
                self._down_since = time.monotonic()
            self.not_logged.append(what)
            return None
        self._down_since = None
        return out

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flattened params in batches (MLflow caps a batch at 100 params)."""
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._safe("params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags in one call."""
        from mlflow.entities import RunTag

        self._safe(
            "tags",
            self.client.log_batch,
            self.run_id,
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log many metrics in one call (one round trip per epoch)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(_metric_key(k), float(v), ts, step or 0)
            for k, v in metrics.items()
            if v is not None
        ]
        what = "metrics" if step is None else f"metrics (step {step})"
        for i in range(0, len(items), 1000):
            self._safe(what, self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload a local file (or every file of a folder)."""
        path = Path(path)
        fn = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        where = f"{artifact_path}/{path.name}" if artifact_path else path.name
        self._safe(f"artifact {where}", fn, self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Store JSON / YAML data as an artifact."""
        self._safe(
            f"artifact {artifact_file}", self.client.log_dict, self.run_id, data, artifact_file
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store text as an artifact."""
        self._safe(
            f"artifact {artifact_file}", self.client.log_text, self.run_id, text, artifact_file
        )

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as an artifact."""
        self._safe(
            f"artifact {artifact_file}", self.client.log_figure, self.run_id, figure, artifact_file
        )

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Store a PIL image or uint8 array as a PNG artifact."""
        self._safe(
            f"artifact {artifact_file}", self.client.log_image, self.run_id, image, artifact_file
        )

    def log_pytorch_model(
        self,
        model: Any,
        *,
        input_example: Any,
        metadata: Mapping[str, Any],
        registered_name: str | None = None,
        bundle: Path | None = None,
    ) -> str | None:
        """`mlflow.pytorch.log_model` (pt2 export, signature from the example); returns the URI.

        `bundle` (the saved `models/model.pt`) is stored with it as the extra file
        `extra_files/model.pt`: the only part `imgcls predict --model-uri` loads (weights-only).

        `input_example` must hold at least 2 samples: MLflow exports with `torch.export` and
        `Dim.AUTO`, which specialises a size-1 batch dimension to the constant 1 (the
        "inputs[0].shape[0] 0/1 specialized" warning) and the logged model then rejects any
        other batch size. With 2 samples the batch dimension stays dynamic.
        """
        import mlflow
        import numpy as np

        # A writable copy: torch warns on (and must not alias) read-only memory-mapped arrays.
        input_example = np.array(input_example)
        if input_example.ndim < 1 or len(input_example) < 2:
            raise ValueError("input_example needs >= 2 samples to export a dynamic batch size")

        def _log() -> str:
            mlflow.set_tracking_uri(self.uri)
            mlflow.start_run(run_id=self.run_id)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    extra = None
                    if bundle is not None:  # under the name load_logged_model looks for
                        extra = [str(shutil.copy(bundle, Path(tmp) / "model.pt"))]
                    info = mlflow.pytorch.log_model(
                        model,
                        name="model",
                        input_example=input_example,
                        metadata=dict(metadata),
                        registered_model_name=registered_name,
                        pip_requirements=_pip_requirements(),
                        extra_files=extra,
                    )
            finally:
                # `end_run` would mark the run FINISHED; evaluate still has to log into it.
                mlflow.end_run(status="RUNNING")
            return info.model_uri

        return self._safe("model", _log)


def _param_value(value: Any) -> str:
    """Lists / dicts as JSON (the UI pretty-prints them), scalars as text; MLflow's size cap."""
    import json

    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def _metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits and `_-./ `; replace anything else."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _pip_requirements() -> list[str]:
    """Pin what the logged model needs to load, so MLflow need not guess (slow, noisy)."""
    from importlib.metadata import version

    return [
        f"torch=={version('torch')}",
        f"mlflow=={version('mlflow')}",
        f"numpy=={version('numpy')}",
    ]


def resume_run(run_file: Path) -> Run | None:
    """The run the train stage started, from its run file (None if tracking was off)."""
    import json

    info = json.loads(run_file.read_text()) if run_file.is_file() else {}
    if not info.get("run_id"):
        return None
    try:
        return Run(info["tracking_uri"], info["run_id"])
    except Exception as err:  # e.g. the SQLite file is gone: evaluate still writes its files
        log.warning(
            "MLflow store %s cannot be opened (%s: %s); NOT logging this stage to run %s",
            info["tracking_uri"],
            type(err).__name__,
            (str(err).splitlines() or [""])[0][:200],
            info["run_id"],
        )
        return None
