"""Export a trained model to ONNX or TorchScript, with its metadata inside, and verify it.

The exported graph is the whole :class:`~imgcls.models.bundle.ImageClassifier`: uint8 images
(B, S, S, C) in, class probabilities (B, K) out, with the training mean / std built in, so a
runtime only has to decode and resize images (as `load_image` does) and feed the pixels.
The batch dimension is dynamic. The model metadata (classes, image size, channels, ...) is stored
as JSON: ONNX `metadata_props["imgcls_meta"]`, TorchScript extra file `imgcls_meta.json`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from imgcls.errors import ImgclsError
from imgcls.io import atomic_path

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[Format, ...] = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
META_KEY = "imgcls_meta"
META_FILE = "imgcls_meta.json"
ATOL = 1e-4  # largest probability difference an export may show against PyTorch

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 (B, S, S, C) -> (B, K) probabilities


class ExportError(ImgclsError):
    """The model cannot be exported, a tool is missing, or the export disagrees with PyTorch."""


def default_output(model_path: Path | str, fmt: Format) -> Path:
    """models/model.pt -> models/model.onnx or models/model.torchscript.pt."""
    path = Path(model_path)
    return path.with_name(path.stem + SUFFIX[fmt])


def example_input(meta: dict[str, Any], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (batch, S, S, C) of the model's input shape."""
    size, channels = int(meta["image_size"]), int(meta["channels"])
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, channels), dtype=torch.uint8, generator=gen)


def _json_meta(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, default=str)


def export_onnx(clf: nn.Module, meta: dict[str, Any], out: Path | str) -> Path:
    """Write an ONNX model (torch.export-based exporter, dynamic batch) atomically."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail with a clear message)
    except ImportError:
        raise ExportError(
            "ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript"
        ) from None
    clf = clf.cpu().eval()
    # 2 samples: a size-1 example would let torch.export specialise the batch dimension to 1.
    example = example_input(meta, batch=2)
    try:
        program = torch.onnx.export(
            clf,
            (example,),
            None,
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    except Exception as err:  # the exporter raises many types for unsupported operators
        first = (str(err).splitlines() or [""])[0][:300]
        raise ExportError(
            f"ONNX export of {meta.get('arch')!r} failed ({type(err).__name__}: {first}); "
            "try --format torchscript"
        ) from None
    program.model.metadata_props[META_KEY] = _json_meta(meta)
    with atomic_path(out) as tmp:
        program.save(str(tmp))
    return Path(out)


def export_torchscript(clf: nn.Module, meta: dict[str, Any], out: Path | str) -> Path:
    """Write a traced TorchScript module (metadata as an extra file) atomically."""
    clf = clf.cpu().eval()
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit is deprecated upstream, but TorchScript is still what C++ / mobile load.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(clf, example_input(meta, batch=2), check_trace=False)
        with atomic_path(out) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={META_FILE: _json_meta(meta)})
    return Path(out)


def export_model(clf: nn.Module, meta: dict[str, Any], fmt: str, out: Path | str) -> Path:
    """Export to `fmt` ("onnx" or "torchscript")."""
    if fmt == "onnx":
        return export_onnx(clf, meta, out)
    if fmt == "torchscript":
        return export_torchscript(clf, meta, out)
    raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def load_exported(path: Path | str, fmt: str) -> tuple[Runner, dict[str, Any]]:
    """An exported file -> (uint8 images -> probabilities function, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: exported model not found")
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(
                "running ONNX models needs onnxruntime: pip install onnxruntime"
            ) from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = json.loads(session.get_modelmeta().custom_metadata_map[META_KEY])

        def run_onnx(images: np.ndarray) -> np.ndarray:
            return session.run(None, {"images": np.ascontiguousarray(images, np.uint8)})[0]

        return run_onnx, meta
    if fmt == "torchscript":
        files = {META_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation, as in export
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        meta = json.loads(files[META_FILE])

        @torch.no_grad()
        def run_ts(images: np.ndarray) -> np.ndarray:
            return module(torch.from_numpy(np.ascontiguousarray(images, np.uint8))).numpy()

        return run_ts, meta
    raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


@torch.no_grad()
def compare(clf: nn.Module, run: Runner, images: np.ndarray) -> tuple[float, float]:
    """(largest |probability difference|, top-1 agreement) of an export against PyTorch."""
    ref = clf.cpu().eval()(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    got = run(images)
    return float(np.abs(ref - got).max()), float((ref.argmax(1) == got.argmax(1)).mean())


def verify_export(
    clf: nn.Module, path: Path | str, fmt: str, images: np.ndarray | None = None
) -> float:
    """Check an export against PyTorch on `images` (default: 5 random images); returns max diff.

    5 images, not the 2 of the export example: this also proves the batch size is dynamic.
    """
    run, meta = load_exported(path, fmt)
    images = example_input(meta, batch=5, seed=1).numpy() if images is None else images
    diff, _ = compare(clf, run, images)
    if not diff <= ATOL:
        raise ExportError(
            f"{path}: the {fmt} export differs from PyTorch by {diff:.2e} (> {ATOL:g}) in a "
            "probability; this architecture does not export faithfully, try the other format"
        )
    return diff
