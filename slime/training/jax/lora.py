"""LoRA on the JAX trainer: adapters over the HF-named pytree.

The trainer's `params` become the trainable part (the adapters, PEFT-named `<module>.lora_A.weight` [r, in] and
`<module>.lora_B.weight` [out, r]) and the base weights a frozen pytree beside them, so the optimizer, its state,
snapshots and checkpoints cover the adapters alone, and only adapter leaves are differentiated. Every program
sees the full parameters `full_params(trainable, frozen)`: the adapted weights as W + (alpha / r) B A, computed
inside the jitted function (the gradient flows through it to A and B).

Sharding follows the base weight's rule (slime.training.jax.sharding): A takes the rule's input-dimension axis
and B its output-dimension axis, so a column-parallel weight's B is split over `tensor` like its rows and a
row-parallel weight's A over `tensor` like its columns.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slime.models.lora import A_SUFFIX, B_SUFFIX, LoraSpec, adapted_modules, initial_a
from slime.training.jax import sharding


def initial_adapters(spec: LoraSpec, shapes: dict, num_layers: int) -> dict[str, np.ndarray]:
    """A as PEFT initialises it (the Megatron trainer's draw, by module name), B zero: the base model at first."""
    out = {}
    for module in adapted_modules(spec, num_layers):
        rows, cols = shapes[module + ".weight"]
        out[module + A_SUFFIX] = initial_a(module, (spec.rank, cols), spec.seed).numpy()
        out[module + B_SUFFIX] = np.zeros((rows, spec.rank), np.float32)
    return out


def adapter_shardings(adapters: dict, shapes: dict, mesh: Mesh) -> dict[str, NamedSharding]:
    out = {}
    for name in adapters:
        is_a = name.endswith(A_SUFFIX)
        module = name.removesuffix(A_SUFFIX if is_a else B_SUFFIX)
        rule = tuple(sharding.param_partition(module + ".weight", tuple(shapes[module + ".weight"]), mesh))
        out_axis, in_axis = (rule + (None, None))[:2]
        axes = (None, in_axis) if is_a else (out_axis, None)
        out[name] = NamedSharding(mesh, PartitionSpec(*axes))
    return out


def full_params(trainable: dict, frozen: dict, spec: LoraSpec | None) -> dict:
    """The model's parameters: `trainable` as they are without LoRA (`frozen` is empty), else the frozen base with
    every adapted weight replaced by W + s B A."""
    if spec is None:
        return trainable
    out = dict(frozen)
    for name, a in trainable.items():
        if name.endswith(A_SUFFIX):
            module = name.removesuffix(A_SUFFIX)
            b = trainable[module + B_SUFFIX]
            out[module + ".weight"] = frozen[module + ".weight"] + spec.scaling * jnp.matmul(b, a)
    return out


def with_frozen(fn, spec: LoraSpec | None):
    """fn(params, *args) as g(trainable, frozen, *args): differentiate g in its first argument for adapter grads."""

    def run(trainable, frozen, *args):
        return fn(full_params(trainable, frozen, spec), *args)

    return run
