"""Plugins are plain functions named by dotted path (`package.module.function`)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from slime.errors import FlagError


class PluginError(FlagError):
    """A plugin path (a flag's value) that cannot be imported or called as its contract says."""


def load_function(path: str, flag: str, expected_params: int | None = None) -> Callable:
    """Import `module.attr`; errors name the flag and what is wrong (module missing, attr missing, signature)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise PluginError(f"{flag} {path!r}: expected a dotted path like my_pkg.rewards.score")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PluginError(f"{flag} {path!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise PluginError(f"{flag} {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PluginError(f"{flag} {path!r}: {attr!r} is not callable")
    if expected_params is not None:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) != expected_params:
            raise PluginError(f"{flag} {path!r}: takes {len(params)} required arguments, expected {expected_params}")
    return fn
