"""The only module that imports mlflow: URI resolution, run lifecycle and fault-tolerant logging.

Library code never decides where runs go: the tracking URI comes from `MLFLOW_TRACKING_URI`,
then `tracking.uri`, then a SQLite file at the repository root. The root is `DVC_ROOT` when DVC
runs the stage (DVC points it at the parent repo even inside `dvc exp run` temp copies), so every
experiment lands in one store.

One pipeline execution is one MLflow run: the train stage starts it (:func:`start_pipeline_run`)
and writes its id to a small file that the evaluate stage reads to log into the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from imgcls.config import Params, TrackingConfig
from imgcls.errors import ImgclsError

log = logging.getLogger("imgcls.tracking")

# MLflow retries an unreachable HTTP store 7 times with exponential backoff (minutes per call).
# A training run must neither hang at start nor stall every epoch when the server drops, so
# unless the user chose otherwise, fail a request after a short, bounded retry.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PROBE_TIMEOUT_S = 5.0
# After a connection failure, skip calls for this long instead of paying the retries each epoch.
RETRY_AFTER_S = 30.0


class TrackingError(ImgclsError):
    """The tracking store cannot be reached or used."""


def repo_root(cwd: Path | None = None) -> Path:
    """The repository whose store runs belong to: `DVC_ROOT` if DVC set it, else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or cwd or Path.cwd()).resolve()


def resolve_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI`, else `tracking.uri`, else `sqlite:///<root>/mlflow.db` (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists and empty mappings stay leaf values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_info(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the repo at `root` (empty when it is not a git repo)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    # `mlflow.source.git.commit` is the tag the MLflow UI shows as "Source" / "Git commit".
    return {
        "git.commit": commit,
        "git.dirty": str(bool(dirty)).lower(),
        "mlflow.source.git.commit": commit,
    }


