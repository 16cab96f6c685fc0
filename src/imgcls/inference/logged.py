"""Load a model logged to MLflow without running its code: only the weights-only model file.

:func:`load_logged_model` (`imgcls predict --model-uri`, `imgcls export --model-uri`) reads only
the imgcls model file (`models/model.pt` format) inside a logged model; it never runs MLflow's
loaders, which unpickle and import the model's code. Both `imgcls.inference.predict` and
`imgcls.inference.serving` use it, so it lives below them (no import cycle).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from imgcls.errors import ImgclsError
from imgcls.models.bundle import ImageClassifier, load_bundle

MODEL_ARTIFACT = "model_file"  # key of the bundle in the pyfunc model's artifacts
BUNDLE_NAME = "model.pt"  # the bundle's file name in a logged model (both flavours)


class ServingError(ImgclsError):
    """A request the serving model cannot read, or a model URI that cannot be loaded."""


def load_logged_model(uri: str) -> tuple[ImageClassifier, dict[str, Any]]:
    """`runs:/...` or `models:/...` (`@alias` too) -> (uint8 images -> probabilities module, meta).

    Reads only the imgcls model file (`models/model.pt` format) inside the logged model: the
    serving model's `model_file` artifact, or the `mlflow.pytorch` model's extra file. Only the
    MLmodel file (YAML, safe-loaded) and that one file are downloaded; it is loaded with
    `torch.load(weights_only=True)`. A pickled `model.pth` and the model's code folder are never
    downloaded, unpickled or put on `sys.path`, so a registered model cannot run code here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local, rel = download_bundle(uri, Path(tmp))
        return load_downloaded(uri, local, rel)


def download_bundle(uri: str, dest: Path) -> tuple[Path, str]:
    """Download only the MLmodel file and the imgcls model file it names into `dest`.

    Returns (local path, its path inside the logged model). Nothing is loaded or run.
    """
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    # A per-file download bar for a local model only clutters `imgcls predict`'s output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        repo = get_artifact_repository(uri)
        mlmodel = Model.load(repo.download_artifacts("MLmodel", str(dest)))
    except Exception as err:  # mlflow raises many types for a bad URI / unreachable store
        first = (str(err).splitlines() or [""])[0][:300]
        raise ServingError(
            f"cannot load the MLflow model {uri!r} ({type(err).__name__}: {first}). Check "
            "the URI (runs:/<run_id>/model, models:/<name>/<version> or models:/<name>@<alias>, "
            "e.g. models:/imgcls@champion) and "
            "MLFLOW_TRACKING_URI"
        ) from None
    try:
        rel = bundle_artifact(mlmodel)
    except (AttributeError, TypeError):  # an MLmodel whose flavours are not mappings
        rel = None
    if rel is None:
        raise ServingError(
            f"{uri}: this logged model holds no imgcls model file ({BUNDLE_NAME}); imgcls "
            "loads nothing else (a pickled model could run its author's code). Models "
            "logged before imgcls stopped unpickling: use runs:/<run_id>/serving of the "
            "same run, or --model models/model.pt"
        )
    try:
        return Path(repo.download_artifacts(rel, str(dest))), rel
    except Exception as err:
        first = (str(err).splitlines() or [""])[0][:300]
        raise ServingError(
            f"{uri}: cannot download {rel} ({type(err).__name__}: {first})"
        ) from None


def load_downloaded(uri: str, local: Path, rel: str) -> tuple[ImageClassifier, dict[str, Any]]:
    """load_bundle, with errors that name the model URI instead of a temporary folder."""
    try:
        return load_bundle(local)
    except ImgclsError as err:
        raise ServingError(str(err).replace(str(local), f"{uri} ({rel})")) from None


def bundle_artifact(mlmodel: Any) -> str | None:
    """The relative path of the imgcls model file inside a logged model, or None."""
    flavors = mlmodel.flavors or {}
    pyfunc = flavors.get("python_function", {}).get("artifacts", {}).get(MODEL_ARTIFACT, {})
    candidates = [pyfunc.get("path")]  # the serving model's bundle, whatever its file name
    extra = flavors.get("pytorch", {}).get("extra_files") or []
    candidates += [
        e.get("path")
        for e in extra
        if isinstance(e, Mapping) and PurePosixPath(str(e.get("path"))).name == BUNDLE_NAME
    ]
    for rel in candidates:
        if not isinstance(rel, str) or not rel:
            continue
        path = PurePosixPath(rel)
        # The MLmodel file is the model author's: a path must stay inside the model folder.
        if not path.is_absolute() and ".." not in path.parts and "\\" not in rel:
            return rel
    return None
