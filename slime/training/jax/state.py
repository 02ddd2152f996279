"""The JAX trainer's checkpoint files inside one (atomically renamed) checkpoint folder.

Arrays go to .npz files gathered to the host: exact bytes, so a resumed run is bit-identical. The optimizer
state is stored as its flattened leaves in order; on load they are put back into the trainer's own freshly
built state tree (same optimizer, same parameter names), checked leaf by leaf for shape and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

PARAMS, OPTIMIZER, SNAPSHOTS, COUNTERS = "params.npz", "optimizer.npz", "snapshot_{}.npz", "trainer.json"


def save_state(folder: Path, trainer) -> None:
    np.savez(folder / PARAMS, **jax.device_get(trainer.params))
    leaves = jax.device_get(jax.tree.leaves(trainer.opt_state))
    np.savez(folder / OPTIMIZER, **{f"leaf{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    for name, params in trainer._snapshots.items():
        np.savez(folder / SNAPSHOTS.format(name), **params)
    counters = {
        "step": trainer.step,
        "schedule_step": trainer.schedule_step,
        "rng": np.asarray(trainer.rng).tolist(),
        "snapshots": sorted(trainer._snapshots),
    }
    (folder / COUNTERS).write_text(json.dumps(counters, indent=1))


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def load_state(folder: Path, trainer) -> None:
    params = _read(folder / PARAMS)
    if sorted(params) != sorted(trainer.param_shardings):
        raise ValueError(f"{folder}: saved parameters do not match this model ({len(params)} tensors)")
    for name, value in params.items():
        if value.shape != tuple(trainer.params[name].shape):
            raise ValueError(f"{folder}: tensor {name} has shape {value.shape}, model has {trainer.params[name].shape}")
    trainer.reset_optimizer()  # a state tree of the right structure, then its leaves replaced
    saved = _read(folder / OPTIMIZER)
    leaves, treedef = jax.tree.flatten(jax.device_get(trainer.opt_state))
    if len(saved) != len(leaves):
        raise ValueError(f"{folder}: optimizer state has {len(saved)} arrays, this optimizer {len(leaves)}")
    restored = []
    for i, leaf in enumerate(leaves):
        value = saved[f"leaf{i:05d}"]
        if value.shape != np.shape(leaf) or value.dtype != np.asarray(leaf).dtype:
            raise ValueError(f"{folder}: optimizer array {i} is {value.dtype}{value.shape}, expected {np.shape(leaf)}")
        restored.append(value)
    trainer.params = jax.device_put(params, trainer.param_shardings)
    trainer.opt_state = jax.device_put(jax.tree.unflatten(treedef, restored), trainer.opt_shardings)
    counters = json.loads((folder / COUNTERS).read_text())
    trainer._snapshots = {name: _read(folder / SNAPSHOTS.format(name)) for name in counters["snapshots"]}
    trainer.step, trainer.schedule_step = counters["step"], counters["schedule_step"]
    trainer.rng = np.asarray(counters["rng"], np.uint32)
