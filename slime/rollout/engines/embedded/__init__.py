"""The embedded rollout engine: a lean torch decoder with a static KV cache and continuous batching."""

from slime.rollout.engines.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedEngine"]
