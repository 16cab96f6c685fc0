"""Where runs go and whether the store can be used: URI resolution, the fail-fast probe, tags.

Library code never decides where runs go: the tracking URI comes from `MLFLOW_TRACKING_URI`,
then `tracking.uri`, then a SQLite file at the repository root. The root is `DVC_ROOT` when DVC
runs the stage (DVC points it at the parent repo even inside `dvc exp run` temp copies), so every
experiment lands in one store. Nothing here imports mlflow: the train stage calls it first.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgcls.config import TrackingConfig
from imgcls.errors import ImgclsError

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


def is_main_rank() -> bool:
    """True unless torchrun made this process a rank other than 0 (read from `RANK`, no torch)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


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


def is_http(uri: str) -> bool:
    """True for an MLflow tracking server (as opposed to a local SQLite / file store)."""
    return uri.startswith(("http://", "https://"))


def apply_http_defaults(uri: str) -> None:
    """Bounded retries / timeout for HTTP stores, unless the user set the variables."""
    if is_http(uri):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` within ~`timeout` s if the store obviously cannot be used.

    Cheap on purpose (no mlflow import, ~ms): it runs before training, while the run itself is
    created in the background. HTTP(S): any HTTP answer counts as reachable (a 401 from an
    auth-enabled server too: creating the run then reports the credentials problem); only
    "nothing answered" fails. SQLite / file stores: the folder must exist and be writable.
    """
    if is_http(uri):
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


def artifact_location(uri: str) -> str | None:
    """`mlruns/` next to a SQLite store's file, as an absolute URI; None for other stores.

    MLflow would default to `./mlruns` of the *current* directory, which for the first
    `dvc exp run` is a temp copy of the repo that is deleted afterwards, artifacts and all.
    """
    if not uri.startswith("sqlite:///"):
        return None  # a server (artifact proxying) or a file store decides for itself
    db = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
    return (db.parent / "mlruns").as_uri()


def experiment_id(client: Any, name: str, uri: str) -> str:
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


def store_error(uri: str, err: Exception) -> TrackingError:
    """The one-line error for a store that MLflow could not use (names the URI and the fix)."""
    first = (str(err).splitlines() or [""])[0][:200]
    auth = any(code in str(err) for code in ("401", "403"))
    fix = (
        "Set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for this server"
        if auth
        else "Start the server, fix MLFLOW_TRACKING_URI / tracking.uri"
    )
    return TrackingError(
        f"cannot use the MLflow tracking store at {uri} ({type(err).__name__}: {first}). "
        f"{fix}, or set tracking.enabled: false to train without tracking"
    )
