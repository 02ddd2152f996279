"""slime: RL post-training for LLMs across hardware."""

__version__ = "0.1.0"

# The name on the package index (`pip install slime-rl`); `slime` there is an unrelated project. The import
# package and the command stay `slime`.
DISTRIBUTION = "slime-rl"
