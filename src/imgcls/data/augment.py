"""Augmentations are data: `augment.train` / `augment.eval` lists become albumentations Compose."""

from __future__ import annotations

import inspect
from typing import Any

import albumentations as A

from imgcls.config import TransformSpec
from imgcls.errors import ImgclsError

# Normalisation and tensor conversion are done by the training loop from the model's own
# metadata (so predict and serving match training exactly); a second copy here would double them.
_MANAGED = {"Normalize": "normalisation", "ToTensorV2": "tensor conversion", "ToFloat": "scaling"}


class AugmentError(ImgclsError):
    """An `augment` entry that names no albumentations transform or has bad arguments."""


def _transform_class(name: str, where: str) -> type[A.BasicTransform]:
    """Look a transform class up by name in albumentations."""
    if name in _MANAGED:
        raise AugmentError(
            f"{where}: {name} is not needed: imgcls applies {_MANAGED[name]} itself, "
            "after augmentation; remove this entry"
        )
    cls = getattr(A, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        close = [n for n in dir(A) if n.lower().startswith(name.lower()[:4])][:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise AugmentError(f"{where}: unknown albumentations transform {name!r}{hint}")
    return cls


def _check_arguments(cls: type, args: dict[str, Any], where: str) -> None:
    """Reject keyword arguments the transform does not take (albumentations only warns)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(args) - set(params))
    if unknown:
        allowed = ", ".join(p for p in params if p != "self")
        raise AugmentError(f"{where}: {cls.__name__} has no argument {unknown} (takes: {allowed})")


def build_transform(specs: list[TransformSpec], section: str = "augment.train") -> A.Compose:
    """Turn a list of `{name, **args}` entries into an albumentations Compose."""
    transforms = []
    for i, spec in enumerate(specs):
        args = dict(spec.model_extra or {})
        where = f"{section}[{i}] ({spec.name})"
        cls = _transform_class(spec.name, where)
        _check_arguments(cls, args, where)
        try:
            transforms.append(cls(**args))
        except (ValueError, TypeError) as err:
            first = str(err).strip().splitlines()
            raise AugmentError(f"{where}: bad arguments {args}: {' '.join(first[:4])}") from None
    return A.Compose(transforms)


def serialize(transform: A.Compose) -> dict[str, Any]:
    """The pipeline as albumentations' own JSON-able dict (logged with every run)."""
    return A.to_dict(transform)