def file_sha256(path: Path) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pipeline_tags(splits_csv: Path, device: str) -> dict[str, str]:
    """Tags that tie a run to its code, data, DVC experiment, device and imgcls version."""
    import imgcls

    exp_name = os.environ.get("DVC_EXP_NAME", "")
    return {
        **git_info(repo_root()),
        "dvc.exp_name": exp_name,
        "data.splits_sha256": file_sha256(splits_csv),
        "device": device,
        "imgcls.version": imgcls.__version__,
        "mlflow.source.name": "dvc exp run" if exp_name else "dvc repro",
    }


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _apply_http_defaults(uri: str) -> None:
    """Bounded retries / timeout for HTTP stores, unless the user set the variables."""
    if _is_http(uri):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` within ~`timeout` s if the store obviously cannot be used.

    Cheap on purpose (no mlflow import, ~ms): it runs before training, while the run itself is
    created in the background. HTTP(S): any HTTP answer counts as reachable (a 401 from an
    auth-enabled server too: creating the run then reports the credentials problem); only
    "nothing answered" fails. SQLite / file stores: the folder must exist and be writable.
    """
    if _is_http(uri):
        _probe_http(uri, timeout)
    elif uri.startswith("sqlite:///"):
        _probe_folder(uri, Path(uri.removeprefix("sqlite:///").split("?")[0]))
    elif uri.startswith("file:") or "://" not in uri:
        _probe_folder(uri, Path(uri.removeprefix("file://").removeprefix("file:")))


def _probe_http(uri: str, timeout: float) -> None:
    """GET <uri>/health with the standard library; fail only when nothing answers."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    https = parts.scheme == "https"
    connection = http.client.HTTPSConnection if https else http.client.HTTPConnection
    try:
        conn = connection(parts.hostname or "", parts.port, timeout=timeout)
        try:
            conn.request("GET", f"{parts.path.rstrip('/')}/health")
            conn.getresponse().read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as err:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} ({type(err).__name__}). "
            "Start it (see docs/tracking.md), fix MLFLOW_TRACKING_URI / tracking.uri, "
            "or set tracking.enabled: false to train without tracking"
        ) from None


def _probe_folder(uri: str, path: Path) -> None:
    """The store's file (SQLite) or folder (file store) must be creatable / writable."""
    folder = path.parent if uri.startswith("sqlite:") else path
    while not folder.exists() and folder != folder.parent and not uri.startswith("sqlite:"):
        folder = folder.parent  # a file store creates missing folders itself
    problem = None
    if not folder.is_dir():
        problem = f"{folder} is not an existing folder"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"the folder {folder} is not writable"
    elif uri.startswith("sqlite:") and path.exists() and not os.access(path, os.R_OK | os.W_OK):
        problem = f"{path} is not a readable, writable file"
    if problem:
        raise TrackingError(
            f"cannot use the MLflow tracking store at {uri} ({problem}). Fix "
            "MLFLOW_TRACKING_URI / tracking.uri, or set tracking.enabled: false to train "
            "without tracking"
        )


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


class Run:
    """One MLflow run shared by the train and evaluate stages.

    Every logging call is best-effort once the run has started: if the store drops mid-run,
    training goes on, local files are still written, and :attr:`not_logged` says what was lost.
    """

    def __init__(self, uri: str, run_id: str, client: Any = None) -> None:
        _apply_http_defaults(uri)
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
        _apply_http_defaults(uri)
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(tracking_uri=uri)  # opens (and migrates) a SQLite store
            exp_id = _experiment_id(client, cfg.experiment, uri)
            run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
        except Exception as err:  # mlflow raises many types for an unreachable store
            first = (str(err).splitlines() or [""])[0][:200]
            auth = any(code in str(err) for code in ("401", "403"))
            fix = (
                "Set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for this server"
                if auth
                else "Start the server, fix MLFLOW_TRACKING_URI / tracking.uri"
            )
            raise TrackingError(
                f"cannot use the MLflow tracking store at {uri} ({type(err).__name__}: {first}). "
                f"{fix}, or set tracking.enabled: false to train without tracking"
            ) from None
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, cfg.experiment, uri)
        return cls(uri, run.info.run_id, client)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run finished (or FAILED)."""
        self._safe("run status", self.client.set_terminated, self.run_id, status)

    def warn_not_logged(self, stage: str) -> None:
        """One warning that lists everything this process could not log (no-op if nothing)."""
        if self.not_logged:
            log.warning(
                "%s: could not log everything to the MLflow store at %s; local files are "
                "complete, but these were NOT logged to run %s: %s",
                stage,
                self.uri,
                self.run_id,
                describe_not_logged(self.not_logged),
            )

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
    ) -> str | None:
        """`mlflow.pytorch.log_model` (pt2 export, signature from the example); returns the URI.

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
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    input_example=input_example,
                    metadata=dict(metadata),
                    registered_model_name=registered_name,
                    pip_requirements=_pip_requirements(),
                )
            finally:
                # `end_run` would mark the run FINISHED; evaluate still has to log into it.
                mlflow.end_run(status="RUNNING")
            return info.model_uri

        return self._safe("model", _log)


def artifact_location(uri: str) -> str | None:
    """`mlruns/` next to a SQLite store's file, as an absolute URI; None for other stores.

    MLflow would default to `./mlruns` of the *current* directory, which for the first
    `dvc exp run` is a temp copy of the repo that is deleted afterwards, artifacts and all.
    """
    if not uri.startswith("sqlite:///"):
        return None  # a server (artifact proxying) or a file store decides for itself
    db = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
    return (db.parent / "mlruns").as_uri()


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """Id of the named experiment, created on first use (tolerating a concurrent creator)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # another `dvc exp run --queue` worker created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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


# ---------------------------------------------------------------------- pipeline helpers


class BackgroundRun:
    """A :class:`Run` created and fed by one worker thread, so training never waits on the store.

    Calls are queued in order (one FIFO worker) and return at once; an epoch's metrics queue
    until the run exists. :meth:`join` waits for everything queued. If creating the run failed,
    :meth:`check` raises :class:`TrackingError` (the train stage calls it at every epoch end).
    """

    def __init__(self, start: Callable[[], Run]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgcls-mlflow")
        self._started: Future[Run] = self._pool.submit(start)
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ state

    def check(self) -> None:
        """Raise :class:`TrackingError` if the run could not be created (no-op while pending)."""
        if self._started.done():
            self._result()

    def _result(self) -> Run:
        """The started run (waits for it); a start failure becomes :class:`TrackingError`."""
        try:
            return self._started.result()
        except TrackingError:
            raise
        except Exception as err:  # mlflow raises many types; Run.start wraps most of them
            first = (str(err).splitlines() or [""])[0][:200]
            message = f"cannot start the MLflow run ({type(err).__name__}: {first})"
            raise TrackingError(message) from None

    @property
    def run(self) -> Run:
        """The underlying :class:`Run` (waits until it exists)."""
        return self._result()

    @property
    def run_id(self) -> str:
        """The run id (waits until the run exists)."""
        return self._result().run_id

    @property
    def uri(self) -> str:
        """The tracking URI (waits until the run exists)."""
        return self._result().uri

    @property
    def not_logged(self) -> list[str]:
        """What could not be logged so far (call :meth:`join` first for the full list)."""
        return self._result().not_logged if self._started.done() else []

    # ------------------------------------------------------------------ queueing

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Queue `fn(run, *args, **kwargs)` on the worker; its result arrives in the future."""

        def job() -> Any:
            return fn(self._started.result(), *args, **kwargs)

        with self._lock:
            if self._closed:
                raise RuntimeError("this run's worker is already shut down")
            return self._pool.submit(job)

    def join(self) -> Run:
        """Wait for every queued call, stop the worker; the run (or :class:`TrackingError`)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._pool.shutdown(wait=True)
        return self._result()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue one metrics batch (see :meth:`Run.log_metrics`)."""
        self.submit(Run.log_metrics, dict(metrics), step)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Queue a PNG artifact (see :meth:`Run.log_image`)."""
        self.submit(Run.log_image, image, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """Queue the run's end status and wait for everything queued (no-op if never started)."""
        if not self._closed:
            self.submit(Run.end, status)
        # Nothing to end if the run never started: check() reports that failure.
        with contextlib.suppress(TrackingError):
            self.join()

    def warn_not_logged(self, stage: str) -> None:
        """See :meth:`Run.warn_not_logged` (after :meth:`join`)."""
        self.join().warn_not_logged(stage)


def start_pipeline_run(
    params: Params,
    *,
    splits_csv: Path,
    reports_dir: Path,
    device: str,
    extra_dicts: Mapping[str, Any] | None = None,
) -> BackgroundRun | None:
    """Start the pipeline's run in the background (None when tracking is off).

    Raises :class:`TrackingError` at once (milliseconds, before any training) if the store is
    obviously unusable (server not answering, SQLite folder missing / read-only). Importing
    mlflow, creating the run and logging params, config and reports then happen on the run's
    worker thread while the caller decodes data and trains.
    """
    if not params.tracking.enabled:
        return None
    cfg = params.tracking
    probe(resolve_uri(cfg))
    resolved = params.to_dict()
    run_name = os.environ.get("DVC_EXP_NAME") or None
    extra = dict(extra_dicts or {})

    def start() -> Run:
        import yaml

        tags = {**pipeline_tags(splits_csv, device), "model.name": params.model.name}
        run = Run.start(cfg, run_name=run_name, tags=tags)
        run.log_params(resolved)
        run.log_text(yaml.safe_dump(resolved, sort_keys=False), "config/params.resolved.yaml")
        for name, data in extra.items():
            run.log_dict(data, name)
        for name in ("validation.md", "validation.json", "split.json"):
            if (reports_dir / name).is_file():
                run.log_artifact(reports_dir / name, "data")
        return run

    # No pre-import of the model-logging modules (mlflow.pytorch, torch.export) on the worker:
    # importing them during the first epoch slowed it ~15x (0.7 s -> 11 s) on a 2-core box, and
    # importing them after epoch 1 did not shorten the stage measurably.
    return BackgroundRun(start)


def finish_train_run(
    run: BackgroundRun | None,
    params: Params,
    *,
    best_epoch: int,
    best_value: float,
    model: Any,
    input_example: Any,
    metadata: Mapping[str, Any],
    model_path: Path,
) -> Callable[[], dict[str, Any]]:
    """Queue the best epoch and the models; the returned function waits and gives run.json.

    Two models are logged: `serving` (a pyfunc taking uint8 arrays or base64 image files, for
    `mlflow models serve`; registered under `tracking.register_model` when set) and `model`
    (`mlflow.pytorch`, issue 7's record; not registered). `model_path` (the saved bundle) must
    exist before this is called; the caller writes its other outputs while the worker logs.
    """
    if run is None:
        record = {"run_id": None, "tracking_uri": None, "model_uri": None}
        return lambda: {**record, "serving_model_uri": None, "not_logged": []}
    run.log_metrics({"best_epoch": best_epoch, f"best_{params.train.monitor}": best_value})
    cfg = params.tracking
    serving: Future[Any] | None = None
    pytorch: Future[Any] | None = None
    if cfg.log_model:
        serving = run.submit(_log_serving, Path(model_path), cfg.register_model)
        pytorch = run.submit(
            Run.log_pytorch_model, model, input_example=input_example, metadata=metadata
        )

    def wait() -> dict[str, Any]:
        done = run.join()
        done.warn_not_logged("train")
        return {
            "run_id": done.run_id,
            "tracking_uri": done.uri,
            "model_uri": pytorch.result() if pytorch else None,
            "serving_model_uri": serving.result() if serving else None,
            "not_logged": done.not_logged,
        }

    return wait


def _log_serving(run: Run, model_path: Path, registered_name: str | None) -> str | None:
    """The servable pyfunc model (imgcls.serving), best-effort like every other log call."""
    from imgcls.serving import log_serving_model

    return run._safe(
        "serving model", log_serving_model, model_path, run.run_id, run.uri, registered_name
    )


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
