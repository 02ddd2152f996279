"""The run config's one mapping onto the settings of each part it starts: the placement, the cores, the trainer
ranks and their family, the rollout engines, the advantage step, the hardware check, the run's log and profile.
A flag that changes how one of them behaves is read here and nowhere else; each part's settings type lives with
the part, and the parts never see the whole `Config`."""

from __future__ import annotations

import json
from pathlib import Path

from slime.backends import Backend
from slime.backends.capability_check import RunNeeds
from slime.config import Config
from slime.cores import CoreBudget
from slime.errors import FlagError
from slime.models.lora import LoraSpec
from slime.profiling import ProfileSettings
from slime.ray import cluster
from slime.ray.engine_worker import EngineSpec
from slime.ray.weight_sync import resolve_weight_sync
from slime.rollout.engines.selection import engine_in_trainer_process, rollout_engine, sglang_jax_mode
from slime.rollout.generate import routed_experts_wanted
from slime.run_log import LogSettings
from slime.training.config import TrainerConfig
from slime.training.experience import AdvantageSettings
from slime.training.family import FamilyRequest, trainer_family

# Reading the model's context length needs only its config.json.
DEFAULT_MAX_CONTEXT = 4096


def trainer_config(config: Config, role: str, engine_kind: str | None = None) -> TrainerConfig:
    """The trainer's view of the run config (`engine_kind`: the run's engine, which decides how LoRA syncs)."""
    a, t = config.algorithm, config.train
    steps = config.train.num_rollout * config.train_steps_per_rollout
    return TrainerConfig(
        hf_checkpoint=config.checkpoint.hf_checkpoint,
        tensor_parallel_size=t.tensor_model_parallel_size,
        make_vocab_size_divisible_by=t.make_vocab_size_divisible_by,
        use_rollout_routing_replay=t.use_rollout_routing_replay,
        lora=LoraSpec.from_config(config.lora, seed=t.seed, engine_kind=engine_kind),
        seed=t.seed + (1 if role == "critic" else 0),
        lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(steps, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        clip_grad=t.clip_grad,
        compute_dtype="bfloat16" if t.bf16 else "float32",
        max_tokens_per_micro_batch=t.max_tokens_per_gpu if t.use_dynamic_batch_size else 1 << 30,
        micro_batch_size=None if t.use_dynamic_batch_size else t.micro_batch_size,
        advantage_estimator=a.advantage_estimator,
        eps_clip=a.eps_clip,
        eps_clip_high=a.eps_clip_high,
        eps_clip_c=a.eps_clip_c,
        use_kl_loss=a.use_kl_loss,
        kl_loss_coef=a.kl_loss_coef,
        kl_loss_type=a.kl_loss_type,
        entropy_coef=a.entropy_coef,
        use_tis=a.use_tis or config.train.fully_async,  # --fully-async: tokens of older versions are reweighted
        tis_clip=a.tis_clip,
        loss_reduction="token" if a.calculate_per_token_loss else "sample",
        rollout_temperature=config.rollout.rollout_temperature,
        value_clip=a.value_clip,
        keep_last_n=config.checkpoint.keep_last_n,
        megatron_overrides=tuple(sorted(config.megatron.items())),
        cores=core_budget(config),
        profile_steps=config.logging.profile,
        profile_dir=str(Path(config.logging.output_dir) / "profile"),
    )


def core_budget(config: Config) -> CoreBudget:
    """Threads per worker per phase, from the run's placement (slime.cores)."""
    c, layout = config.cluster, run_layout(config)
    return CoreBudget(
        train_procs=c.actor_num_gpus_per_node + (c.critic_num_gpus_per_node if needs_critic(config) else 0),
        engine_procs=max(1, len(layout.rollout) * layout.devices_per_engine),
        overlapped=config.train.async_rollout or config.train.fully_async,  # generation runs beside training
        cores_per_node=c.cores_per_node,
        async_generation_cores=c.async_generation_cores,
    )


def needs_critic(config: Config) -> bool:
    return config.algorithm.advantage_estimator == "ppo"


def run_layout(config: Config, family: str = "megatron") -> cluster.Layout:
    """Which bundle each trainer rank, critic rank and engine of this run goes to; the JAX `family` is one process
    per trainer node holding all of that node's devices."""
    c = config.cluster
    actor_devices = c.actor_num_nodes * c.actor_num_gpus_per_node
    critic_devices = c.actor_num_nodes * c.critic_num_gpus_per_node if needs_critic(config) else 0
    rollout_devices = min(c.rollout_num_gpus, actor_devices) if c.colocate else c.rollout_num_gpus
    return cluster.plan_layout(
        actor_devices, critic_devices, rollout_devices, c.rollout_num_gpus_per_engine, c.colocate, c.actor_num_nodes,
        whole_node_trainer=family == "jax",
    )  # fmt: skip


def family_request(config: Config) -> FamilyRequest:
    """What the run asks of its trainer family (slime.training.family)."""
    return FamilyRequest(
        train_backend=config.train.train_backend,
        bf16=config.train.bf16,
        critic=needs_critic(config),
        lora=LoraSpec.from_config(config.lora),
        hf_checkpoint=config.checkpoint.hf_checkpoint,
    )


def chosen_trainer_family(config: Config, backend: Backend) -> str:
    """--train-backend or the backend's default family, refused in one line when the backend cannot run it."""
    return trainer_family(family_request(config), backend.name, backend.capabilities.trainer_families)


def chosen_rollout_engine(config: Config, backend: Backend) -> str:
    """--rollout-engine or the backend's default (slime.rollout.engines.selection), refused in one line when the
    backend does not offer it or its package is missing."""
    return rollout_engine(config.rollout.rollout_engine, backend)


def chosen_weight_sync(config: Config, backend: Backend) -> str:
    """The transport trainer -> engines (slime.ray.weight_sync), refused in one line when the backend lacks it."""
    return resolve_weight_sync(config.cluster.weight_sync, config.cluster.colocate, backend)


# How --sglang-enable-memory-saver says no.
FALSE_WORDS = ("false", "0", "no")


def run_needs(config: Config, backend: Backend) -> RunNeeds:
    """What the run asks of the hardware (slime.backends.capability_check); an engine the backend refuses fails
    here, in one line."""
    engine = chosen_rollout_engine(config, backend)
    try:
        in_trainer = engine_hosted_by_trainer(config, backend)
    except FlagError:  # a trainer family the backend refuses: its own check says so
        in_trainer = False
    return RunNeeds(
        rollout_engine=engine,
        colocate=config.cluster.colocate,
        engine_in_trainer=in_trainer,
        sglang_memory_saver=config.sglang.get("enable_memory_saver", "false").lower() not in FALSE_WORDS,
        moe_dispatcher=config.megatron.get("moe_token_dispatcher_type"),
    )


def log_settings(config: Config) -> LogSettings:
    """Where the run's metrics go (slime.run_log)."""
    lg = config.logging
    return LogSettings(
        output_dir=lg.output_dir,
        num_rollout=config.train.num_rollout,
        progress=lg.progress,
        use_tensorboard=lg.use_tensorboard,
        use_wandb=lg.use_wandb,
        wandb_project=lg.wandb_project,
        run_config=config.to_dict() if lg.use_wandb else {},
    )


def profile_settings(config: Config) -> ProfileSettings:
    """What --profile records and where (slime.profiling)."""
    return ProfileSettings(
        steps=config.logging.profile,
        folder=Path(config.logging.output_dir) / "profile",
        async_rollout=config.train.async_rollout or config.train.fully_async,
        cores=core_budget(config).describe(),
    )


def engine_hosted_by_trainer(config: Config, backend: Backend) -> bool:
    """Whether the run's engine will live in the trainer's actor (EngineSpec.hosted_by_trainer)."""
    kind = chosen_rollout_engine(config, backend)
    family = chosen_trainer_family(config, backend)
    engines = config.cluster.rollout_num_gpus // config.cluster.rollout_num_gpus_per_engine
    in_process = sglang_jax_mode()[0] if kind == "sglang_jax" else False
    return engine_in_trainer_process(config.cluster.colocate, family, kind, engines, in_process)


def engine_spec(config: Config, backend: Backend) -> EngineSpec:
    """What every rollout engine of the run is started with (the engine kind: slime.rollout.engines.selection)."""
    r = config.rollout
    kind = chosen_rollout_engine(config, backend)
    family = chosen_trainer_family(config, backend)
    engines = config.cluster.rollout_num_gpus // config.cluster.rollout_num_gpus_per_engine
    context = r.rollout_max_context_len
    if context is None:
        hf = json.loads((Path(config.checkpoint.hf_checkpoint) / "config.json").read_text())
        context = min(int(hf.get("max_position_embeddings", DEFAULT_MAX_CONTEXT)), DEFAULT_MAX_CONTEXT)
    in_process, restart_reason = sglang_jax_mode() if kind == "sglang_jax" else (False, "")
    if config.train.fully_async and restart_reason:
        raise FlagError(
            "--fully-async changes the weights under running requests, but this sglang-jax takes an update only by "
            f"restarting its server (which ends them): {restart_reason}"
        )
    LoraSpec.from_config(config.lora, engine_kind=kind)  # --lora-sync adapters with an engine that cannot: refused
    return EngineSpec(
        kind=kind,
        hf_checkpoint=config.checkpoint.hf_checkpoint,
        max_batch_size=r.rollout_engine_batch_size,
        max_seq_len=context,
        dtype=r.rollout_dtype,
        seed=config.data.rollout_seed,
        server_options={**backend.engine_server_defaults(kind), **dict(config.sglang)},
        return_routed_experts=routed_experts_wanted(config),
        log_dir=str(Path(config.logging.output_dir) / "engines"),
        hosted_by_trainer=engine_in_trainer_process(config.cluster.colocate, family, kind, engines, in_process),
        sglang_jax_in_process=in_process,
        restart_reason=restart_reason,
        cores=core_budget(config),
    )


def advantage_settings(config: Config) -> AdvantageSettings:
    """How the loop turns rewards into advantages (training/experience.py)."""
    a = config.algorithm
    return AdvantageSettings(
        estimator=a.advantage_estimator,
        normalize_std=not a.disable_grpo_std_normalization,
        gamma=a.gamma,
        lambd=a.lambd,
        kl_coef=a.kl_coef,
        kl_type="k1",
        normalize_advantages=a.normalize_advantages,
    )
