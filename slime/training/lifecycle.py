"""What both trainer families' workers share: the calls a worker forwards unchanged to its trainer.

The Megatron rank (slime.ray.trainer_group.TrainerWorker) and the JAX process (slime.ray.jax_trainer_worker) wrap
a trainer (`self.trainer`) in a Ray actor; checkpoints, exports and memory hand-offs need nothing from the actor
around it, so they are written once here.
"""

from __future__ import annotations

from typing import Any


class TrainerLifecycle:
    """Save, load, export and offload, forwarded to `self.trainer` (either family's trainer)."""

    trainer: Any

    def save(self, root: str, step: int, extra: dict | None) -> str:
        return str(self.trainer.save(root, step=step, extra=extra))

    def load(self, root: str) -> int:
        return self.trainer.load(root)

    def save_hf(self, folder: str) -> str:
        return str(self.trainer.save_hf(folder))

    def save_lora(self, folder: str) -> str:
        return str(self.trainer.save_lora(folder))

    def offload(self) -> None:
        self.trainer.offload()

    def onload(self) -> None:
        self.trainer.onload()
