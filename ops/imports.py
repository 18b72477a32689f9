"""Plug-ins named in config as "module:function" (reward functions, safety classifiers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ops.errors import ConfigError


def import_callable(path: str, field: str) -> Callable:
    """The callable that path ("module:attribute") names, or a ConfigError naming the config field."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ConfigError(f"{field}: {path!r} is not 'module:function'")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot import {path!r} (expected 'module:function'): {exc}") from exc
    if not callable(found):
        raise ConfigError(f"{field}: {path!r} is a {type(found).__name__}, not a function")
    return found
