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
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
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


def pipeline_tags(splits_csv: Path, device: str | None = None) -> dict[str, str]:
    """Tags that tie a run to its code, data, DVC experiment, device and imgcls version."""
    import imgcls

    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {
        **git_info(repo_root()),
        "dvc.exp_name": exp_name,
        "data.splits_sha256": file_sha256(splits_csv),
        "imgcls.version": imgcls.__version__,
        "mlflow.source.name": "dvc exp run" if exp_name else "dvc repro",
    }
    return tags if device is None else {**tags, "device": device}


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


# The pipeline's run lives in a separate logger *process* (not a thread): on a 2-core box a
# thread shared the GIL and the CPU with training and cost +14 % / +22 % of the train stage
# (bench/RESULTS.md, issue 7). The process is spawned before the train stage imports torch,
# so importing mlflow and creating the run use the core that those imports leave idle; it runs
# at a low priority, so during training it only gets CPU time that training leaves unused.
# The train process never imports mlflow: each call pickles a message onto a pipe, in order.
LOGGER_NICE = 19
# After its last reply the logger skips interpreter shutdown (os._exit): tearing down mlflow,
# SQLAlchemy and torch took ~1.6 s that the train stage would wait for, and every call has been
# applied (and answered) by then.
_LOGGER_CODE = (
    "import os, sys; from imgcls.tracking import logger_main; logger_main(int(sys.argv[1])); "
    "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)"
)
# Run methods the train stage may call on the logger (anything else is a programming error).
_RUN_CALLS = frozenset(
    {"log_params", "set_tags", "log_metrics", "log_dict", "log_text", "log_image", "end"}
)


def is_main_rank() -> bool:
    """True unless torchrun made this process a rank other than 0 (read from `RANK`, no torch)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


class RunProcess:
    """The pipeline's MLflow run, created and fed by a separate, low-priority logger process.

    Calls return at once (a sender thread writes the pipe, so training never blocks on it) and
    are applied in order. :meth:`check` raises :class:`TrackingError` once the logger reports
    that creating the run failed; :meth:`join` waits for every queued call and the logger's
    exit. If the logger dies, training goes on and the lost calls are listed in
    :attr:`not_logged`. POSIX only (the pipe is inherited with `pass_fds`).
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        ours, theirs = multiprocessing.Pipe()
        fd = theirs.fileno()
        self._proc = subprocess.Popen([sys.executable, "-c", _LOGGER_CODE, str(fd)], pass_fds=[fd])
        theirs.close()
        self._conn = ours
        self.uri: str = spec["cfg"].uri
        self._run_id: str | None = None
        self._error: str | None = None
        self._record: dict[str, Any] | None = None
        self._lost: list[str] = []  # calls that never reached the logger
        self._outbox: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, name="imgcls-mlflow", daemon=True)
        self._sender.start()
        self._send("run", "start", dict(spec))

    # ------------------------------------------------------------------ plumbing

    def _send(self, what: str, name: str, *args: Any) -> None:
        """Queue one call for the logger; `what` names it in :attr:`not_logged` if it is lost."""
        if self._record is not None:
            raise RuntimeError("this run's logger is already closed")
        self._outbox.put((what, (name, *args)))

    def _send_all(self) -> None:
        """Sender thread: pickle queued calls onto the pipe (blocks here, never in training)."""
        while (item := self._outbox.get()) is not None:
            what, message = item
            try:
                self._conn.send(message)
            except Exception:  # the logger exited (run creation failed) or the call won't pickle
                self._lost.append(what)

    def _read(self, block: bool) -> None:
        """Apply the logger's replies: `started`, `failed` or `done` (waits for one if `block`)."""
        try:
            while block or self._conn.poll():
                kind, value = self._conn.recv()
                if kind == "started":
                    self._run_id = value
                elif kind == "failed":
                    self._error = value
                else:  # "done"
                    self._record = value
                block = False
        except (EOFError, OSError):  # the logger exited without saying why (crashed or killed)
            if self._run_id is None and self._error is None:
                self._error = f"the MLflow logger process exited ({self._proc.poll()})"
            if self._record is None:
                self._record = {"not_logged": ["the rest (the logger process died)"]}

    # ------------------------------------------------------------------ state

    def check(self) -> None:
        """Raise :class:`TrackingError` if the run could not be created (no-op while pending)."""
        if self._error is None and self._record is None:
            self._read(block=False)
        if self._error is not None:
            raise TrackingError(self._error)

    @property
    def run_id(self) -> str:
        """The run id (waits until the logger has created the run)."""
        while self._run_id is None and self._error is None and self._record is None:
            self._read(block=True)
        self.check()
        assert self._run_id is not None
        return self._run_id

    @property
    def not_logged(self) -> list[str]:
        """What could not be logged (complete after :meth:`join`)."""
        return [*(self._record or {}).get("not_logged", []), *self._lost]

    # ------------------------------------------------------------------ calls

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue one metrics batch (see :meth:`Run.log_metrics`)."""
        what = "metrics" if step is None else f"metrics (step {step})"
        self._send(what, "log_metrics", dict(metrics), step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (see :meth:`Run.set_tags`)."""
        self._send("tags", "set_tags", dict(tags))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Queue a JSON / YAML artifact (see :meth:`Run.log_dict`)."""
        self._send(f"artifact {artifact_file}", "log_dict", data, artifact_file)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Queue a PNG artifact (see :meth:`Run.log_image`)."""
        self._send(f"artifact {artifact_file}", "log_image", image, artifact_file)

    def log_models(
        self, model_path: Path, input_example: Any, metadata: Any, registered_name: str | None
    ) -> None:
        """Queue both models, read by the logger from the saved bundle (see `finish_train_run`)."""
        import numpy as np

        example = np.array(input_example)  # a copy: the caller may reuse its buffer
        if example.ndim < 1 or len(example) < 2:
            raise ValueError("input_example needs >= 2 samples to export a dynamic batch size")
        self._send("model", "log_models", Path(model_path), example, metadata, registered_name)

    def join(self) -> dict[str, Any]:
        """Wait for every queued call and the logger's exit; its record or TrackingError."""
        if self._record is None:
            self._outbox.put(("close", ("close",)))
            self._outbox.put(None)
            self._sender.join()
            while self._record is None:
                self._read(block=True)
            self._conn.close()
            self._proc.wait()
        if self._error is not None:
            raise TrackingError(self._error)
        return self._record

    def end(self, status: str = "FINISHED") -> None:
        """Queue the run's end status and wait for the logger (no-op if the run never started)."""
        if self._record is None:
            self._send("run status", "end", status)
        with contextlib.suppress(TrackingError):  # check() reports a start failure
            self.join()

    def warn_not_logged(self, stage: str) -> None:
        """One warning listing what this run could not log (after :meth:`join`)."""
        warn_not_logged(stage, self.uri, self._run_id, self.not_logged)


