"""Rollout engines behind one interface (base.RolloutEngine).

- embedded: in-process torch engine, the CPU default; also serves SGLang's HTTP API (embedded.server).
- sglang: client for SGLang's HTTP API plus a server/router launcher (the GPU backends' engine).
- sglang_jax: sglang-jax over HTTP, weight updates by reloading a written checkpoint folder.

The engines themselves load on first use: importing this package pulls in torch, not transformers or aiohttp.
"""

from slime.rollout.engines.base import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    RolloutEngine,
    SamplingParams,
    WeightUpdateError,
)

__all__ = [
    "EngineError",
    "GenerateRequest",
    "GenerateResult",
    "RolloutEngine",
    "SamplingParams",
    "WeightUpdateError",
    "EmbeddedEngine",
    "serve_http",
    "SGLangClient",
    "SGLangEngine",
    "SGLangServerConfig",
    "SGLangJaxEngine",
    "SGLangJaxServerConfig",
]

_LAZY = {
    "EmbeddedEngine": "slime.rollout.engines.embedded.engine",
    "serve_http": "slime.rollout.engines.embedded.server",
    "SGLangClient": "slime.rollout.engines.sglang.client",
    "SGLangEngine": "slime.rollout.engines.sglang.launcher",
    "SGLangServerConfig": "slime.rollout.engines.sglang.launcher",
    "SGLangJaxEngine": "slime.rollout.engines.sglang_jax.engine",
    "SGLangJaxServerConfig": "slime.rollout.engines.sglang_jax.engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slime.rollout.engines' has no attribute {name!r}")
