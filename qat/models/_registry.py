"""Model registry: `@register_model` entrypoints, `create_model(name, ...)` and `list_models(pattern)`."""
import difflib
import fnmatch
import warnings
from typing import Callable

import timm

from qat.models.base import QatModel
from qat.models.timm_model import TimmModel

_entrypoints: dict[str, Callable[..., QatModel]] = {}


def register_model(fn: Callable[..., QatModel]) -> Callable[..., QatModel]:
    """Register `fn` under its `__name__`; `fn(num_classes=..., **kwargs)` must build the model."""
    if fn.__name__ in _entrypoints:
        warnings.warn(f"model {fn.__name__!r} registered twice; the later entrypoint wins", stacklevel=2)
    _entrypoints[fn.__name__] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by an fnmatch `pattern` ('vit_*')."""
    names = sorted(_entrypoints)
    return names if pattern is None else fnmatch.filter(names, pattern)


def create_model(name: str, num_classes: int = 10, pretrained: bool = False, **overrides) -> QatModel:
    """Build a registered model, or any timm model (wrapped by `TimmModel`), with `overrides` as kwargs.

    Args:
        name: a name from `list_models()` or any `timm.list_models()` name.
        num_classes: size of the classifier head.
        pretrained: load timm's pretrained weights (timm models only; qat models start from checkpoints).
        **overrides: model arguments that replace the entrypoint's defaults (e.g. `use_relu=True`).
    """
    if name in _entrypoints:
        if pretrained:
            raise ValueError(f"pretrained=True: qat model {name!r} has no downloadable weights; start from a "
                             "checkpoint instead (init_from / kd.teacher.checkpoint)")
        return _entrypoints[name](num_classes=num_classes, **overrides)
    if timm.is_model(name):
        return TimmModel(name, num_classes=num_classes, pretrained=pretrained, **overrides)
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown model name={name!r}.{hint} Valid qat models: {', '.join(list_models())}; "
                     "any timm model name (timm.list_models()) is also accepted.")