def logger_main(fd: int) -> None:
    """The logger process: create the run, then apply the train stage's calls in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the train process ends the run
    os.nice(LOGGER_NICE)
    from imgcls.stage import setup_logging

    setup_logging()
    conn = Connection(fd)
    run: Run | None = None
    try:
        _, spec = conn.recv()
        try:
            run = _create_pipeline_run(spec)
        except Exception as err:
            conn.send(("failed", _start_failure(err)))
            return
        conn.send(("started", run.run_id))
        warm = None
        if spec["log_model"]:  # import torch.export & co while training leaves a core idle
            warm = threading.Thread(target=_prewarm_model_logging, daemon=True)
            warm.start()
        models: dict[str, Any] = {}
        while (message := conn.recv())[0] != "close":
            if message[0] == "log_models":
                if warm is not None:
                    warm.join()
                models = _log_models(run, *message[1:])
            elif message[0] in _RUN_CALLS:
                _apply(run, message[0], message[1:])
        conn.send(("done", {"not_logged": run.not_logged, **models}))
    except EOFError:  # the train process died without closing: don't leave the run RUNNING
        if run is not None:
            run.end("FAILED")


def _apply(run: Run, name: str, args: tuple[Any, ...]) -> None:
    """One queued call; a local error (not the store) is logged and listed, the logger goes on."""
    try:
        getattr(run, name)(*args)
    except Exception as err:
        log.warning("MLflow: %s failed: %s: %s", name, type(err).__name__, err)
        run.not_logged.append(name)


def _start_failure(err: Exception) -> str:
    """The one-line message the train stage raises when the run could not be created."""
    if isinstance(err, TrackingError):
        return str(err)
    first = (str(err).splitlines() or [""])[0][:200]
    return f"cannot start the MLflow run ({type(err).__name__}: {first})"


def _create_pipeline_run(spec: Mapping[str, Any]) -> Run:
    """In the logger: start the run, log params, resolved config and the data reports."""
    import yaml

    resolved, reports_dir = spec["resolved"], Path(spec["reports_dir"])
    tags = {**pipeline_tags(Path(spec["splits_csv"])), "model.name": resolved["model"]["name"]}
    run = Run.start(spec["cfg"], run_name=spec["run_name"], tags=tags)
    run.log_params(resolved)
    run.log_text(yaml.safe_dump(resolved, sort_keys=False), "config/params.resolved.yaml")
    for name in ("validation.md", "validation.json", "split.json"):
        if (reports_dir / name).is_file():
            run.log_artifact(reports_dir / name, "data")
    return run


def _prewarm_model_logging() -> None:
    """Save and reload a tiny model in a temp dir (never the store): warms torch.export & co.

    Cold, the first `mlflow.pytorch.log_model` of a process costs ~3.6 s of CPU (imports and
    lazy initialisation of torch.export, the pt2 loader, pyfunc); after this ~0.8 s. Runs in
    the low-priority logger while training, so the train stage does not wait for it at the end.
    """
    try:
        import mlflow.pyfunc
        import mlflow.pytorch
        import numpy as np
        import torch

        from imgcls.models.bundle import ImageClassifier

        torch.set_num_threads(1)
        layers = [torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(8, 2))
        model = ImageClassifier(net, [0.5], [0.25]).eval()
        example = np.zeros((2, 4, 4, 1), np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "model")
            mlflow.pytorch.save_model(model, path, input_example=example, pip_requirements=[])
            mlflow.pyfunc.load_model(path).predict(example)
    except Exception as err:  # only an optimisation: the real logging reports real problems
        log.debug("prewarming model logging failed: %s", err)


def _log_models(
    run: Run, model_path: Path, example: Any, metadata: Any, registered_name: str | None
) -> dict[str, str | None]:
    """In the logger: the `serving` pyfunc and the `mlflow.pytorch` model, from `model_path`."""
    from imgcls.inference.serving import log_serving_model
    from imgcls.models.bundle import load_bundle

    serving = run._safe(
        "serving model", log_serving_model, model_path, run.run_id, run.uri, registered_name
    )
    # Rebuilt from the saved bundle (as `imgcls.serving` does), so the logged model is exactly
    # what models/model.pt holds, and no module has to be pickled between processes.
    loaded = run._safe("model", load_bundle, model_path)
    model_uri = None
    if loaded is not None:
        model_uri = run.log_pytorch_model(
            loaded[0], input_example=example, metadata=metadata, bundle=model_path
        )
    return {"model_uri": model_uri, "serving_model_uri": serving}


def start_pipeline_run(
    params: Params,
    *,
    splits_csv: Path,
    reports_dir: Path,
    device: str | None = None,
    extra_dicts: Mapping[str, Any] | None = None,
) -> RunProcess | None:
    """Start the pipeline's run in a logger process (None when tracking is off).

    Raises :class:`TrackingError` at once (milliseconds, before any training) if the store is
    obviously unusable (server not answering, SQLite folder missing / read-only). Call it
    before the slow imports: the logger then imports mlflow and creates the run meanwhile.
    `device` and `extra_dicts` may also be sent later (`set_tags`, `log_dict`).
    """
    if not params.tracking.enabled:
        return None
    cfg = params.tracking.model_copy(update={"uri": resolve_uri(params.tracking)})
    probe(cfg.uri)
    spec = {
        "cfg": cfg,
        "run_name": os.environ.get("DVC_EXP_NAME") or None,
        "resolved": params.to_dict(),
        "splits_csv": str(splits_csv),
        "reports_dir": str(reports_dir),
        "log_model": cfg.log_model,
    }
    run = RunProcess(spec)
    if device is not None:
        run.set_tags({"device": device})
    for name, data in (extra_dicts or {}).items():
        run.log_dict(data, name)
    return run


def finish_train_run(
    run: RunProcess | None,
    params: Params,
    *,
    best_epoch: int,
    best_value: float,
    input_example: Any,
    metadata: Mapping[str, Any],
    model_path: Path,
) -> Callable[[], dict[str, Any]]:
    """Queue the best epoch and the models; the returned function waits and gives run.json.

    Two models are logged from `model_path` (the saved bundle, which must exist): `serving` (a
    pyfunc taking uint8 arrays or base64 image files, for `mlflow models serve`; registered
    under `tracking.register_model` when set) and `model` (`mlflow.pytorch`, issue 7's record;
    not registered). The caller writes its other outputs while the logger works.
    """
    if run is None:
        record = {"run_id": None, "tracking_uri": None, "model_uri": None}
        return lambda: {**record, "serving_model_uri": None, "not_logged": []}
    run.log_metrics({"best_epoch": best_epoch, f"best_{params.train.monitor}": best_value})
    cfg = params.tracking
    if cfg.log_model:
        run.log_models(model_path, input_example, dict(metadata), cfg.register_model)

    def wait() -> dict[str, Any]:
        done = run.join()
        run.warn_not_logged("train")
        return {
            "run_id": run.run_id,
            "tracking_uri": run.uri,
            "model_uri": done.get("model_uri"),
            "serving_model_uri": done.get("serving_model_uri"),
            "not_logged": run.not_logged,
        }

    return wait


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
