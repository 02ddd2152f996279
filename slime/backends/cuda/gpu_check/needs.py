"""What each section needs, and whether this machine has it, found without importing anything heavy (module specs,
distribution metadata, device nodes, file names in the wheels folder)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SGLANG_PIN = "0.5.10.post1"
# Stubbed when absent (the GPU image cannot hold them): SGLang's utils import them at module level, the
# serialiser and the tensor bucket never call them.
SGLANG_STUBBED = ("torchvision", "sgl_kernel", "flashinfer")
# Top-level modules that importing sglang.srt.utils.common, .patch_torch and weight_sync.tensor_bucket loads and
# cannot do without (measured by blocking each one in turn, sglang 0.5.10.post1, the three above stubbed).
SGLANG_IMPORT_MODULES = (
    "IPython", "PIL", "aiohttp", "anyio", "certifi", "idna", "multidict", "numpy", "orjson", "packaging",
    "psutil", "pybase64", "pydantic", "pydantic_core", "pygments", "requests", "starlette", "tqdm", "traitlets",
    "triton", "typing_extensions", "urllib3", "yarl",
)  # fmt: skip
_WHEEL_NAME = {"PIL": "pillow", "IPython": "ipython", "megatron.core": "megatron_core"}
RAY_NOT_CARRIED = "not carried: ray 2.60's cp312 wheel is 79 MB, over the 60 MiB a run may carry"


@dataclass(frozen=True)
class Need:
    label: str
    check: Callable[[Path | None], str | None]  # wheels folder (or None) -> None when met, else why not


def carried(module: str, wheels: Path | None) -> bool:
    """Whether the wheels folder holds the distribution that provides `module`."""
    if wheels is None or not wheels.is_dir():
        return False
    prefix = _WHEEL_NAME.get(module, module).lower().replace("-", "_") + "-"
    return any(p.name.lower().startswith(prefix) and p.name.endswith(".whl") for p in wheels.iterdir())


def _has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def modules_need(label: str, modules: tuple[str, ...], hint: str = "") -> Need:
    """Met when every module is importable here, or (for a dry run with --wheels) carried in the wheels folder."""

    def check(wheels: Path | None) -> str | None:
        missing = [m for m in modules if not _has_module(m) and not carried(m, wheels)]
        if not missing:
            return None
        return f"missing {', '.join(missing)}" + (f" ({hint})" if hint else "")

    return Need(label, check)


def gpu_need() -> Need:
    def check(_: Path | None) -> str | None:
        from slime.backends.cuda.gpu_check import no_gpu_reason

        return no_gpu_reason()

    return Need("an NVIDIA GPU and a CUDA build of torch", check)


def jax_cuda_plugin_major() -> int | None:
    """The CUDA major version of the installed JAX CUDA plugin (jax-cuda13-plugin -> 13), None without one."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("jax-cuda") and name.endswith("-plugin"):
            digits = name.removeprefix("jax-cuda").removesuffix("-plugin")
            if digits.isdigit():
                return int(digits)
    return None


def jax_gpu_need() -> Need:
    def check(_: Path | None) -> str | None:
        if not _has_module("jax"):
            return "jax is not installed"
        if jax_cuda_plugin_major() is None:
            return "jax has no CUDA plugin installed (jax-cudaNN-plugin): it would run on the CPU"
        return None

    return Need("JAX with a CUDA plugin (its GPU backend)", check)


def sglang_need() -> Need:
    def check(wheels: Path | None) -> str | None:
        problem = modules_need("", ("sglang", *SGLANG_IMPORT_MODULES), "carry: scripts/gpu_check.sh --prepare").check(
            wheels
        )
        if problem is None and _has_module("sglang") and not carried("sglang", wheels):
            version = importlib.metadata.version("sglang")
            if version != SGLANG_PIN:
                return f"sglang {version} is installed, the check reads {SGLANG_PIN}'s deserialiser"
        return problem

    return Need(f"sglang {SGLANG_PIN} (wheel, no deps) and the modules its serialiser's import loads", check)


GPU = gpu_need()
TRITON = modules_need("triton", ("triton",))
TRANSFORMERS = modules_need("transformers", ("transformers",))
MEGATRON = modules_need("megatron-core 0.16.1 (carried wheel)", ("megatron.core",), "scripts/gpu_check.sh --prepare")
SGLANG = sglang_need()
JAX_GPU = jax_gpu_need()
OPTAX = modules_need("optax", ("optax",))
RAY = modules_need("Ray", ("ray",), RAY_NOT_CARRIED)


def unmet(needs: tuple[Need, ...], wheels: Path | None = None) -> list[str]:
    """'label: why' for each need this machine does not meet."""
    return [f"{n.label}: {why}" for n in needs if (why := n.check(wheels)) is not None]
