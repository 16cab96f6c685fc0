"""Serve a trained model with MLflow: a pyfunc model that takes images, returns probabilities.

Exception to "imgcls.tracking is the only package importing mlflow": an MLflow pyfunc model *is*
an MLflow class, and `mlflow models serve` must import it from a module of its own. Run lifecycle
and tracking-store policy stay in imgcls.tracking; this module only logs / saves models.

The logged model holds `models/model.pt` as an artifact and decodes every image with
:func:`imgcls.data.dataset.load_image`, so a served request is preprocessed exactly like the
evaluation split. It is stored as "models from code" (a two-line script that builds
:class:`ImgclsServingModel`), so loading it never unpickles anything; the serving environment
needs imgcls installed (`mlflow models serve --env-manager local` from the project venv). Models
logged before imgcls 16's layout name `imgcls.serving.ImgclsServingModel` in their script: that
module stays as a re-export so they keep loading.
Every request is bounded by the model's `limits` (imgcls.models.bundle.DEFAULT_LIMITS): images
per request, bytes per request and per image, pixels per image (checked from the header).

Loading a logged model without running its code is :mod:`imgcls.inference.logged`'s job.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image

from imgcls.data.dataset import load_image
from imgcls.data.imageinfo import check_pixels
from imgcls.errors import ImgclsError
from imgcls.inference.decode import decode_error
from imgcls.inference.logged import (
    MODEL_ARTIFACT,
    ServingError,
    download_bundle,
    load_downloaded,
)
from imgcls.models.bundle import DEFAULT_LIMITS, limits_of, load_bundle
from imgcls.task import decided_labels, split_labels, task_of

IMAGE_KEYS = ("image", "images", "image_base64", "b64")  # accepted dict keys / column names
_CODE = (
    "# imgcls serving model (MLflow models-from-code): MLflow runs this to build the model.\n"
    "import mlflow.models\n"
    "from imgcls.inference.serving import ImgclsServingModel\n"
    "mlflow.models.set_model(ImgclsServingModel())\n"
)


# ---------------------------------------------------------------------- decoding requests


def decode_base64(text: str, max_bytes: int = DEFAULT_LIMITS["max_image_bytes"]) -> bytes:
    """Base64 (optionally a `data:image/...;base64,` URL) -> bytes; raises ValueError."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    size = len(text) * 3 // 4  # decoded size, known before decoding anything
    if size > max_bytes:
        raise ValueError(f"too large: {size} bytes > max_image_bytes ({max_bytes})")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64 (send the image file's bytes, base64-encoded)") from None


def image_from_bytes(
    data: bytes, size: int, channels: int, limits: Mapping[str, int] = DEFAULT_LIMITS
) -> np.ndarray:
    """An image file's bytes -> (size, size, channels) uint8, decoded like training."""
    if not data:
        raise ValueError("empty file")
    if len(data) > limits["max_image_bytes"]:
        raise ValueError(
            f"too large: {len(data)} bytes > max_image_bytes ({limits['max_image_bytes']})"
        )
    try:
        return load_image(io.BytesIO(data), size, channels, limits["max_image_pixels"])
    except Exception as err:  # every decoder failure is this image's, not the request's
        raise ValueError(decode_error(err)) from None


def image_from_array(
    arr: np.ndarray, size: int, channels: int, limits: Mapping[str, int] = DEFAULT_LIMITS
) -> np.ndarray:
    """Decoded pixels (H, W), (H, W, 1|3|4), values 0-255 -> (size, size, channels) uint8."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "uif" or arr.size == 0:
        raise ValueError(f"an image array must hold numbers 0-255, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}"
        )
    check_pixels(arr.shape[1], arr.shape[0], limits["max_image_pixels"])
    if arr.dtype != np.uint8:
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255:
            raise ValueError("image array values must be uint8 pixels in 0-255")
        if np.any(arr != np.round(arr)):
            raise ValueError("image array values must be whole numbers (uint8 pixels 0-255)")
        arr = arr.astype(np.uint8)
    if (arr.shape == (size, size) and channels == 1) or arr.shape == (size, size, channels):
        return arr.reshape(size, size, channels)  # already what the model takes: no resampling
    # Any other size / channel count goes through the same decoder as files (PNG is lossless).
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    # The PNG of pixels already within the pixel limit is the server's own: no byte cap.
    return image_from_bytes(buf.getvalue(), size, channels, {**limits, "max_image_bytes": 1 << 62})


def item_bytes(item: Any) -> int:
    """What one request item costs: its base64 text / bytes length, or its pixel values."""
    if isinstance(item, str | bytes | bytearray):
        return len(item)
    try:
        return int(np.size(item))
    except ValueError:  # a ragged nested list: not an image, but count what it holds
        return sum(item_bytes(x) for x in item) if isinstance(item, list | tuple) else 0


def check_request(items: list[Any], limits: Mapping[str, int]) -> None:
    """Refuse a whole request above `max_request_items` images or `max_request_bytes`."""
    if len(items) > limits["max_request_items"]:
        raise ServingError(
            f"too many images: {len(items)} in one request > max_request_items "
            f"({limits['max_request_items']}); send them in several requests"
        )
    total = sum(item_bytes(item) for item in items)
    if total > limits["max_request_bytes"]:
        raise ServingError(
            f"request too large: {total} bytes of images > max_request_bytes "
            f"({limits['max_request_bytes']}); send fewer or smaller images per request"
        )


def request_items(model_input: Any) -> list[Any]:
    """Split a request into one item per image: bytes, base64 text, or a pixel array.

    Accepts what `mlflow models serve` hands over for `{"inputs": ...}`, `{"instances": ...}` and
    `{"dataframe_records" / "dataframe_split": ...}` bodies, and what `pyfunc.predict` gets
    in-process: a uint8 batch (B, H, W, C), one image (H, W[, C]), a list of images, base64
    strings or file bytes, a DataFrame / dict with an `image` column.
    """
    if isinstance(model_input, pd.DataFrame):
        cols = [c for c in model_input.columns if str(c) in IMAGE_KEYS]
        if not cols and len(model_input.columns) != 1:
            raise ServingError(
                f"DataFrame input needs a column named one of {IMAGE_KEYS}; got "
                f"{[str(c) for c in model_input.columns]}"
            )
        return list(model_input[cols[0] if cols else model_input.columns[0]])
    if isinstance(model_input, Mapping):
        keys = [k for k in model_input if str(k) in IMAGE_KEYS]
        if not keys and len(model_input) != 1:
            raise ServingError(
                f"dict input needs one of the keys {IMAGE_KEYS}; got {list(model_input)}"
            )
        return request_items(model_input[keys[0] if keys else next(iter(model_input))])
    if isinstance(model_input, str | bytes):
        return [model_input]
    if isinstance(model_input, torch.Tensor):
        model_input = model_input.cpu().numpy()
    if isinstance(model_input, list | tuple):
        if all(isinstance(x, str | bytes) for x in model_input):
            return list(model_input)
        try:
            model_input = np.asarray(model_input)
        except ValueError:  # ragged: images of different sizes
            return list(model_input)
        if model_input.dtype == object:
            return list(model_input)
    if isinstance(model_input, np.ndarray):
        return _array_items(model_input)
    raise ServingError(
        f"cannot read a request of type {type(model_input).__name__}; send uint8 image arrays "
        "or base64-encoded image files (see docs/predict.md, 'Serving')"
    )


def _array_items(arr: np.ndarray) -> list[Any]:
    """Numeric (B, H, W, C) / (H, W, C) / (H, W) or 1-D string arrays -> one item per image."""
    if arr.dtype.kind in "USO":
        return list(arr.reshape(-1))
    if arr.ndim == 4:
        return list(arr)  # (B, H, W, C)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        return [arr]  # one (H, W, C) image
    if arr.ndim == 3:
        return list(arr)  # (B, H, W) grayscale batch
    if arr.ndim == 2:
        return [arr]
    raise ServingError(f"cannot read an image array of shape {arr.shape}; send (B, H, W, C)")


def decode_item(
    item: Any, size: int, channels: int, limits: Mapping[str, int] = DEFAULT_LIMITS
) -> np.ndarray:
    """One request item -> (size, size, channels) uint8; raises ValueError with the reason."""
    if isinstance(item, str):
        return image_from_bytes(
            decode_base64(item, limits["max_image_bytes"]), size, channels, limits
        )
    if isinstance(item, bytes | bytearray):
        return image_from_bytes(bytes(item), size, channels, limits)
    return image_from_array(np.asarray(item), size, channels, limits)


# ---------------------------------------------------------------------- the pyfunc model


class ImgclsServingModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: images -> [{label, probability, probabilities, error}, ...] per image."""

    # Requests mix base64 strings, bytes and arrays of any shape: MLflow's type-hint schema
    # validation would reject them before `predict` could, and warns about hints it cannot use.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Load the bundle; device from `model_config={"device": ...}` (default CPU)."""
        config = context.model_config or {}
        self.device = torch.device(config.get("device") or "cpu")
        clf, meta = load_bundle(context.artifacts[MODEL_ARTIFACT])
        self.clf = clf.to(self.device).eval()
        self.meta = meta
        self.limits = limits_of(meta)

    def predict(self, context, model_input, params=None) -> list[dict[str, Any]]:
        """Class probabilities per image; an unreadable image gets its own `error`."""
        # Inputs deliberately unannotated: MLflow infers a signature from hints at log time.
        classes = list(self.meta["classes"])
        size, channels = int(self.meta["image_size"]), int(self.meta["channels"])
        rows: list[dict[str, Any]] = []
        good: list[np.ndarray] = []
        items = request_items(model_input)
        check_request(items, self.limits)
        for item in items:
            try:
                good.append(decode_item(item, size, channels, self.limits))
                rows.append({})
            except ValueError as err:
                rows.append({"label": None, "probability": None, "probabilities": None})
                rows[-1]["error"] = str(err)
        probs = self._probs(np.stack(good)) if good else np.zeros((0, len(classes)))
        # The model's decision: arg-max, a binary model's tuned threshold, or a label set.
        task = task_of(self.meta)
        decided = iter(decided_labels(task, probs, classes, self.meta.get("thresholds")))
        it = iter(probs)
        for row in rows:
            if not row:
                p = next(it)
                label, probability = next(decided)
                row.update(
                    label=label,
                    probability=probability,
                    probabilities={c: float(v) for c, v in zip(classes, p, strict=True)},
                    error=None,
                )
                if task == "multilabel":
                    row["labels"] = split_labels(label)
        return rows

    @torch.no_grad()
    def _probs(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, S, S, C) uint8 -> (N, K) float probabilities."""
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
            out.append(self.clf(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out)


# ---------------------------------------------------------------------- logging / loading


def _pip_requirements() -> list[str]:
    """What the served model imports (imgcls itself must be installed in the serving env)."""
    from importlib.metadata import version

    names = ("torch", "timm", "mlflow", "numpy", "pandas", "pillow")
    return [f"{name}=={version(name)}" for name in names]


def log_serving_model(
    model_path: Path,
    run_id: str,
    tracking_uri: str,
    registered_name: str | None = None,
    *,
    name: str = "serving",
) -> str:
    """Log `model_path` as a servable pyfunc model into an existing run; returns its model URI.

    The run keeps its status (RUNNING stays RUNNING). With `registered_name`, the model is also
    registered as a new version of that name, so `mlflow models serve -m models:/<name>/<version>`
    serves it.
    """
    return log_serving_model_info(model_path, run_id, tracking_uri, registered_name, name=name)[0]


def log_serving_model_info(
    model_path: Path,
    run_id: str,
    tracking_uri: str,
    registered_name: str | None = None,
    *,
    name: str = "serving",
) -> tuple[str, int | None]:
    """:func:`log_serving_model`, also returning the registered version (None if not registered)."""
    model_path = Path(model_path)
    _, meta = load_bundle(model_path)  # fail here, not at serve time, on a bad model file
    mlflow.set_tracking_uri(tracking_uri)
    status = mlflow.tracking.MlflowClient(tracking_uri).get_run(run_id).info.status
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "imgcls_serving_model.py"
        code.write_text(_CODE, encoding="utf-8")
        mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code),
                artifacts={MODEL_ARTIFACT: str(model_path)},
                metadata={**meta, "imgcls_input": "uint8 arrays or base64-encoded image files"},
                pip_requirements=_pip_requirements(),
                registered_model_name=registered_name,
            )
        finally:
            mlflow.end_run(status=status)  # ending as FINISHED would close the pipeline's run
    version = getattr(info, "registered_model_version", None)
    return info.model_uri, None if version is None else int(version)


def save_trusted_serving_model(uri: str, dest: Path) -> Path:
    """Rebuild a servable model folder from only the model file inside a logged model.

    `mlflow models serve -m models:/...` runs whatever Python the registered model names (for
    imgcls's own, a two-line script). Serve `dest` instead, and only imgcls's code runs: the
    folder holds this imgcls's script and the weights-only model file, checked by loading it.
    """
    dest = Path(dest)
    if dest.exists():
        raise ServingError(f"{dest} already exists; give a new folder for the serving model")
    with tempfile.TemporaryDirectory() as tmp:
        local, rel = download_bundle(uri, Path(tmp))
        _, meta = load_downloaded(uri, local, rel)
        code = Path(tmp) / "imgcls_serving_model.py"
        code.write_text(_CODE, encoding="utf-8")
        mlflow.pyfunc.save_model(
            path=str(dest),
            python_model=str(code),
            artifacts={MODEL_ARTIFACT: str(local)},
            metadata={**meta, "imgcls_source": uri},
            pip_requirements=_pip_requirements(),
        )
    return dest


def main(argv: list[str] | None = None) -> None:
    """`python -m imgcls.inference.serving URI FOLDER`: see :func:`save_trusted_serving_model`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m imgcls.inference.serving",
        description="Write a servable MLflow model folder from only the weights-only model file "
        "of a logged model; then: mlflow models serve -m FOLDER --env-manager local",
    )
    parser.add_argument("uri", help="runs:/<run_id>/serving or models:/<name>/<version>")
    parser.add_argument("folder", type=Path, help="new folder to write")
    args = parser.parse_args(argv)
    try:
        print(save_trusted_serving_model(args.uri, args.folder))
    except ImgclsError as err:
        print(f"python -m imgcls.inference.serving: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
