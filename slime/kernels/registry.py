"""The op registry: each op has a torch reference and, per kernel family, hardware implementations.

A backend names its kernel family (`Backend.kernel_impl`: "torch" | "triton" | "jax"). `get_op(name)` returns the
backend's implementation when the op has one and its package is importable, otherwise the torch reference;
`get_op(name, impl="triton")` forces one (tests, benchmarks) and fails with one line when it cannot.
Implementations are referenced as "module:function" and imported on first use, so listing the registry
(`slime env`) imports neither triton nor jax.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slime.backends import Backend

REFERENCE_IMPL = "torch"
# the package each kernel family needs at run time
IMPL_PACKAGES: dict[str, str] = {"torch": "torch", "triton": "triton", "jax": "jax"}


class OpSelectionError(LookupError):
    """An op or a forced implementation that cannot be used; one line naming the op and the choices."""


@dataclass(frozen=True)
class OpSpec:
    name: str
    summary: str
    impls: dict[str, str] = field(default_factory=dict)  # family -> "module:function"


_OPS: dict[str, OpSpec] = {}


def register_op(name: str, summary: str, **impls: str) -> OpSpec:
    if name in _OPS:
        raise ValueError(f"op {name!r} registered twice")
    if REFERENCE_IMPL not in impls:
        raise ValueError(f"op {name!r} needs a {REFERENCE_IMPL} reference implementation")
    unknown = set(impls) - set(IMPL_PACKAGES)
    if unknown:
        raise ValueError(f"op {name!r}: unknown implementation families {sorted(unknown)}")
    spec = OpSpec(name, summary, dict(impls))
    _OPS[name] = spec
    return spec


def op_names() -> tuple[str, ...]:
    return tuple(sorted(_OPS))


def op_spec(name: str) -> OpSpec:
    if name not in _OPS:
        raise OpSelectionError(f"unknown op {name!r}; registered ops: {', '.join(op_names())}")
    return _OPS[name]


def impl_importable(family: str) -> bool:
    return importlib.util.find_spec(IMPL_PACKAGES[family]) is not None


def resolve_impl(name: str, family: str) -> str:
    """The implementation `name` uses under a backend whose kernel family is `family`."""
    spec = op_spec(name)
    if family in spec.impls and impl_importable(family):
        return family
    return REFERENCE_IMPL


@cache
def _load(target: str) -> Callable:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


@cache
def _default_backend() -> Backend:
    from slime.backends import select_backend

    return select_backend("auto")


def get_op(name: str, impl: str | None = None, backend: Backend | None = None) -> Callable:
    """The callable for op `name`: forced by `impl`, else chosen by `backend` (default: auto-detected)."""
    spec = op_spec(name)
    if impl is None:
        impl = resolve_impl(name, (backend or _default_backend()).kernel_impl)
    elif impl not in spec.impls:
        raise OpSelectionError(
            f"op {name!r} has no {impl!r} implementation; choose one of: {', '.join(sorted(spec.impls))}"
        )
    elif not impl_importable(impl):
        raise OpSelectionError(
            f"op {name!r}: the {impl!r} implementation needs the {IMPL_PACKAGES[impl]!r} package: "
            f"pip install {IMPL_PACKAGES[impl]}"
        )
    return _load(spec.impls[impl])


def op_implementations(backend: Backend) -> dict[str, str]:
    """op name -> the implementation family it will run with on `backend` (printed by `slime env`)."""
    return {name: resolve_impl(name, backend.kernel_impl) for name in op_names()}
