"""LoRA in HF terms, shared by both trainer families, the engines and export.

An adapter sits on one HF linear module (`model.layers.3.self_attn.q_proj`) and holds A [rank, in] and
B [out, rank]; the module's weight becomes W + (alpha / rank) B A. Adapters travel under PEFT's tensor names
(`<module>.lora_A.weight`, `<module>.lora_B.weight`), so weight sync, `--save-lora` and PEFT read one naming.
PEFT's file adds the prefix `base_model.model.` (its wrapper's attribute path) and drops the adapter name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from slime.config_lora import ALL_LINEAR, LORA_TARGETS
from slime.errors import FlagError

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    """What every trainer, engine and exporter needs to know about the run's adapters (hashable: jit-static)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0  # A's initialisation (B starts at zero), independent of the parallel layout
    sync: str = "merged"  # what weight sync sends: "merged" weights or the "adapters" alone (resolve_sync)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @staticmethod
    def from_config(lora, seed: int = 0, engine_kind: str | None = None) -> LoraSpec | None:
        """The spec of a `slime.config_lora.LoraConfig`, or None when LoRA is off; `engine_kind` decides the sync
        mode (None: merged)."""
        if not lora.enabled:
            return None
        sync = resolve_sync(lora.lora_sync, engine_kind) if engine_kind else "merged"
        return LoraSpec(lora.lora_rank, lora.alpha, float(lora.lora_dropout or 0.0), lora.targets, seed, sync)

    def describe(self) -> str:
        return (
            f"LoRA rank {self.rank}, alpha {self.alpha:g} on {' '.join(self.targets)}, base frozen; weight sync "
            f"{'sends the adapters alone' if self.sync == 'adapters' else 'sends merged weights W + (alpha/r) B A'}"
        )


# Engines that take an adapter update (A, B and the scaling) and apply W0 + s B A themselves.
ENGINES_APPLYING_ADAPTERS = ("embedded",)
SCALING_NAME = "lora.scaling"  # a one-element tensor sent with every adapter update


def resolve_sync(requested: str, engine_kind: str) -> str:
    """--lora-sync against what the engine can do: auto = adapters where the engine applies them, else merged."""
    if requested == "adapters" and engine_kind not in ENGINES_APPLYING_ADAPTERS:
        raise FlagError(
            f"--lora-sync adapters: the {engine_kind} engine does not apply adapters here (those that do: "
            f"{', '.join(ENGINES_APPLYING_ADAPTERS)}); use --lora-sync merged"
        )
    if requested == "auto":
        return "adapters" if engine_kind in ENGINES_APPLYING_ADAPTERS else "merged"
    return requested


def module_name(layer: int, target: str) -> str:
    """The HF module an adapter sits on."""
    return f"model.layers.{layer}.{'self_attn' if target in ATTENTION_TARGETS else 'mlp'}.{target}"


def adapted_modules(spec: LoraSpec, num_layers: int) -> list[str]:
    return [module_name(i, t) for i in range(num_layers) for t in LORA_TARGETS if t in spec.targets]


def check_targets(spec: LoraSpec, hf_config: dict) -> None:
    """Refuse, in one line, targets a family does not have as plain linears (a MoE model's experts)."""
    moe = any(key in hf_config for key in ("num_experts", "num_local_experts", "n_routed_experts"))
    mlp = [t for t in spec.targets if t in MLP_TARGETS]
    if moe and mlp:
        raise FlagError(
            f"--lora-target-modules {ALL_LINEAR if spec.targets == LORA_TARGETS else mlp[0]}: the "
            f"{hf_config.get('model_type', 'MoE')} model's MLPs are experts, which take no adapters; "
            f"name attention modules ({' '.join(ATTENTION_TARGETS)})"
        )


