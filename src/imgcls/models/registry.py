"""One model registry for our own architectures and every timm model.

Custom models register themselves with :func:`register_model`; :func:`create_model` looks a name
up there first and falls back to timm, so `model.name` in params.yaml can be either.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.errors import ImgclsError

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


class ModelError(ImgclsError):
    """Unknown model name, bad constructor arguments, or unusable pretrained weights."""


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register a factory `f(in_chans, num_classes, image_size, **kw) -> Module`."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_custom_models() -> list[str]:
    """Names of our own registered architectures."""
    _load_builtin()
    return sorted(_REGISTRY)


def is_custom(name: str) -> bool:
    """True if `name` is one of our own architectures (not timm)."""
    _load_builtin()
    return name in _REGISTRY


def create_model(
    name: str,
    *,
    in_chans: int,
    num_classes: int,
    image_size: int,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered custom model or a timm model by name."""
    _load_builtin()
    if name in _REGISTRY:
        if pretrained:
            raise ModelError(
                f"model.pretrained is true but {name!r} is an imgcls model with no published "
                "weights; set model.pretrained_path to a local checkpoint instead"
            )
        try:
            model = _REGISTRY[name](in_chans, num_classes, image_size, **kwargs)
        except TypeError as err:
            raise ModelError(f"model.kwargs do not fit {name!r}: {err}") from None
    else:
        model = _create_timm(name, in_chans, num_classes, pretrained, **kwargs)
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    return model


def _create_timm(
    name: str, in_chans: int, num_classes: int, pretrained: bool, **kwargs: Any
) -> nn.Module:
    """Build a timm model, turning timm's errors into messages that say what to do."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f" Similar timm names: {', '.join(close)}." if close else ""
        raise ModelError(
            f"unknown model.name {name!r}: not an imgcls model ({', '.join(list_custom_models())})"
            f" nor a timm model.{hint}"
        )
    try:
        return timm.create_model(
            name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes, **kwargs
        )
    except TypeError as err:
        raise ModelError(f"model.kwargs do not fit timm model {name!r}: {err}") from None
    except Exception as err:  # hub download failures come in many exception types
        if not pretrained:
            raise
        raise ModelError(
            f"could not download pretrained weights for {name!r} ({type(err).__name__}: {err}). "
            "Offline? Download the weights elsewhere (.safetensors or .pth), copy them here and "
            "set model.pretrained: false and model.pretrained_path: path/to/weights.safetensors"
        ) from None


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load local weights, skipping a classifier head whose shape does not match."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.pretrained_path {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict of tensors")
    own = model.state_dict()
    # A new dataset has its own number of classes: keep the freshly initialised head then.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ModelError(f"{path}: no tensor matches the model's parameters (wrong architecture?)")
    model.load_state_dict(usable, strict=False)


def _load_builtin() -> None:
    """Import the modules whose decorators fill the registry."""
    from imgcls.models import custom  # noqa: F401
