"""Everything a run starts on Ray, and its orderly teardown: the placement group, the policy trainer, the
critic (PPO), and the rollout manager with its engines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slime.backends import Backend
from slime.config import Config
from slime.ray import cluster
from slime.ray.trainer_group import TrainerGroup
from slime.settings import engine_spec, trainer_config
from slime.training.family import trainer_family


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


@dataclass
class RunActors:
    actor: TrainerGroup
    critic: TrainerGroup | None
    rollout: Any  # the RolloutManager actor handle
    placement_group: cluster.Placement | None
    started_ray: bool
    weight_sync: str = "object_store"  # the transport resolved before start (slime.ray.weight_sync)
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
            self.placement_group.remove()
        if self.started_ray:
            ray.shutdown()


def start_actors(config: Config, backend: Backend, data=None, weight_sync: str = "object_store") -> RunActors:
    """`data`: the prompt sets as the start-up check read them (slime.preflight.PreparedData), handed to the
    rollout manager so no file is read twice (None: it reads them itself). `weight_sync`: the transport
    (slime.ray.weight_sync.resolve_weight_sync)."""
    import ray

    from slime.ray.rollout_manager import RolloutManager

    family = trainer_family(config, backend.name, backend.capabilities.trainer_families)  # before Ray starts
    spec = engine_spec(config, backend)  # refuses an engine the backend does not offer, before Ray starts
    layout = run_layout(config, family)
    started = cluster.connect(backend, layout.num_devices, config.cluster.ray_address)
    run = RunActors(None, None, None, None, started, weight_sync, spec.hosted_by_trainer)
    try:
        run.placement_group = cluster.create_placement_group(backend, layout)
        run.rollout = (
            ray.remote(RolloutManager)
            .options(num_cpus=0, max_concurrency=64)
            .remote(config, backend.name, run.placement_group, layout.rollout, spec, data)
        )
        engines_ready = run.rollout.start.remote()  # engines load while the trainers build
        run.actor = TrainerGroup(
            "actor", trainer_config(config, "actor", spec.kind), backend, run.placement_group, layout.actor, family
        )
        if layout.critic:
            run.critic = TrainerGroup(
                "critic", trainer_config(config, "critic"), backend, run.placement_group, layout.critic
            )
        ray.get(engines_ready)
        if spec.hosted_by_trainer:
            host = run.actor.workers[0]
            ray.get(host.host_engine.remote(spec))
            ray.get(run.rollout.adopt_engine.remote(host))
        elif weight_sync != "object_store":  # the trainer sends to the engines itself; restarts fetch from it
            ray.get(run.rollout.set_weight_source.remote(run.actor.workers, config.train.weight_update_bucket_mb << 20))
    except BaseException:
        run.shutdown()
        raise
    return run