def initial_a(module: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """PEFT's default A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); drawn on the full
    shape from a generator seeded by the module's name, so every trainer family and parallel layout starts from
    the same adapters."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, in the weight's dtype (computed in float32)."""
    return (weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype)


def merge_hf(weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scaling: float) -> dict:
    """HF-named weights with every adapter in `adapters` (PEFT names, prefix-free) merged into its module."""
    out = dict(weights)
    for name in adapters:
        if name.endswith(A_SUFFIX):
            module = name[: -len(A_SUFFIX)]
            w = module + ".weight"
            out[w] = merged_weight(weights[w], adapters[name], adapters[module + B_SUFFIX], scaling)
    return out


def peft_config(spec: LoraSpec, base_model: str | os.PathLike) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_peft(target: str | os.PathLike, spec: LoraSpec, adapters: dict[str, torch.Tensor], base_model) -> Path:
    """A folder `peft.PeftModel.from_pretrained(base, folder)` loads (written beside, then renamed in place)."""
    from safetensors.torch import save_file

    target = Path(target)
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config(spec, base_model), indent=2) + "\n")
    tensors = {PEFT_PREFIX + n: t.detach().float().contiguous().cpu() for n, t in adapters.items()}
    save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def read_peft(folder: str | os.PathLike, seed: int = 0) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """(spec, prefix-free PEFT-named adapters) of a PEFT LoRA folder (plain LoRA only: no rslora, no DoRA)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / PEFT_CONFIG).read_text())
    special = ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save")
    if (
        any(cfg.get(key) for key in special)
        or cfg.get("peft_type", "LORA") != "LORA"
        or cfg.get("bias", "none") != "none"
    ):
        raise FlagError(
            f"{folder / PEFT_CONFIG}: only plain LoRA adapters are read (one rank and alpha for every module, "
            "no bias, rslora, DoRA, per-layer selection or saved modules)"
        )
    targets = cfg["target_modules"]
    targets = LORA_TARGETS if targets == ALL_LINEAR else tuple(t for t in LORA_TARGETS if t in targets)
    spec = LoraSpec(int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)), targets, seed)
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    adapters = {n.removeprefix(PEFT_PREFIX).replace(".default.", "."): t for n, t in tensors.items()}
    return spec, adapters


def is_adapter_name(name: str) -> bool:
    return name.endswith((A_SUFFIX, B_SUFFIX)) or name == SCALING_NAME


def split_adapters(named: list[tuple[str, torch.Tensor]]) -> tuple[list, list]:
    """(plain weights, adapter tensors) of a weight update."""
    return [x for x in named if not is_adapter_name(x[0])], [x for x in named if is_adapter_name(x[0])]


class AdapterMerger:
    """An engine's side of an adapter-only update: it keeps the base weight of every module it has seen adapted
    (a copy taken before the first update) and turns (A, B, scaling) into W0 + scaling B A for that module."""

    def __init__(self):
        self.base: dict[str, torch.Tensor] = {}

    def check(self, adapters: list[tuple[str, torch.Tensor]], weights: dict[str, torch.Tensor]) -> list:
        """Shape-check adapter tensors against the served weights; raises ValueError naming the first bad one."""
        for name, tensor in adapters:
            if name == SCALING_NAME:
                continue
            module = name.removesuffix(A_SUFFIX).removesuffix(B_SUFFIX)
            weight = weights.get(module + ".weight")
            if weight is None:
                raise ValueError(f"adapter {name!r}: no weight {module}.weight in this model")
            dim = 1 if name.endswith(A_SUFFIX) else 0
            if tensor.dim() != 2 or tensor.shape[dim] != weight.shape[dim]:
                raise ValueError(f"adapter {name!r} has shape {tuple(tensor.shape)}, the weight {tuple(weight.shape)}")
        return adapters

    def merged(self, adapters: list[tuple[str, torch.Tensor]], weights: dict[str, torch.Tensor]) -> list:
        """[(weight name, W0 + s B A)] for every module with both factors in `adapters` (a complete update)."""
        named = dict(adapters)
        if not named:
            return []
        if SCALING_NAME not in named:
            raise ValueError(f"an adapter update without {SCALING_NAME}")
        scaling = float(named[SCALING_NAME].reshape(-1)[0])
        out = []
        for name, a in named.items():
            if name.endswith(A_SUFFIX):
                module = name.removesuffix(A_SUFFIX)
                w = module + ".weight"
                base = self.base.setdefault(w, weights[w].detach().clone())
                out.append(
                    (w, merged_weight(base, a.to(base.device), named[module + B_SUFFIX].to(base.device), scaling))
                )
        return out
