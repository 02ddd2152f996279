"""HuggingFace <-> Megatron-core model bridges, one per model family, registered by HF `model_type`."""

from slime.models.gpt_bridge import CheckpointMismatch, GPTBridge, load_hf_config
from slime.models.registry import UnsupportedModel, bridge_class_for, register_bridge, supported_model_types

__all__ = [
    "CheckpointMismatch",
    "GPTBridge",
    "UnsupportedModel",
    "bridge_class_for",
    "load_hf_config",
    "register_bridge",
    "supported_model_types",
]
