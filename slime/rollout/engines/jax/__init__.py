"""The JAX rollout engine (`--rollout-engine jax`): jitted prefill/decode over a static KV cache, bucketed shapes.

Runs wherever JAX runs: the built-in engine of the JAX-first backends, and how their loop runs end to end on
the host."""
