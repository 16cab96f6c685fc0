"""The only module that imports mlflow: URI resolution, run lifecycle and fault-tolerant logging.

Library code never decides where runs go: the tracking URI comes from `MLFLOW_TRACKING_URI`,
then `tracking.uri`, then a SQLite file at the repository root. The root is `DVC_ROOT` when DVC
runs the stage (DVC points it at the parent repo even inside `dvc exp run` temp copies), so every
experiment lands in one store.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgcls.config import TrackingConfig
from imgcls.errors import ImgclsError

log = logging.getLogger("imgcls.tracking")


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
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists become their string form."""
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
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


class Run:
    """One MLflow run shared by the train and evaluate stages.

    Every logging call is best-effort once the run has started: if the store drops mid-run,
    training goes on, local files are still written, and :attr:`not_logged` says what was lost.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.not_logged: list[str] = []

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
        from mlflow.tracking import MlflowClient

        uri = resolve_uri(cfg, root)
        client = MlflowClient(tracking_uri=uri)
        try:
            exp = client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
            run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
        except Exception as err:  # mlflow raises many types for an unreachable store
            raise TrackingError(
                f"cannot reach the MLflow tracking store at {uri} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}). Start the server, fix MLFLOW_TRACKING_URI / "
                "tracking.uri, or set tracking.enabled: false to train without tracking"
            ) from None
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, cfg.experiment, uri)
        return cls(uri, run.info.run_id)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run finished (or FAILED)."""
        self._safe("run status", self.client.set_terminated, self.run_id, status)

    # ------------------------------------------------------------------ logging

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call an mlflow function; on failure warn once per kind and remember what was lost."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a dropped store must not kill a long training run
            if not any(item.startswith(what) for item in self.not_logged):
                warnings.warn(
                    f"MLflow: could not log {what}: {type(err).__name__}: {err}", stacklevel=3
                )
            self.not_logged.append(what)
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flattened params in batches (MLflow caps a batch at 100 params)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
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
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(_metric_key(k), float(v), ts, step or 0)
            for k, v in metrics.items()
            if v is not None
        ]
        for i in range(0, len(items), 1000):
            self._safe("metrics", self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload a local file or folder."""
        self._safe(
            f"artifact {path}", self.client.log_artifact, self.run_id, str(path), artifact_path
        )

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

    def log_pytorch_model(
        self,
        model: Any,
        *,
        input_example: Any,
        metadata: Mapping[str, Any],
        registered_name: str | None = None,
    ) -> str | None:
        """`mlflow.pytorch.log_model` with a signature from the input example; returns the URI."""
        import mlflow

        def _log() -> str:
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    input_example=input_example,
                    metadata=dict(metadata),
                    registered_model_name=registered_name,
                    pip_requirements=_pip_requirements(),
                )
            return info.model_uri

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
            return self._safe("model", _log)


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
