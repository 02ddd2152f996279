"""slime: RL post-training for LLMs across hardware."""

__version__ = "0.1.0"
