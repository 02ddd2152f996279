"""The LoRA section of the run config (`--lora-*`, `--save-lora`), one set of flags for every trainer family.

Each numeric field's valid range is declared beside it (`valid`, a slime.flag_ranges.Range that the start-up check
enforces and --help prints); the section is parsed like every other (slime.config.SECTIONS) and checked once at
the top with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slime.flag_ranges import Range, above, between

if TYPE_CHECKING:
    from slime.config import Config

# HF module names an adapter can sit on (PEFT's names); "all-linear" means all of them (never lm_head).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
LORA_SYNC_MODES = ("auto", "merged", "adapters")


def _flag(default, help: str, **meta):
    if isinstance(default, list):
        return field(default_factory=list, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class LoraConfig:
    lora_rank: int = _flag(
        0,
        "LoRA rank (0: off, every weight trains); > 0 freezes the base weights",
        valid=Range(1, special=((0, "off"),)),
    )
    lora_alpha: float | None = _flag(
        None, "LoRA alpha (default: the rank); the update is (alpha / rank) B A", valid=above(0)
    )
    lora_dropout: float | None = _flag(
        None, "dropout on each adapter's input (default 0)", valid=between(0, 1, high_open=True)
    )
    lora_target_modules: list[str] = _flag(
        [], "HF module names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or all-linear (default)"
    )
    lora_sync: str = _flag(
        "auto",
        "what weight sync sends: merged (W + (alpha/r) B A, any engine), adapters (A and B only, engines that apply "
        "them), auto (adapters where the engine can)",
        choices=LORA_SYNC_MODES,
    )
    save_lora: str | None = _flag(
        None, "at the end, write the adapter here in PEFT's format (adapter_model.safetensors)"
    )

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    @property
    def alpha(self) -> float:
        return float(self.lora_rank) if self.lora_alpha is None else float(self.lora_alpha)

    @property
    def targets(self) -> tuple[str, ...]:
        """The HF module names adapted, in LORA_TARGETS order."""
        asked = self.lora_target_modules
        if not asked or asked == [ALL_LINEAR]:
            return LORA_TARGETS
        return tuple(m for m in LORA_TARGETS if m in asked)


def check_lora(config: Config) -> list[str]:
    """One line per problem (ranges are checked before, slime.config.check_ranges): LoRA flags without a rank, unknown modules, a critic (it has no adapters)."""
    lora = config.lora
    given = [
        flag
        for flag, value in (
            ("--lora-alpha", lora.lora_alpha),
            ("--lora-dropout", lora.lora_dropout),
            ("--lora-target-modules", lora.lora_target_modules or None),
            ("--save-lora", lora.save_lora),
            ("--lora-sync", None if lora.lora_sync == "auto" else lora.lora_sync),
        )
        if value is not None
    ]
    if lora.lora_rank == 0:
        return [f"{given[0]} needs --lora-rank > 0"] if given else []
    problems = []
    asked = lora.lora_target_modules
    unknown = [m for m in asked if m not in LORA_TARGETS] if asked != [ALL_LINEAR] else []
    if unknown:
        problems.append(f"--lora-target-modules {unknown[0]!r} is not one of: {ALL_LINEAR}, {', '.join(LORA_TARGETS)}")
    if config.algorithm.advantage_estimator == "ppo":
        problems.append("--lora-rank with --advantage-estimator ppo: the critic has no adapters; use another estimator")
    return problems
