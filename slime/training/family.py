"""Which trainer family a run uses: `--train-backend`, or the hardware backend's default (the first of its
`Capabilities.trainer_families`). Checked before Ray starts, failing in one line."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slime.errors import FlagError

if TYPE_CHECKING:
    from slime.models.lora import LoraSpec  # imports torch: only where LoRA is asked for


@dataclass(frozen=True)
class FamilyRequest:
    """What a run asks of its trainer family (built from the run config by slime.settings.family_request)."""

    train_backend: str | None = None  # --train-backend; None: the hardware backend's default
    bf16: bool = False  # --bf16
    critic: bool = False  # the advantage estimator needs a value model (PPO)
    lora: LoraSpec | None = None  # --lora-rank > 0: the adapters asked for
    hf_checkpoint: str | None = None  # the model folder, whose config.json says which modules exist


def trainer_family(request: FamilyRequest, backend_name: str, families: tuple[str, ...]) -> str:
    """--train-backend, or the backend's default family; a family the backend cannot run is refused here,
    before Ray starts."""
    family = request.train_backend or families[0]
    if family not in families:
        raise FlagError(
            f"--train-backend {family}: the {backend_name} hardware backend runs {' or '.join(families)} trainers"
        )
    if family == "megatron" and importlib.util.find_spec("megatron") is None:
        raise FlagError(
            "--train-backend megatron needs megatron-core: pip install 'slime-rl[cpu]' (or this hardware's extra)"
        )
    if family == "jax" and not all(importlib.util.find_spec(m) for m in ("jax", "optax")):
        raise FlagError("--train-backend jax needs jax and optax: pip install jax optax")
    if family == "jax" and request.bf16:
        raise FlagError("--bf16 is the megatron trainer's; the jax trainer computes in float32 (drop --bf16)")
    if family == "jax" and request.critic:
        raise FlagError(
            "--advantage-estimator ppo needs a critic, which the jax trainer does not have yet; "
            "use --train-backend megatron or another estimator"
        )
    if request.lora is not None:
        _check_lora(request, family)
    return family


def _check_lora(request: FamilyRequest, family: str) -> None:
    """LoRA against the model (a MoE's experts take no adapters) and the family."""
    import json
    from pathlib import Path

    from slime.models.lora import check_targets

    hf_config = Path(request.hf_checkpoint or "") / "config.json"
    if hf_config.is_file():
        check_targets(request.lora, json.loads(hf_config.read_text()))
    if family == "jax" and request.lora.dropout:
        raise FlagError("--lora-dropout: the jax trainer's adapters run without dropout (drop the flag)")
