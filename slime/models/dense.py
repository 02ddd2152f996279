"""The dense families: they differ only in qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

from __future__ import annotations

from slime.models.gpt_bridge import GPTBridge
from slime.models.registry import UnsupportedModel, register_bridge


@register_bridge("llama")
class LlamaBridge(GPTBridge):
    def _validate(self) -> None:
        cfg = self.hf_config
        if cfg.attention_bias or cfg.mlp_bias:
            raise UnsupportedModel(
                "llama config: attention_bias / mlp_bias are not supported (no Llama 3.x checkpoint uses them)"
            )
        super()._validate()


@register_bridge("qwen2")
class Qwen2Bridge(GPTBridge):
    qkv_bias = True

    def _validate(self) -> None:
        if self.hf_config.use_sliding_window:
            raise UnsupportedModel("qwen2 config: use_sliding_window=true is not supported")
        super()._validate()


@register_bridge("qwen3")
class Qwen3Bridge(GPTBridge):
    qk_norm = True

    def _validate(self) -> None:
        if self.hf_config.attention_bias:
            raise UnsupportedModel("qwen3 config: attention_bias=true is not supported")
        if self.hf_config.use_sliding_window:
            raise UnsupportedModel("qwen3 config: use_sliding_window=true is not supported")
        super()._validate()
