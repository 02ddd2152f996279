"""Which bridge handles which HF config: an exact `model_type` table, never substring matching."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slime.errors import ModelError

if TYPE_CHECKING:
    from slime.models.gpt_bridge import GPTBridge

_BRIDGES: dict[str, type[GPTBridge]] = {}


class UnsupportedModel(ModelError):
    """One-line, user-facing: the model family (or a feature of it) slime cannot convert."""


def register_bridge(*model_types: str):
    """Class decorator: `@register_bridge("qwen3")` makes the class handle HF configs of that model_type."""

    def decorate(cls):
        for model_type in model_types:
            if model_type in _BRIDGES:
                raise ValueError(
                    f"model_type {model_type!r} registered twice ({_BRIDGES[model_type].__name__}, {cls.__name__})"
                )
            _BRIDGES[model_type] = cls
        return cls

    return decorate


def _load_builtin_bridges() -> None:
    from slime.models import dense, moe  # noqa: F401  (registers llama, qwen2, qwen3; qwen3_moe)


def supported_model_types() -> tuple[str, ...]:
    _load_builtin_bridges()
    return tuple(sorted(_BRIDGES))


def bridge_class_for(hf_config) -> type[GPTBridge]:
    _load_builtin_bridges()
    model_type = hf_config.model_type
    if model_type not in _BRIDGES:
        raise UnsupportedModel(
            f"model_type {model_type!r} ({type(hf_config).__name__}) is not supported; "
            f"supported families: {', '.join(supported_model_types())}"
        )
    return _BRIDGES[model_type]
