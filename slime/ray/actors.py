"""Everything a run starts on Ray, and its orderly teardown: the placement group, the policy trainer, the
critic (PPO), and the rollout manager with its engines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slime.backends import Backend
from slime.config import Config
from slime.ray import cluster
from slime.ray.engine_worker import EngineSpec
from slime.ray.trainer_group import TrainerGroup
from slime.rollout.engines.selection import rollout_engine
from slime.training.config import TrainerConfig
from slime.training.family import trainer_family

# Reading the model's context length needs only its config.json.
DEFAULT_MAX_CONTEXT = 4096


def trainer_config(config: Config, role: str) -> TrainerConfig:
    """The trainer's view of the run config (one place maps flags to the trainer's fields)."""
    a, t = config.algorithm, config.train
    estimator = a.advantage_estimator
    if estimator == "grpo" and a.disable_grpo_std_normalization:
        estimator = "dr_grpo"
    steps = config.train.num_rollout * config.train_steps_per_rollout
    return TrainerConfig(
        hf_checkpoint=config.checkpoint.hf_checkpoint,
        tensor_parallel_size=t.tensor_model_parallel_size,
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
        max_tokens_per_micro_batch=t.max_tokens_per_gpu if t.use_dynamic_batch_size else 1 << 30,
        micro_batch_size=None if t.use_dynamic_batch_size else t.micro_batch_size,
        advantage_estimator=estimator,
        eps_clip=a.eps_clip,
        eps_clip_high=a.eps_clip_high,
        eps_clip_c=a.eps_clip_c,
        use_kl_loss=a.use_kl_loss,
        kl_loss_coef=a.kl_loss_coef,
        kl_loss_type=a.kl_loss_type,
        entropy_coef=a.entropy_coef,
        use_tis=a.use_tis,
        tis_clip=a.tis_clip,
        loss_reduction="token" if a.calculate_per_token_loss else "sample",
        rollout_temperature=config.rollout.rollout_temperature,
        value_clip=a.value_clip,
        keep_last_n=config.checkpoint.keep_last_n,
        megatron_overrides=tuple(sorted(config.megatron.items())),
    )


def engine_spec(config: Config, backend: Backend) -> EngineSpec:
    import json

    r = config.rollout
    kind = rollout_engine(config, backend)
    family = trainer_family(config, backend.name, backend.capabilities.trainer_families)
    engines = config.cluster.rollout_num_gpus // config.cluster.rollout_num_gpus_per_engine
    context = r.rollout_max_context_len
    if context is None:
        hf = json.loads((Path(config.checkpoint.hf_checkpoint) / "config.json").read_text())
        context = min(int(hf.get("max_position_embeddings", DEFAULT_MAX_CONTEXT)), DEFAULT_MAX_CONTEXT)
    return EngineSpec(
        kind=kind,
        hf_checkpoint=config.checkpoint.hf_checkpoint,
        max_batch_size=r.rollout_engine_batch_size,
        max_seq_len=context,
        dtype=r.rollout_dtype,
        seed=config.data.rollout_seed,
        server_options=dict(config.sglang),
        log_dir=str(Path(config.logging.output_dir) / "engines"),
        hosted_by_trainer=config.cluster.colocate and family == "jax" and kind == "jax" and engines == 1,
    )


def needs_critic(config: Config) -> bool:
    return config.algorithm.advantage_estimator == "ppo"


@dataclass
class RunActors:
    actor: TrainerGroup
    critic: TrainerGroup | None
    rollout: Any  # the RolloutManager actor handle
    placement_group: Any
    started_ray: bool
    engine_in_trainer: bool = False  # EngineSpec.hosted_by_trainer: weights go over in process, not as buckets

    def shutdown(self) -> None:
        """Stop whatever was started (also after a failed start), then Ray itself if this run started it."""
        import ray

        if self.rollout is not None:
            try:
                ray.get(self.rollout.shutdown.remote(), timeout=120)
            except Exception:  # already gone: kill below
                pass
            ray.kill(self.rollout, no_restart=True)
        for group in (self.actor, self.critic):
            if group is not None:
                group.shutdown()
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
        if self.started_ray:
            ray.shutdown()


def start_actors(config: Config, backend: Backend) -> RunActors:
    import ray

    from slime.ray.rollout_manager import RolloutManager

    family = trainer_family(config, backend.name, backend.capabilities.trainer_families)  # before Ray starts
    spec = engine_spec(config, backend)  # refuses an engine the backend does not offer, before Ray starts
    c = config.cluster
    actor_devices = c.actor_num_nodes * c.actor_num_gpus_per_node
    critic_devices = c.actor_num_nodes * c.critic_num_gpus_per_node if needs_critic(config) else 0
    rollout_devices = min(c.rollout_num_gpus, actor_devices) if c.colocate else c.rollout_num_gpus
    layout = cluster.plan_layout(
        actor_devices, critic_devices, rollout_devices, c.rollout_num_gpus_per_engine, c.colocate
    )
    started = cluster.connect(backend, layout.num_bundles, c.ray_address)
    run = RunActors(None, None, None, None, started, spec.hosted_by_trainer)
    try:
        run.placement_group = cluster.create_placement_group(backend, layout)
        run.rollout = (
            ray.remote(RolloutManager)
            .options(num_cpus=0, max_concurrency=64)
            .remote(config, backend.name, run.placement_group, layout.rollout, spec)
        )
        engines_ready = run.rollout.start.remote()  # engines load while the trainers build
        run.actor = TrainerGroup(
            "actor", trainer_config(config, "actor"), backend, run.placement_group, layout.actor, family
        )
        if critic_devices:
            run.critic = TrainerGroup(
                "critic", trainer_config(config, "critic"), backend, run.placement_group, layout.critic
            )
        ray.get(engines_ready)
        if spec.hosted_by_trainer:
            host = run.actor.workers[0]
            ray.get(host.host_engine.remote(spec))
            ray.get(run.rollout.adopt_engine.remote(host))
    except BaseException:
        run.shutdown()
        raise
    return run
