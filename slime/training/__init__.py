"""Megatron-core training: the policy and critic trainers, log-probs, losses, advantages, checkpoints."""
