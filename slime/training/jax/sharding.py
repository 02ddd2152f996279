"""One device mesh with data / fsdp / tensor axes, and where every parameter and batch array lives on it.

Parameters (and so the optimizer moments, which jit lays out like them) are split Megatron-style over `tensor`
(column-parallel q/k/v, gate/up and the vocabulary rows of the embedding and LM head; row-parallel o_proj and
down_proj) and FSDP-style over `fsdp` along their other dimension. Batch rows are split over data x fsdp.
The compiler's partitioner inserts the collectives; a dimension an axis does not divide is left whole on that axis
(e.g. one KV head under tensor parallelism), except the vocabulary, which is padded to a multiple of `tensor`.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slime.models.jax_dense import EMBED, LM_HEAD

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# name suffix -> partition of an HF [out, in] weight (or [out] bias)
_RULES: tuple[tuple[str, tuple], ...] = (
    ("self_attn.q_proj.weight", ("tensor", "fsdp")),
    ("self_attn.k_proj.weight", ("tensor", "fsdp")),
    ("self_attn.v_proj.weight", ("tensor", "fsdp")),
    ("self_attn.q_proj.bias", ("tensor",)),
    ("self_attn.k_proj.bias", ("tensor",)),
    ("self_attn.v_proj.bias", ("tensor",)),
    ("self_attn.o_proj.weight", ("fsdp", "tensor")),
    ("mlp.gate_proj.weight", ("tensor", "fsdp")),
    ("mlp.up_proj.weight", ("tensor", "fsdp")),
    ("mlp.down_proj.weight", ("fsdp", "tensor")),
    (EMBED, ("tensor", "fsdp")),
    (LM_HEAD, ("tensor", "fsdp")),
)


def make_mesh(devices: list, tensor: int = 1, fsdp: int | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices`; by default every non-tensor device shards parameters (fsdp)."""
    count = len(devices)
    if tensor < 1 or count % tensor:
        raise ValueError(f"tensor parallel size {tensor} must divide the {count} devices of the mesh")
    fsdp = count // tensor if fsdp is None else fsdp
    if (count // tensor) % fsdp:
        raise ValueError(f"fsdp size {fsdp} must divide the {count // tensor} data-parallel devices")
    grid = np.asarray(devices, dtype=object).reshape(count // (tensor * fsdp), fsdp, tensor)
    return Mesh(grid, AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def param_partition(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The rule for `name`, with each axis dropped where it does not divide that dimension."""
    axes: tuple = ()
    for suffix, rule in _RULES:
        if name.endswith(suffix):
            axes = rule
            break
    fitted = [axis if shape[dim] % mesh.shape[axis] == 0 else None for dim, axis in enumerate(axes)]
    return PartitionSpec(*fitted)


def param_shardings(params: dict, mesh: Mesh) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, param_partition(name, tuple(p.shape), mesh)) for name, p in params.items()}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over data x fsdp, everything else whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
