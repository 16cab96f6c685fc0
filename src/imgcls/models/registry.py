"""One model registry for our own architectures and every timm model.

Custom models register themselves with :func:`register_model`; :func:`create_model` looks a name
up there first and falls back to timm, so `model.name` in params.yaml can be either.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
        if pretrained_path:
            load_pretrained(model, pretrained_path)
        return model
    return _create_timm(name, in_chans, num_classes, pretrained, pretrained_path, **kwargs)


def _create_timm(
    name: str,
    in_chans: int,
    num_classes: int,
    pretrained: bool,
    pretrained_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model, turning timm's errors into messages that say what to do.

    Weights come from `pretrained_path` if given, else from the hub cache if they are already
    there, else from the hub, but only after a quick check that it can be reached: offline,
    huggingface_hub would otherwise retry for most of a minute before failing.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f" Similar timm names: {', '.join(close)}." if close else ""
        raise ModelError(
            f"unknown model.name {name!r}: not an imgcls model ({', '.join(list_custom_models())})"
            f" nor a timm model.{hint}"
        )
    local: Path | None = Path(pretrained_path) if pretrained_path else None
    if local is not None and not local.is_file():
        raise ModelError(f"model.pretrained_path {str(local)!r} does not exist")
    if local is None and pretrained:
        local = _hub_weights_or_fail(name)
    extra: dict[str, Any] = {}
    state: dict[str, torch.Tensor] | None = None
    if local is not None:
        # timm's own loader adapts the first conv to `in_chans` and drops a head whose class
        # count differs; we read the file ourselves (weights_only) and hand timm the tensors.
        state = read_state_dict(local)
        overlay = {"state_dict": state, "source": "timm"}
        extra = {"pretrained": True, "pretrained_cfg_overlay": overlay}
    elif pretrained:
        extra = {"pretrained": True}
    try:
        model = timm.create_model(
            name, in_chans=in_chans, num_classes=num_classes, **{**kwargs, **extra}
        )
    except TypeError as err:
        raise ModelError(f"model.kwargs do not fit timm model {name!r}: {err}") from None
    except Exception as err:  # hub and checkpoint failures come in many exception types
        if local is not None:
            raise ModelError(
                f"{local}: cannot load it into timm model {name!r} "
                f"({type(err).__name__}: {str(err)[:300]}); is it {name!r}'s state dict?"
            ) from None
        if not pretrained:
            raise
        raise ModelError(
            f"could not download pretrained weights for {name!r} ({type(err).__name__}: {err}). "
            + OFFLINE_ADVICE
        ) from None
    if state is not None:
        # timm loads non-strictly once it drops the head, so a wrong file would pass silently.
        own = model.state_dict()
        matched = sum(1 for k in own if k in state)
        if matched < len(own) // 2:
            raise ModelError(
                f"{local}: cannot load it into timm model {name!r}: only {matched} of "
                f"{len(own)} tensors match by name; is it {name!r}'s state dict?"
            )
    return model


OFFLINE_ADVICE = (
    "Offline? Download the weights on a connected machine (.safetensors or .pth), copy them "
    "here and set model.pretrained: false and model.pretrained_path: path/to/weights.safetensors"
)
HUB_PROBE_TIMEOUT_S = 3.0


def _hub_weights_or_fail(name: str) -> Path | None:
    """A cached copy of `name`'s pretrained weights, or None if the hub is reachable.

    Raises :class:`ModelError` at once when the weights are neither cached nor reachable.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(
            f"model.pretrained is true but timm publishes no pretrained weights for {name!r}; "
            "set model.pretrained: false (or point model.pretrained_path at your own weights)"
        )
    if cfg.file:
        return Path(cfg.file)
    cached = _cached_weights(cfg.hf_hub_id, cfg.hf_hub_filename, cfg.url)
    if cached is not None:
        return cached
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ModelError(
                f"model.pretrained is true but HF_HUB_OFFLINE is set and the weights of {name!r} "
                f"({cfg.hf_hub_id}) are not in the local hub cache. " + OFFLINE_ADVICE
            )
        url = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    else:
        url = cfg.url
    problem = _unreachable(url, HUB_PROBE_TIMEOUT_S)
    if problem:
        raise ModelError(
            f"model.pretrained is true but the weights of {name!r} cannot be downloaded: {url} "
            f"is unreachable ({problem}). " + OFFLINE_ADVICE
        )
    return None


def _cached_weights(hf_hub_id: str | None, filename: str | None, url: str | None) -> Path | None:
    """Weights a previous download left in the Hugging Face or torch hub cache."""
    if hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, rev = hf_hub_id.partition("@")  # timm ids may pin a revision: repo@rev
        cache = os.environ.get("HF_HUB_CACHE") or None  # read at call time, not import time
        names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
        for fname in names:
            hit = try_to_load_from_cache(repo, fname, cache_dir=cache, revision=rev or None)
            if isinstance(hit, str):
                return Path(hit)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name
        if path.is_file():
            return path
    return None


def _unreachable(url: str, timeout: float) -> str | None:
    """Why a TCP connection to `url`'s host (or the HTTPS proxy) fails, or None if it works."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy if proxy and url.startswith("https") else url)
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a .pth / .pt state dict (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.pretrained_path {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many types for a bad file
        raise ModelError(
            f"{path}: not a readable .safetensors / .pth weights file ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]})"
        ) from None
    # Unwrap the usual containers: {"state_dict": ...} (imgcls model files too), {"model": ...}.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load local weights, skipping a classifier head whose shape does not match."""
    state = read_state_dict(path)
    own = model.state_dict()
    # A new dataset has its own number of classes: keep the freshly initialised head then.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ModelError(f"{path}: no tensor matches the model's parameters (wrong architecture?)")
    model.load_state_dict(usable, strict=False)


def _load_builtin() -> None:
    """Import the modules whose decorators fill the registry."""
    from imgcls.models import custom  # noqa: F401
