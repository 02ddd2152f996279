"""Registration of test files into CI suites.

A file under test/registered/ declares where it runs with top-level calls such as

    register_cpu_ci(est_time=30, suite="base-a-test-cpu")
    register_cuda_ci(est_time=300, suite="base-b-test-1-gpu", disabled="flaky on H100, see #12")

The calls do nothing when the file runs. `slime.testing.registry` reads them with `ast`, without
importing the file, so collection is fast and cannot fail on a missing GPU stack.
"""

from __future__ import annotations

# function name -> hardware it registers for; the registry parser imports this table.
REGISTER_FUNCTIONS: dict[str, str] = {
    "register_cpu_ci": "cpu",
    "register_cuda_ci": "cuda",
    "register_rocm_ci": "rocm",
    "register_tpu_ci": "tpu",
}
ALLOWED_KEYWORDS = ("est_time", "suite", "nightly", "disabled")


def register_cpu_ci(*, est_time: float, suite: str, nightly: bool = False, disabled: str | None = None) -> None:
    """Run this file in a CPU suite. No-op at run time."""


def register_cuda_ci(*, est_time: float, suite: str, nightly: bool = False, disabled: str | None = None) -> None:
    """Run this file in an NVIDIA GPU suite. No-op at run time."""


def register_rocm_ci(*, est_time: float, suite: str, nightly: bool = False, disabled: str | None = None) -> None:
    """Run this file in an AMD GPU suite. No-op at run time."""


def register_tpu_ci(*, est_time: float, suite: str, nightly: bool = False, disabled: str | None = None) -> None:
    """Run this file in a TPU suite. No-op at run time."""
