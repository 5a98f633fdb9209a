"""Reference generators written for ganslim.

Each architecture lives in its own small file and keeps the ``state_dict`` keys of the
official repository it mirrors, so the official checkpoints load with ``load_state_dict``.
Networks register themselves by name; ``create_model(name, **kwargs)`` builds one.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator: register a factory (function or class) under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered reference generator, e.g. ``create_model("resnet_9blocks", ngf=32)``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
    return factory(**kwargs)


# Import the architecture files so they register themselves.
from . import resnet  # noqa: E402,F401
from .resnet import ResnetBlock, ResnetGenerator  # noqa: E402,F401

for _optional in ("unet", "spade", "cartoongan", "mobile_resnet"):
    try:  # the other architecture files are added independently
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as _e:  # pragma: no cover - only while a file is absent
        if _e.name != f"{__name__}.{_optional}":
            raise
