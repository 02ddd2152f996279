"""Atomic, keep-last-N trainer checkpoints.

Layout under a checkpoint root:
    step_00000004/            a complete checkpoint (only complete ones carry this name)
        model_tp0.pt ...      this TP rank's model shard + optimizer + scheduler (written by DP rank 0)
        rng_rank0.pt ...      every rank's RNG streams
        extra.json            the RL loop's state at this step (data position, weight version), if given
        meta.json             step, layout; written last
    .tmp_step_00000006/       a save in progress (or killed half-way): never loaded, removed by the next save
    latest                    text file with the newest step folder name, replaced atomically
All ranks write into the temp folder; after a barrier rank 0 renames it (atomic on one filesystem).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
# Files of the source model folder an HF export carries along (tokenizer, chat template, generation defaults).
HF_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def complete_steps(root: Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder, or the newest complete one under a root; a clear error when there is none."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    steps = complete_steps(path)
    if not steps:
        raise FileNotFoundError(f"{path}: no complete checkpoint (expected {STEP_PREFIX}NNNNNNNN/meta.json)")
    return steps[-1]


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "megatron": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron"])


EXTRA_FILE = "extra.json"


def write_extra(folder: Path, extra: dict) -> None:
    with open(folder / EXTRA_FILE, "w") as f:
        json.dump(extra, f, indent=1, sort_keys=True)


def read_extra(folder: Path) -> dict:
    """The loop state saved with a checkpoint folder ({} for checkpoints written without one)."""
    path = Path(folder) / EXTRA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def begin_save(root: Path, step: int, is_rank0: bool, barrier) -> Path:
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if is_rank0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    return tmp


def finish_save(root: Path, tmp: Path, step: int, meta: dict, keep_last_n: int | None, is_rank0: bool, barrier) -> Path:
    barrier()  # every rank's files are in tmp
    final = root / step_dir_name(step)
    if is_rank0:
        with open(tmp / "meta.json", "w") as f:
            json.dump({"step": step, **meta}, f, indent=1)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f"{TMP_PREFIX}latest"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        if keep_last_n is not None:
            for old in complete_steps(root)[:-keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def write_hf_folder(target: Path, tensors: dict, hf_checkpoint: str | os.PathLike, hf_config=None) -> Path:
    """A folder transformers loads: `hf_config` (default: the source folder's), `tensors` (HF name -> torch tensor,
    or numpy array, all of one kind) as model.safetensors, and the source folder's HF_SIDE_FILES. Written into a
    temp folder beside `target`, then renamed over it (atomic on one filesystem)."""
    source, target = Path(hf_checkpoint), Path(target)
    if hf_config is None:
        from slime.models import load_hf_config

        hf_config = load_hf_config(source)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config.save_pretrained(tmp)
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file

        tensors = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    else:
        from safetensors.torch import save_file
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for side in HF_SIDE_FILES:
        if (source / side).is_file():
            shutil.copy2(source / side, tmp / side)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
