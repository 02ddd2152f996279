"""The rollout side of a run, in one async Ray actor: the prompt data, the engines, generation, rewards,
filters, evaluation, and engine fault tolerance.

Engines live in their own actors (EngineWorker) and are reached over SGLang's HTTP API for generation.
When a request finds its engine gone, `recover()` restarts every dead engine in its old placement slot,
loads the newest weights into it, and the failed requests are retried from where their sample stood: nothing
is lost, nothing counted twice. An engine whose host is gone (or whose replacement cannot start) is dropped and
the run goes on with the others, counted in `rollout/engines_lost`. The newest weights: with weight sync "object_store" the buckets of the last
update stay referenced here; with "broadcast" / "ipc" (sent by the trainer straight to the engines) the
trainer publishes them to the object store once more, for the restarted engine only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from slime.config import Config, eval_sets
from slime.ray.cluster import Slot, ray_env
from slime.ray.engine_worker import EngineSpec, place_engine_worker
from slime.types import Sample

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 30.0
# A replacement engine that has not started by then (its bundle's node gone and no room elsewhere) is given up.
RESTART_TIMEOUT_S = 120.0


@dataclass
class _Engine:
    actor: Any
    url: str
    pid: int
    hosted: bool = False  # lives in the trainer's process (EngineSpec.hosted_by_trainer): never killed from here
    node_id: str = ""  # the Ray node it runs on: when that node is gone, so is the engine's slot
    node: str = ""  # that node's address, for messages


class RolloutManager:
    """Wrapped by ray.remote(...) in the loop. All methods are coroutines on the actor's event loop."""

    def __init__(
        self, config: Config, hardware: str, placement_group, slots: tuple[Slot, ...], spec: EngineSpec, data=None
    ):
        self.config = config
        self.hardware = hardware
        self.placement_group = placement_group
        self.slots = slots
        self.spec = spec
        self.engines: list[_Engine] = []
        self.restarts = 0
        self.lost = 0  # engines given up (their host gone): the run goes on with the others
        self._weights: tuple[list, int] = ([], 0)  # last update's bucket refs and version, for restarted engines
        self._weight_source: tuple[list, int] | None = None  # (trainer workers, bucket bytes): transports without refs
        self._recover_lock = asyncio.Lock()
        self._data_before: dict[int, dict] = {}
        self._prepared = data  # slime.preflight.PreparedData: the data files as the start-up check read them
        self.stream = None  # --fully-async: the GroupStream once started

    async def start(self) -> list[dict]:
        """Load the prompt sets and plugins, start the engines. (Here, not in __init__, so that a bad dataset or
        plugin path reaches the driver as the original exception.)"""
        from transformers import AutoTokenizer

        from slime import plugins
        from slime.backends import backend_for_worker
        from slime.rollout.generate import RolloutContext, routed_experts_wanted

        config = self.config
        self.backend = backend_for_worker(self.hardware)  # selected (and probed) by the driver
        self.tokenizer = AutoTokenizer.from_pretrained(config.checkpoint.hf_checkpoint)
        prepared = self._prepared
        self.data = _load_prompts(
            config, config.data.prompt_data, config.rollout.n_samples_per_prompt, self.tokenizer,
            prepared=prepared.prompts if prepared else None,
        )  # fmt: skip
        self.eval_data = {
            name: _load_prompts(
                config,
                path,
                config.rollout.n_samples_per_eval_prompt,
                self.tokenizer,
                shuffle=False,
                prepared=prepared.evals[name] if prepared else None,
            )  # fmt: skip
            for name, path in eval_sets(config)
        }
        self._prepared = None  # the DataSources hold it now
        self.plugins = plugins.load_rollout_plugins(config)
        self.ctx = RolloutContext(config, self.tokenizer, [], return_routed_experts=routed_experts_wanted(config))
        if not self.spec.hosted_by_trainer:  # else the trainer's actor is adopted once it hosts the engine
            self.engines = list(await asyncio.gather(*(self._start_engine(slot) for slot in self.slots)))
        self.ctx.set_urls([e.url for e in self.engines])
        return self.engine_info()

    async def adopt_engine(self, actor) -> list[dict]:
        """Use the engine the trainer's actor hosts (after its host_engine) as this run's only engine."""
        info = await actor.info.remote()
        self.engines = [_Engine(actor, info["url"], info["pid"], True, info.get("node_id", ""), info.get("node", ""))]
        self.ctx.set_urls([e.url for e in self.engines])
        return self.engine_info()

    # ---- engines ------------------------------------------------------------------------------------
    async def _start_engine(self, slot: Slot) -> _Engine:
        env = None
        if self.spec.kind == "jax":  # set before jax is imported in the engine's process
            threads = self.spec.cores.threads("generate") if self.spec.cores is not None else None
            env = {**ray_env(self.backend), **self.backend.jax_process_env(1, threads)}
        actor = place_engine_worker(self.spec, self.backend, self.placement_group, slot, env)
        info = await actor.start.remote()
        return _Engine(actor, info["url"], info["pid"], node_id=info.get("node_id", ""), node=info.get("node", ""))

    def engine_info(self) -> list[dict]:
        return [{"url": e.url, "pid": e.pid, "node": e.node} for e in self.engines]

    async def _alive(self, engine: _Engine) -> bool:
        try:
            return bool(await asyncio.wait_for(engine.actor.health.remote(), HEALTH_TIMEOUT_S))
        except Exception:  # the actor died (RayActorError) or hangs: either way it is replaced
            return False

    async def recover(self) -> None:
        """Restart every engine that no longer answers, in its old slot; an engine whose host is gone is dropped
        and the run goes on with the others (its slot's devices went with the host). Concurrent callers share
        one recovery."""
        async with self._recover_lock:
            alive = await asyncio.gather(*(self._alive(e) for e in self.engines))
            kept: list[tuple[_Engine, Slot]] = []
            for engine, slot, ok in zip(self.engines, self.slots, alive):
                if ok:
                    kept.append((engine, slot))
                    continue
                if engine.hosted:
                    raise RuntimeError("the rollout engine in the trainer's process is gone (so is the trainer)")
                replacement = await self._replace(engine, slot, len(self.engines) - 1)
                if replacement is not None:
                    kept.append((replacement, slot))
            if not kept:
                raise EnginesLost(f"every rollout engine is gone ({len(self.engines)} lost with their hosts)")
            self.engines, self.slots = [e for e, _ in kept], tuple(s for _, s in kept)
            self.ctx.set_urls([e.url for e in self.engines])

    async def _replace(self, engine: _Engine, slot: Slot, others: int) -> _Engine | None:
        """A new engine in `slot` with the newest weights, or None when the engine's host is gone or no new one
        starts within RESTART_TIMEOUT_S (counted in `lost`)."""
        import ray

        await self._stop(engine, timeout_s=10)  # a hung worker may still own a server process
        failure = "its host is down"
        if not engine.node_id or _node_alive(engine.node_id):
            logger.warning("rollout engine at %s (pid %d) is gone; restarting it", engine.url, engine.pid)
            try:
                new = await asyncio.wait_for(self._start_engine(slot), RESTART_TIMEOUT_S)
            except (TimeoutError, ray.exceptions.RayError) as e:
                # Ray may declare the host dead only now (its health check): say so rather than the symptom
                alive = not engine.node_id or _node_alive(engine.node_id)
                failure = (
                    f"no replacement started ({type(e).__name__}, within {RESTART_TIMEOUT_S:.0f} s)"
                    if alive
                    else failure
                )
            else:
                refs, version = await self._newest_weights()
                if refs:
                    await new.actor.update_weights.remote(refs, version)
                self.restarts += 1
                return new
        logger.warning(
            "rollout engine at %s is lost: %s (host %s); going on with the other %d", engine.url, failure,
            engine.node or "?", others,
        )  # fmt: skip
        self.lost += 1
        return None

    async def _newest_weights(self) -> tuple[list, int]:
        refs, version = self._weights
        if refs or version == 0 or self._weight_source is None:
            return refs, version
        workers, bucket_bytes = self._weight_source  # every rank takes part in the tensor-parallel gathers
        published = await asyncio.gather(*(w.publish_weights.remote(bucket_bytes) for w in workers))
        return published[0], version

    def engine_urls(self) -> list[str]:
        return [e.url for e in self.engines]

    def set_weight_source(self, trainer_workers: list, bucket_bytes: int) -> None:
        """Transports that bypass this actor ("broadcast", "ipc"): where a restarted engine gets the weights."""
        self._weight_source = (list(trainer_workers), bucket_bytes)

    def weights_pushed(self, version: int) -> None:
        """The trainer sent `version` to every engine itself (no refs kept here)."""
        self._weights = ([], version)
        self._new_version(version)

    async def update_weights(self, bucket_refs: list, version: int) -> float:
        """Push weight buckets to every engine; returns the slowest engine's seconds."""
        self._weights = (list(bucket_refs), version)
        self._new_version(version)
        seconds = await asyncio.gather(*(e.actor.update_weights.remote(bucket_refs, version) for e in self.engines))
        return max(seconds)

    async def release_memory(self, tags: list[str] | None = None) -> None:
        await asyncio.gather(*(e.actor.release_memory.remote(tags) for e in self.engines))

    async def resume_memory(self, tags: list[str] | None = None) -> None:
        await asyncio.gather(*(e.actor.resume_memory.remote(tags) for e in self.engines))

    # ---- generation ---------------------------------------------------------------------------------
    async def generate(self, rollout_id: int) -> tuple[list[Sample], dict[str, float]]:
        import time

        from slime.plugin_failures import naming_rollout, plugin_call, plugin_name
        from slime.rollout.rollout import generate_rollout

        r = self.config.rollout
        restarts_before, lost_before, started = self.restarts, self.lost, time.perf_counter()
        reward = TimedReward(self.plugins.reward)
        # Where the data stood before this rollout: a checkpoint taken while it is in flight (--async) resumes
        # from here, so the in-flight prompts are generated again rather than skipped.
        self._data_before = {k: v for k, v in self._data_before.items() if k >= rollout_id - 1}
        self._data_before[rollout_id] = self.data.state_dict()
        with naming_rollout(f"rollout {rollout_id}"):  # a plugin's failure says which rollout it ended
            if self.plugins.rollout_fn is not None:
                with plugin_call(plugin_name("--rollout-function-path", self.plugins.rollout_fn)):
                    result = await self.plugins.rollout_fn(self.ctx, self.data, rollout_id)
            else:
                result = await generate_rollout(
                    self.ctx, self.data,
                    num_groups=r.rollout_batch_size, generate_fn=self.plugins.generate_fn, reward=reward,
                    filter_fn=self.plugins.filter_fn, over_sampling_groups=r.over_sampling_batch_size,
                    partial_rollout=r.partial_rollout, recover=self.recover,
                )  # fmt: skip
        result.metrics["rollout/engine_restarts"] = float(self.restarts - restarts_before)
        result.metrics["rollout/engines_lost"] = float(self.lost - lost_before)
        result.metrics["perf/rollout_time"] = time.perf_counter() - started
        result.metrics["perf/reward_time"] = reward.seconds
        return result.samples, result.metrics

    # ---- fully async (slime.rollout.stream) -----------------------------------------------------------
    def _new_version(self, version: int) -> None:
        self.ctx.weight_version = version  # what requests sent from now on start under
        if self.stream is not None:
            self.stream.weights_changed()

    def start_stream(self) -> None:
        """--fully-async: from now on the engines generate without pause."""
        from slime.rollout.generate import sampling_params_for
        from slime.rollout.rollout import generate_samples
        from slime.rollout.stream import GroupStream
        from slime.types import SampleStatus

        params, reward = sampling_params_for(self.config), TimedReward(self.plugins.reward)

        async def run_group(group):
            todo = [s for s in group if s.status is SampleStatus.PENDING]
            await generate_samples(self.ctx, self.plugins.generate_fn, todo, params, self.stream.stats, self.recover)
            await reward.score_group(self.ctx, group)
            return group

        t = self.config.train
        self.stream = GroupStream(
            self.ctx, self.data, run_group, self.config.rollout.rollout_batch_size, t.max_staleness,
            self.plugins.filter_fn,
        )  # fmt: skip
        self.stream_reward = reward
        self.stream.start()

    async def stream_idle(self) -> None:
        """Returns once the stream has nothing generating (ahead of the trainer by max_staleness versions)."""
        await self.stream.idle()

    async def take(self, rollout_id: int) -> tuple[list[Sample], dict[str, float]]:
        """--fully-async: the next batch of finished groups fresh enough for the weights now being trained."""
        restarts_before, lost_before = self.restarts, self.lost
        groups, metrics = await self.stream.take(self.ctx.weight_version)
        metrics["rollout/engine_restarts"] = float(self.restarts - restarts_before)
        metrics["rollout/engines_lost"] = float(self.lost - lost_before)
        metrics["perf/reward_time"], self.stream_reward.seconds = self.stream_reward.seconds, 0.0
        return [s for g in groups for s in g], metrics

    async def evaluate(self, names: list[str] | None = None) -> dict[str, float]:
        """Evaluate every eval set (or just `names`)."""
        from slime.rollout.rollout import evaluate

        metrics: dict[str, float] = {}
        for name, source in self.eval_data.items():
            if names is not None and name not in names:
                continue
            samples = [s for g in source.all_groups() for s in g]
            metrics.update(
                await evaluate(self.ctx, name, samples, self.plugins.generate_fn, self.plugins.reward, self.recover)
            )
        return metrics

    # ---- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self, next_rollout_id: int | None = None) -> dict:
        """The data position for a checkpoint whose next rollout is `next_rollout_id` (see generate)."""
        if self.stream is not None:  # every group drawn but not trained is generated again after a resume
            return {"data": self.stream.state_dict()}
        data = self._data_before.get(next_rollout_id) if next_rollout_id is not None else None
        return {"data": data if data is not None else self.data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state["data"])

    async def shutdown(self) -> None:
        if self.stream is not None:
            await self.stream.close()
        if self.engines:
            await self.ctx.close()
        for engine in self.engines:
            await self._stop(engine, timeout_s=30)

    @staticmethod
    async def _stop(engine: _Engine, timeout_s: float) -> None:
        """Ask the worker to stop its server, then kill the worker whether it answered or not."""
        import ray

        if engine.hosted:  # the trainer's actor: stop its engine, the trainer group shuts the actor down
            try:
                await asyncio.wait_for(engine.actor.stop_engine.remote(), timeout_s)
            except Exception:
                pass
            return
        try:
            await asyncio.wait_for(engine.actor.shutdown.remote(), timeout_s)
        except Exception:  # dead already, or hung
            pass
        ray.kill(engine.actor, no_restart=True)


def _load_prompts(config: Config, path: str, n: int, tokenizer, shuffle: bool | None = None, prepared=None):
    from slime.rollout.data import load_data_source

    d = config.data
    return load_data_source(
        path, tokenizer, input_key=d.input_key, label_key=d.label_key, metadata_key=d.metadata_key,
        apply_chat_template=d.apply_chat_template, max_prompt_len=d.rollout_max_prompt_len, n_samples_per_prompt=n,
        shuffle=d.rollout_shuffle if shuffle is None else shuffle, seed=d.rollout_seed, skip_bad_rows=d.skip_bad_rows,
        log=logger.warning, prepared=prepared,
    )  # fmt: skip


def _node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


class EnginesLost(RuntimeError):
    """No rollout engine is left to generate with."""


class TimedReward:
    """The rollout's reward with the seconds spent scoring counted (the per-phase profile's "reward")."""

    def __init__(self, reward):
        self.reward, self.seconds = reward, 0.0

    async def score_group(self, ctx, group) -> None:
        import time

        start = time.perf_counter()
        try:
            await self.reward.score_group(ctx, group)
        finally:
            self.seconds += time.perf_counter() - start
