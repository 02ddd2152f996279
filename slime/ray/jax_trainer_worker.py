"""The JAX trainer as a Ray actor: the same methods as slime.ray.trainer_group.TrainerWorker (what both forward to
their trainer: slime.training.lifecycle), so TrainerGroup drives it unchanged. One such process per trainer node
holds every device Ray gave that node; with several nodes the processes join through jax.distributed and lay one
mesh over all their devices. Each reports itself as the only rank (data parallel size 1 from the group's view; the
mesh splits the batch)."""

from __future__ import annotations

import os

from slime.net import NODE, bind_worker_network, worker_addresses
from slime.ray.cluster import assigned_device_ids, device_report
from slime.training.batch import TrainBatch
from slime.training.config import TrainerConfig
from slime.training.lifecycle import TrainerLifecycle


class JaxTrainerWorker(TrainerLifecycle):
    def __init__(self, role: str, config: TrainerConfig, hardware: str, process: int = 0, processes: int = 1):
        from slime.backends import backend_for_worker

        if role != "actor":
            raise ValueError(f"the jax trainer family has no {role} trainer yet")
        self.config = config
        self.backend = backend_for_worker(hardware)  # selected (and probed) by the driver
        bind_worker_network(self.backend, config.bind_address)  # before the weight group forms
        self.process, self.processes = process, processes  # this node's process among the trainer's nodes
        self.mesh_devices: list | None = None  # set by start_jax
        self.trainer = None
        self._sender = None  # weight sync "broadcast": the group to the engines, kept between updates
        self.engine = None  # a hosted rollout engine (host_engine), when the run places it here

    def devices(self) -> dict:
        """What Ray gave this process (slime.ray.cluster.device_report) and how many devices that is."""
        given = self.backend.devices_given(assigned_device_ids(self.backend), dict(os.environ))
        return {**device_report(self.backend), "given": given}

    def master_address(self) -> tuple[str, int]:
        if self.processes == 1:
            return "127.0.0.1", 0  # one process: no process group to rendezvous
        from slime.net import free_port

        bind, address = worker_addresses(self.config.bind_address)
        return address, free_port(bind)  # the coordinator binds it itself (jax.distributed takes no socket)

    def start_jax(self, master_addr: str, master_port: int) -> dict:
        """Start JAX here (the nodes' processes join at the master address), check that it sees every device Ray
        gave this process, and return the (data, fsdp, tensor) mesh shape the trainer lays over all nodes."""
        import jax

        from slime.training.jax.sharding import make_mesh

        if self.processes > 1:
            jax.distributed.initialize(f"{master_addr}:{master_port}", self.processes, self.process)
        given, local = self.devices()["given"], jax.local_device_count()
        if given and local != given:
            variable = self.backend.visible_devices_env
            raise RuntimeError(
                f"Ray gave this trainer process {given} {self.backend.ray_device_resource} "
                f"({variable}={os.environ.get(variable or '')}) but JAX sees {local} devices"
            )
        self.mesh_devices = self.backend.jax_devices(every_process=self.processes > 1)
        mesh = make_mesh(self.mesh_devices, tensor=self.config.tensor_parallel_size)
        return {"local": local, "global": len(self.mesh_devices), "mesh": dict(mesh.shape)}

    def init(self, master_addr: str, master_port: int) -> dict[str, int]:
        from slime.training.jax.trainer import JaxPolicyTrainer

        if self.mesh_devices is None:
            self.start_jax(master_addr, master_port)
        self.trainer = JaxPolicyTrainer(self.config, self.mesh_devices)
        node = worker_addresses(NODE)[1]
        return {"rank": 0, "tp_rank": 0, "dp_rank": 0, "dp_size": 1, "pid": os.getpid(), "node": node}

    def snapshot(self, name: str) -> None:
        self.trainer.snapshot(name)

    def compute_log_probs(self, shard: TrainBatch, weights: str) -> tuple:
        return self.trainer.compute_log_probs(shard, weights)

    def train(self, shard: TrainBatch, keep_log_probs: bool = False) -> tuple[dict[str, float], tuple | None]:
        """(metrics, None): this family does not keep the step's log-probs (TrainerGroup.keeps_step_log_probs), so
        --ci-test's checks read a separate pass (slime.loop_steps.train_on_rollout)."""
        return self.trainer.train_step(shard), None

    def busy_report(self) -> dict[str, float]:
        return {}  # --profile: no per-call clocks on this family yet

    def sft(self, shard: TrainBatch, lr: float | None) -> dict[str, float]:
        return self.trainer.sft_step(shard, lr)

    def reset_optimizer(self) -> None:
        self.trainer.reset_optimizer()

    def publish_weights(self, bucket_bytes: int) -> list:
        import ray

        from slime.ray.weight_sync import PackedBucket

        return [ray.put(PackedBucket.of(bucket)) for bucket in self.trainer.hf_weight_buckets(bucket_bytes)]

    def broadcast_weights(self, urls: list[str], version: int, bucket_bytes: int, timeout_s: float) -> float:
        """Weight sync "broadcast" (slime.ray.weight_sync): the buckets go to the engines at `urls` through one
        host-side process group (the trainer's tensors are host copies already). Returns seconds."""
        from slime.ray.weight_sync import BroadcastSender

        if self._sender is None or self._sender.timeout_s != timeout_s:
            bind, address = worker_addresses(self.config.bind_address)
            self._sender = BroadcastSender(self.backend.dist_backend, address, timeout_s, bind=bind)
        return self._sender.send(urls, self.trainer.hf_weight_buckets(bucket_bytes), version)

    def ipc_weights(self, urls: list[str], version: int, bucket_bytes: int, timeout_s: float) -> float:
        raise NotImplementedError(
            'the jax trainer has no device-memory handles: use weight sync "broadcast" or "object_store"'
        )

    # ---- a rollout engine in this process (--colocate with the JAX pair) ------------------------------------
    # The rollout manager drives this actor as it drives an EngineWorker (info, health, update_weights, memory),
    # so the engine is reached over the same HTTP API; only the weight hand-off differs: the trainer's sharded
    # parameters go into the engine's device directly (JaxEngine.update_weights_in_place), no buckets.
    def host_engine(self, spec) -> dict:
        from slime.ray.engine_worker import start_engine

        self.engine, self.url, self._stop_server = start_engine(spec, self.backend)
        return self.info()

    def info(self) -> dict:
        return {"url": self.url, "pid": os.getpid(), "weight_version": self.engine.weight_version}

    def health(self) -> bool:
        return self.engine is not None and self.engine.health()

    def update_weights(self, bucket_refs: list, version: int) -> float:
        """The trainer's current parameters into the hosted engine (bucket_refs are unused: nothing is sent)."""
        import time

        start = time.perf_counter()
        self.engine.update_weights_in_place(self.trainer.model_params(), version)  # LoRA: merged
        return time.perf_counter() - start

    def release_memory(self, tags: list[str] | None = None) -> None:
        self.engine.release_memory(tags)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self.engine.resume_memory(tags)

    def stop_engine(self) -> None:
        if self.engine is not None:
            self._stop_server()
            self.engine.shutdown()
            self.engine = None

    def shutdown(self) -> None:
        self.stop_engine()
        self.trainer = None
        if self.processes > 1:
            import jax

            jax.distributed.shutdown()
