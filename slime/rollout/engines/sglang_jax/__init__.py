"""sglang-jax adapter: SGLang-style HTTP generation, weight updates by reloading from a written folder."""

from slime.rollout.engines.sglang_jax.engine import SGLangJaxEngine, SGLangJaxServerConfig, write_updated_checkpoint

__all__ = ["SGLangJaxEngine", "SGLangJaxServerConfig", "write_updated_checkpoint"]
