"""The JAX rollout engine (`--rollout-engine jax`): jitted prefill/decode over a static KV cache, bucketed shapes.

Runs wherever JAX runs (the TPU backend's built-in engine, and how the TPU loop runs end to end on CPU)."""
