"""Which trainer family a run uses: `--train-backend`, or the hardware backend's default (the first of its
`Capabilities.trainer_families`). Checked before Ray starts, failing in one line."""

from __future__ import annotations

import importlib.util

from slime.config import Config, ConfigError


def trainer_family(config: Config, backend_name: str, families: tuple[str, ...]) -> str:
    """--train-backend, or the backend's default family; a family the backend cannot run is refused here,
    before Ray starts."""
    family = config.train.train_backend or families[0]
    if family not in families:
        raise ConfigError(
            f"--train-backend {family}: the {backend_name} hardware backend runs {' or '.join(families)} trainers"
        )
    if family == "megatron" and importlib.util.find_spec("megatron") is None:
        raise ConfigError(
            "--train-backend megatron needs megatron-core: pip install 'slime-rl[cpu]' (or this hardware's extra)"
        )
    if family == "jax" and not all(importlib.util.find_spec(m) for m in ("jax", "optax")):
        raise ConfigError("--train-backend jax needs jax and optax: pip install jax optax")
    if family == "jax" and config.train.bf16:
        raise ConfigError("--bf16 is the megatron trainer's; the jax trainer computes in float32 (drop --bf16)")
    if family == "jax" and config.algorithm.advantage_estimator == "ppo":
        raise ConfigError(
            "--advantage-estimator ppo needs a critic, which the jax trainer does not have yet; "
            "use --train-backend megatron or another estimator"
        )
    if config.lora.enabled:
        _check_lora(config, family)
    return family


def _check_lora(config: Config, family: str) -> None:
    """LoRA against the model (a MoE's experts take no adapters) and the family."""
    import json
    from pathlib import Path

    from slime.models.lora import LoraSpec, check_targets

    hf_config = Path(config.checkpoint.hf_checkpoint or "") / "config.json"
    if hf_config.is_file():
        check_targets(LoraSpec.from_config(config.lora), json.loads(hf_config.read_text()))
    if family == "jax" and config.lora.lora_dropout:
        raise ConfigError("--lora-dropout: the jax trainer's adapters run without dropout (drop the flag)")
