"""HF-named weights into the serving model: read a checkpoint folder, validate a set of tensors, copy in place.

Validation happens before any copy, so a rejected set never leaves a half-written model.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

import torch

from slime.rollout.engines.base import WeightUpdateError
from slime.rollout.engines.embedded.model import ServingModel

# HF checkpoints may carry buffers the serving model recomputes itself.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint folder (*.safetensors), on CPU."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise WeightUpdateError(
            f"{path}: no *.safetensors files (save the checkpoint with save_pretrained(safe_serialization=True))"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def validate_named_tensors(
    model: ServingModel, named: Iterable[tuple[str, torch.Tensor]]
) -> list[tuple[str, torch.Tensor]]:
    """Resolve names and check every shape; raise WeightUpdateError on the first bad tensor (nothing copied)."""
    checked: list[tuple[str, torch.Tensor]] = []
    for name, tensor in named:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        target_name = model.resolve_name(name)
        target = model.hf_views.get(target_name)
        if target is None:
            raise WeightUpdateError(
                f"weight update rejected: unknown tensor name {name!r} for this {model.spec.model_type} model"
            )
        if not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError(f"weight update rejected: {name!r} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightUpdateError(
                f"weight update rejected: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            )
        if not (tensor.is_floating_point()):
            raise WeightUpdateError(
                f"weight update rejected: {name!r} has dtype {tensor.dtype}, expected a floating-point tensor"
            )
        checked.append((target_name, tensor))
    return checked


def missing_names(model: ServingModel, names: Iterable[str]) -> list[str]:
    present = {model.resolve_name(n) for n in names}
    return sorted(n for n in model.hf_views if n not in present)


@torch.inference_mode()
def copy_into_model(model: ServingModel, checked: list[tuple[str, torch.Tensor]]) -> None:
    """In-place copies into the fused buffers (dtype and device conversion included)."""
    for name, tensor in checked:
        model.hf_views[name].copy_(tensor)
    model.weights_changed()


def load_checkpoint_into(model: ServingModel, path: str) -> None:
    """Load a full checkpoint: every model tensor must be present (a partial checkpoint is rejected)."""
    tensors = read_checkpoint_tensors(path)
    checked = validate_named_tensors(model, tensors.items())
    missing = missing_names(model, (n for n, _ in checked))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightUpdateError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}")
    copy_into_model(model, checked)
