"""The trainer's frozen configuration, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slime.errors import FlagError
from slime.models.lora import LoraSpec
from slime.training.losses import KL_KINDS, REDUCTIONS

if TYPE_CHECKING:
    from slime.cores import CoreBudget

ADVANTAGE_ESTIMATORS = ("grpo", "gspo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainerConfig:
    hf_checkpoint: str
    tensor_parallel_size: int = 1
    make_vocab_size_divisible_by: int = 1  # the trainer pads its vocabulary to a multiple of this * TP
    seed: int = 1234
    # optimizer and schedule
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 1_000_000
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    compute_dtype: str = "float32"  # "bfloat16": forward and backward under autocast (--bf16)
    # batching
    max_tokens_per_micro_batch: int = 8192
    micro_batch_size: int | None = None  # also cap the samples per micro-batch (None: the token budget alone)
    # loss
    advantage_estimator: str = "grpo"
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    eps_clip_c: float | None = None
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    use_tis: bool = False
    tis_clip: float = 2.0
    loss_reduction: str = "token"
    rollout_temperature: float = 1.0
    value_clip: float = 0.2  # critic
    use_rollout_routing_replay: bool = False  # MoE: routers reuse the engine's experts (slime.training.routing_replay)
    lora: LoraSpec | None = None  # --lora-rank > 0: adapters on a frozen base (slime.training.lora)
    # checkpoints
    keep_last_n: int | None = None
    # megatron-core TransformerConfig / OptimizerConfig fields passed through from the command line
    megatron_overrides: tuple[tuple[str, object], ...] = ()
    cores: CoreBudget | None = None  # threads per phase (slime.cores); None: the process's default
    # --bind-address as the driver resolved it (node, 0.0.0.0 or an IP): the rendezvous and weight-group stores
    bind_address: str = "127.0.0.1"
    profile_steps: int = 0  # --profile: trace the first N train steps with the torch profiler (rank 0)
    profile_dir: str | None = None

    def __post_init__(self) -> None:
        """Each field is fed by a `slime train` flag; messages name that flag (the CLI checks them first)."""

        def one_of(flag: str, value, allowed) -> None:
            if value not in allowed:
                raise FlagError(f"{flag} {value!r} is not one of: {', '.join(allowed)}")

        one_of("--advantage-estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        one_of("--kl-loss-type", self.kl_loss_type, KL_KINDS)
        one_of("loss reduction (--calculate-per-token-loss)", self.loss_reduction, REDUCTIONS)
        one_of("--lr-decay-style", self.lr_decay_style, LR_DECAY_STYLES)
        one_of("compute dtype (--bf16)", self.compute_dtype, COMPUTE_DTYPES)
        if self.tensor_parallel_size < 1:
            raise FlagError(f"--tensor-model-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.lr_decay_steps <= self.lr_warmup_steps and self.lr_decay_style != "constant":
            raise FlagError(
                f"--lr-warmup-iters {self.lr_warmup_steps} must be below the optimizer steps of the run "
                f"({self.lr_decay_steps}: --num-rollout times the steps per rollout)"
            )
        if self.eps_clip_c is not None and self.eps_clip_c <= 1.0:
            raise FlagError(f"--eps-clip-c {self.eps_clip_c} must be > 1")
        if self.keep_last_n is not None and self.keep_last_n < 1:
            raise FlagError(f"--keep-last-n must be >= 1, got {self.keep_last_n}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise FlagError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.max_tokens_per_micro_batch < 1:
            raise FlagError(f"--max-tokens-per-gpu must be >= 1, got {self.max_tokens_per_micro_batch}")

    @property
    def expert_parallel_size(self) -> int:
        """megatron's own --expert-model-parallel-size, passed through like every TransformerConfig field."""
        return int(dict(self.megatron_overrides).get("expert_model_parallel_size", 1))

    @property
    def ratio_type(self) -> str:
        return "sequence" if self.advantage_estimator == "gspo" else "token"
