"""Hardware backends. Everything device-specific lives under this package."""

from slime.backends.base import (
    DETECTION_ORDER,
    Backend,
    BackendUnavailable,
    Capabilities,
    ProbeResult,
    SystemView,
    backend_for_worker,
    backend_names,
    get_backend_class,
    probe_all,
    select_backend,
)

__all__ = [
    "DETECTION_ORDER",
    "Backend",
    "BackendUnavailable",
    "Capabilities",
    "ProbeResult",
    "SystemView",
    "backend_for_worker",
    "backend_names",
    "get_backend_class",
    "probe_all",
    "select_backend",
]
