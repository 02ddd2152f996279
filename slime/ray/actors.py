"""Everything a run starts on Ray, and its orderly teardown: the placement group, the policy trainer, the
critic (PPO), and the rollout manager with its engines."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from slime.backends import Backend
from slime.config import Config
from slime.ray import cluster
from slime.ray.trainer_group import TrainerGroup
from slime.settings import chosen_trainer_family, engine_spec, run_layout, trainer_config

# How long a trainer rank may take to answer "are you there" after a failed call before it counts as alive but busy.
LIVENESS_TIMEOUT_S = 60.0


@dataclass
class RunActors:
    actor: TrainerGroup
    critic: TrainerGroup | None
    rollout: Any  # the RolloutManager actor handle
    placement_group: cluster.Placement | None
    started_ray: bool
    weight_sync: str = "object_store"  # the transport resolved before start (slime.ray.weight_sync)
    engine_in_trainer: bool = False  # EngineSpec.hosted_by_trainer: weights go over in process, not as buckets
    engine_hosts: tuple[str, ...] = ()  # the address of each engine's node, at start
    bind_address: str = ""  # --bind-address as resolved for the run (cluster.run_bind_address)

    def describe_hosts(self) -> str | None:
        """Which host runs what, when the run spans hosts (None on one host)."""
        trainer = sorted({r.node for g in (self.actor, self.critic) if g is not None for r in g.ranks})
        if len(set(trainer) | set(self.engine_hosts)) < 2:
            return None
        return (
            f"hosts: trainer {', '.join(trainer)}; engines {', '.join(self.engine_hosts)}; "
            f"servers bind {self.bind_address} (--bind-address)"
        )

    def lost_trainer_ranks(self, timeout_s: float = LIVENESS_TIMEOUT_S) -> list[str]:
        """The trainer ranks whose process is gone, as "actor rank 1 on host 198.18.0.11" (a rank that is only busy
        is not lost). Asked after a trainer call failed: Ray declares a lost host's actors dead within its health
        check's bound, well inside `timeout_s`."""
        import ray

        ranks = [(g, w, i) for g in (self.actor, self.critic) if g is not None for w, i in zip(g.workers, g.ranks)]
        probes = {w.__ray_ready__.remote(): (g, i) for g, w, i in ranks}
        lost, deadline = [], time.monotonic() + timeout_s
        for probe, (group, info) in probes.items():
            try:
                ray.get(probe, timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                lost.append(f"{group.role} rank {info.rank} on host {info.node or '?'}")
            except ray.exceptions.GetTimeoutError:
                continue  # busy (or stuck in a collective with the lost rank): not itself gone
        return lost

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

    family = chosen_trainer_family(config, backend)  # before Ray starts
    spec = engine_spec(config, backend)  # refuses an engine the backend does not offer, before Ray starts
    layout = run_layout(config, family)
    started = cluster.connect(backend, layout.num_devices, config.cluster.ray_address)
    run = RunActors(None, None, None, None, started, weight_sync, spec.hosted_by_trainer)
    try:
        run.bind_address = bind = cluster.run_bind_address(config.cluster.bind_address)  # needs the cluster's hosts
        spec = replace(spec, bind_address=bind)
        run.placement_group = cluster.create_placement_group(backend, layout)
        run.rollout = (
            ray.remote(RolloutManager)
            .options(num_cpus=0, max_concurrency=64, **cluster.on_this_node())
            .remote(config, backend.name, run.placement_group, layout.rollout, spec, data)
        )
        engines_ready = run.rollout.start.remote()  # engines load while the trainers build
        actor_config = replace(trainer_config(config, "actor", spec.kind), bind_address=bind)
        run.actor = TrainerGroup("actor", actor_config, backend, run.placement_group, layout.actor, family)
        if layout.critic:
            critic_config = replace(trainer_config(config, "critic"), bind_address=bind)
            run.critic = TrainerGroup("critic", critic_config, backend, run.placement_group, layout.critic)
        engines = ray.get(engines_ready)
        if spec.hosted_by_trainer:
            host = run.actor.workers[0]
            ray.get(host.host_engine.remote(spec))
            engines = ray.get(run.rollout.adopt_engine.remote(host))
        elif weight_sync != "object_store":  # the trainer sends to the engines itself; restarts fetch from it
            ray.get(run.rollout.set_weight_source.remote(run.actor.workers, config.train.weight_update_bucket_mb << 20))
        run.engine_hosts = tuple(e["node"] for e in engines)
    except BaseException:
        run.shutdown()
        raise
    return run
