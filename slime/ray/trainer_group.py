"""Trainer ranks as Ray actors, and the driver-side handle that drives them all in step.

Every trainer call is a collective over the ranks, so `TrainerGroup` always calls every rank and waits for
all of them. Batches travel through the object store already split: each data-parallel rank's share is
put once and handed to the tensor-parallel ranks of that share.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from slime.backends import Backend
from slime.net import bind_worker_network, worker_addresses
from slime.ray.cluster import (
    Slot,
    bind_worker_devices,
    device_report,
    get_all,
    ray_env,
    scheduling,
)
from slime.training.batch import TrainBatch
from slime.training.config import TrainerConfig
from slime.training.lifecycle import TrainerLifecycle


class TrainerWorker(TrainerLifecycle):
    """One trainer rank (wrapped by ray.remote in TrainerGroup): process group + policy or critic trainer."""

    def __init__(self, role: str, config: TrainerConfig, hardware: str, rank: int, world_size: int):
        import warnings

        from slime.backends import backend_for_worker

        # megatron-core announces each optional fused-kernel package it did not find, once per process
        warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (is|are) not installed")
        warnings.filterwarnings("ignore", message=r"full scope is deprecated")

        self.role, self.config, self.rank, self.world_size = role, config, rank, world_size
        self.backend = backend_for_worker(hardware)  # the driver selected it; a worker does not probe again
        bind_worker_devices(self.backend)  # before anything touches the device stack
        bind_worker_network(self.backend, config.bind_address)  # before any process group forms
        self.trainer: Any = None
        self._listener: Any = None  # rank 0: the bound socket of the job's rendezvous store (master_address)
        self._sender: Any = None  # weight sync "broadcast": the group to the engines, kept between updates
        self.busy_s: dict[str, float] = {}  # --profile: seconds spent per method
        self._traced = 0  # --profile: train steps traced so far

    @contextmanager
    def _working(self, what: str, generating: list | None = None):
        """The trainer's share of the cores (slime.cores) for one call, and the call's seconds counted.
        `generating` (--async): [the object ref of the rollout generating meanwhile]; once it is done the call
        goes on with the engines' cores too (CoreLease, polled between layers)."""
        from slime.cores import CoreLease

        start = time.perf_counter()
        cores = self.config.cores
        if cores is None:
            yield
        else:
            with cores.phase("train"):
                if generating:
                    self.trainer.between_layers = CoreLease(cores, finished(generating[0])).poll
                try:
                    yield
                finally:
                    self.trainer.between_layers = None
        self.busy_s[what] = self.busy_s.get(what, 0.0) + time.perf_counter() - start

    def busy_report(self) -> dict[str, float]:
        """Seconds this rank spent in each kind of call since the last report (then starts counting again)."""
        report, self.busy_s = self.busy_s, {}
        return report

    def devices(self) -> dict:
        return device_report(self.backend)

    def master_address(self) -> tuple[str, int]:
        """Rank 0: where the job's rendezvous store will listen (bound now, so the port cannot be taken)."""
        from slime.net import listening_socket

        bind, advertised = worker_addresses(self.config.bind_address)
        self._listener = listening_socket(bind)
        return advertised, self._listener.getsockname()[1]

    def init(self, master_addr: str, master_port: int) -> dict[str, int]:
        from slime.training.actor import PolicyTrainer
        from slime.training.critic import CriticTrainer
        from slime.training.distributed import init_distributed

        listen_fd = self._listener.detach() if self._listener is not None else None  # the store owns it now
        self._listener = None
        layout = init_distributed(
            self.backend, self.rank, self.world_size, master_addr, master_port,
            local_rank=self.backend.device_index, tensor_parallel_size=self.config.tensor_parallel_size,
            expert_parallel_size=self.config.expert_parallel_size, seed=self.config.seed, listen_fd=listen_fd,
        )  # fmt: skip
        self.trainer = (PolicyTrainer if self.role == "actor" else CriticTrainer)(self.config, self.backend)
        return {
            "rank": layout.rank,
            "tp_rank": layout.tp_rank,
            "dp_rank": layout.dp_rank,
            "dp_size": layout.dp_size,
            "pid": os.getpid(),
            "node": worker_addresses("node")[1],
        }

    # ---- per-step work ------------------------------------------------------------------------------
    def snapshot(self, name: str) -> None:
        self.trainer.snapshot(name)

    def compute_log_probs(self, shard: TrainBatch, weights: str, generating: list | None = None) -> tuple | None:
        """(log-probs, entropies) per sample of the share, from tensor-parallel rank 0 (None elsewhere)."""
        with self._working("log_probs", generating):
            result = self.trainer.compute_log_probs(shard, weights)
        return result if self.trainer.layout.tp_rank == 0 else None

    def compute_values(self, shard: TrainBatch, generating: list | None = None) -> list | None:
        with self._working("values", generating):
            values = self.trainer.compute_values(shard)
        return values if self.trainer.layout.tp_rank == 0 else None

    def train(
        self, shard: TrainBatch, keep_log_probs: bool = False, generating: list | None = None
    ) -> tuple[dict[str, float], tuple | None]:
        """One optimizer step; with `keep_log_probs`, also the share's (log-probs, entropies) as the step saw them
        before it changed the weights (from tensor-parallel rank 0, None elsewhere)."""
        with self._working("train", generating), self._traced_step():
            metrics = (
                self.trainer.train_step(shard, keep_log_probs=True)
                if keep_log_probs
                else self.trainer.train_step(shard)
            )
        seen = self.trainer.last_log_probs if keep_log_probs and self.trainer.layout.tp_rank == 0 else None
        return metrics, seen

    @contextmanager
    def _traced_step(self):
        """--profile: the first N train steps of rank 0 under the torch profiler, one Chrome trace each."""
        if self.rank != 0 or self._traced >= self.config.profile_steps:
            yield
            return
        from pathlib import Path

        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            yield
        folder = Path(self.config.profile_dir)
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / f"trainer_rank0_train_{self._traced:03d}.json"))
        self._traced += 1

    def sft(self, shard: TrainBatch, lr: float | None) -> dict[str, float]:
        with self._working("sft"):
            return self.trainer.sft_step(shard, lr)

    def reset_optimizer(self) -> None:
        self.trainer.reset_optimizer()

    def publish_weights(self, bucket_bytes: int) -> list:
        """HF-named full tensors in buckets, put in the object store by rank 0 (every rank takes part in the
        tensor-parallel gathers). Returns the buckets' object refs on rank 0, [] elsewhere."""
        import ray

        from slime.ray.weight_sync import PackedBucket

        refs = []
        with self._working("weights"):
            for bucket in self.trainer.hf_weight_buckets(bucket_bytes):
                if self.rank == 0:  # one copy into the packed bucket, whether the parameters are on host or device
                    refs.append(ray.put(PackedBucket.of(bucket)))
        return refs

    def broadcast_weights(self, urls: list[str], version: int, bucket_bytes: int, timeout_s: float) -> float:
        """Weight sync "broadcast": rank 0 sends every bucket to the engines at `urls` through one process group
        (the other ranks take part in the tensor-parallel gathers). Returns seconds on rank 0."""
        from slime.ray.weight_sync import BroadcastSender, drain

        with self._working("weights"):
            buckets = self.trainer.hf_weight_buckets(bucket_bytes)
            if self.rank != 0:
                drain(buckets)
                return 0.0
            if self._sender is None or self._sender.timeout_s != timeout_s:
                bind, address = worker_addresses(self.config.bind_address)
                self._sender = BroadcastSender(self.backend.dist_backend, address, timeout_s, bind=bind)
            return self._sender.send(urls, buckets, version)

    def ipc_weights(self, urls: list[str], version: int, bucket_bytes: int, timeout_s: float) -> float:
        """Weight sync "ipc": rank r hands device-memory handles to the colocated engine r (same device)."""
        from slime.ray.weight_sync import drain, send_ipc

        buckets = self.trainer.hf_weight_buckets(bucket_bytes)
        if self.rank >= len(urls):
            drain(buckets)
            return 0.0
        return send_ipc(self.backend, urls[self.rank], buckets, version, timeout_s)

    def shutdown(self) -> None:
        from slime.training.distributed import destroy_distributed

        destroy_distributed()


def finished(ref) -> Callable[[], bool]:
    """Whether the task behind the object ref `ref` has finished (its value is not fetched)."""

    def check() -> bool:
        import ray

        return bool(ray.wait([ref], timeout=0, fetch_local=False)[0])

    return check


def place_trainer_workers(
    role: str, config: TrainerConfig, backend: Backend, placement_group, slots: tuple[Slot, ...]
) -> list:
    """One TrainerWorker actor per slot (rank i in slots[i]); they bind their devices and wait for `init`."""
    import ray

    worker_class = ray.remote(TrainerWorker)
    return [
        worker_class.options(**scheduling(placement_group, slot, backend)).remote(
            role, config, backend.name, rank, len(slots)
        )
        for rank, slot in enumerate(slots)
    ]


def place_jax_trainer_workers(
    role: str,
    config: TrainerConfig,
    backend: Backend,
    placement_group,
    slots: tuple[Slot, ...],
    env: dict[str, str] | None = None,
) -> list:
    """One JaxTrainerWorker per slot: a whole trainer node's bundle (slime.ray.cluster, whole_node_trainer), all of
    whose devices the process asks Ray for; process i of len(slots). `env`: extra variables for the processes."""
    import ray

    from slime.ray.jax_trainer_worker import JaxTrainerWorker

    threads = config.cores.threads("train") if config.cores is not None else None
    workers = []
    for process, slot in enumerate(slots):
        if not backend.fractional_devices:  # colocated here, the engine lives in this process (capability_check)
            slot = replace(slot, share=1.0)
        options = scheduling(placement_group, slot, backend)
        variables = {**ray_env(backend), **backend.jax_process_env(slot.devices, threads), **(env or {})}
        options["runtime_env"] = {"env_vars": variables}
        worker = ray.remote(JaxTrainerWorker).options(**options)
        workers.append(worker.remote(role, config, backend.name, process, len(slots)))
    return workers


@dataclass(frozen=True)
class RankInfo:
    rank: int
    tp_rank: int
    dp_rank: int
    dp_size: int
    pid: int
    node: str = ""  # the address of the node the rank runs on


class TrainerGroup:
    """The ranks of one trainer (policy or critic), placed in `slots` of the run's placement group."""

    def __init__(
        self,
        role: str,
        config: TrainerConfig,
        backend: Backend,
        placement_group,
        slots: tuple[Slot, ...],
        family: str = "megatron",
    ):
        import ray

        self.role = role
        # the train step hands back the log-probs it computed before its update (--ci-test needs no extra pass)
        self.keeps_step_log_probs = family != "jax"
        # under --async a torch rank takes the engines' cores once the rollout beside it is done; the JAX family's
        # thread pool is fixed when its process starts
        self.borrows_idle_cores = family != "jax"
        if family == "jax":
            # one process per node drives every device of it; one mesh over all (data parallelism inside the mesh)
            self.workers = place_jax_trainer_workers(role, config, backend, placement_group, slots)
        else:
            self.workers = place_trainer_workers(role, config, backend, placement_group, slots)
        address, port = ray.get(self.workers[0].master_address.remote())
        self.ranks = [
            RankInfo(**info)
            for info in get_all([w.init.remote(address, port) for w in self.workers], what=f"{role} start-up")
        ]
        self.dp_size = self.ranks[0].dp_size

    # ---- helpers ------------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> list[Any]:
        return get_all([getattr(w, method).remote(*args) for w in self.workers], what=f"{self.role}.{method}")

    def _submit_sharded(self, method: str, batch: TrainBatch, *args: Any, generating=None) -> list:
        """Start `method(shard, *args)` on every rank with its data-parallel share; returns the futures.
        `generating`: the object ref of a rollout generating meanwhile (--async; TrainerWorker._working), passed
        inside a list so that Ray hands the ref itself, not its value."""
        import ray

        shards = [ray.put(batch.split_for_dp(dp, self.dp_size)) for dp in range(self.dp_size)]
        extra = {"generating": [generating]} if generating is not None and self.borrows_idle_cores else {}
        return [
            getattr(w, method).remote(shards[info.dp_rank], *args, **extra) for w, info in zip(self.workers, self.ranks)
        ]

    def _merge(self, per_rank: list[Any], total: int) -> list:
        """Per-sample results of the tensor-parallel rank 0 of each share, back in batch order."""
        merged: list = [None] * total
        for info, values in zip(self.ranks, per_rank):
            if info.tp_rank == 0:
                for j, value in enumerate(values):
                    merged[info.dp_rank + j * self.dp_size] = value
        return merged

    # ---- the calls the loop makes --------------------------------------------------------------------
    def compute_log_probs(self, batch: TrainBatch, weights: str = "actor", generating=None) -> tuple[list, list]:
        """Per-sample (log-probs, entropies) of the response tokens under the named weights, in batch order."""
        results = get_all(
            self._submit_sharded("compute_log_probs", batch, weights, generating=generating),
            what=f"{self.role}.compute_log_probs",
        )
        log_probs = self._merge([r[0] if r is not None else None for r in results], len(batch))
        entropies = self._merge([r[1] if r is not None else None for r in results], len(batch))
        return log_probs, entropies

    def compute_values(self, batch: TrainBatch, generating=None) -> list:
        futures = self._submit_sharded("compute_values", batch, generating=generating)
        return self._merge(get_all(futures, what="critic.compute_values"), len(batch))

    def submit_train(self, batch: TrainBatch, keep_log_probs: bool = False, generating=None) -> list:
        """Start one optimizer step on every rank (the actor and the critic train at the same time on their own
        devices); `finish_train` the futures."""
        return self._submit_sharded("train", batch, keep_log_probs, generating=generating)

    def finish_train(self, futures: list, total: int) -> tuple[dict[str, float], list | None, list | None]:
        """(metrics, log-probs, entropies) of a `submit_train`: the per-sample values, in batch order, only when
        it was asked to keep them (the step's own pre-update log-probs; no separate pass)."""
        results = get_all(futures, what=f"{self.role}.train")
        if results[0][1] is None:
            return results[0][0], None, None
        seen = [r[1] for r in results]
        log_probs = self._merge([s[0] if s is not None else None for s in seen], total)
        entropies = self._merge([s[1] if s is not None else None for s in seen], total)
        return results[0][0], log_probs, entropies

    def busy_report(self) -> list[dict[str, float]]:
        """--profile: each rank's seconds per kind of call since the last report."""
        return self._call("busy_report")

    def sft(self, batch: TrainBatch, lr: float | None) -> dict[str, float]:
        return get_all(self._submit_sharded("sft", batch, lr), what="actor.sft")[0]

    def publish_weights(self, bucket_bytes: int) -> list:
        return self._call("publish_weights", bucket_bytes)[0]

    def push_weights(self, transport: str, urls: list[str], version: int, bucket_bytes: int, timeout_s: float) -> float:
        """Weight sync "broadcast" or "ipc" to the engines at `urls`; returns the slowest rank's seconds."""
        method = {"broadcast": "broadcast_weights", "ipc": "ipc_weights"}[transport]
        return max(self._call(method, urls, version, bucket_bytes, timeout_s))

    def snapshot(self, name: str) -> None:
        self._call("snapshot", name)

    def reset_optimizer(self) -> None:
        self._call("reset_optimizer")

    def save(self, root: str, step: int, extra: dict | None = None) -> str:
        return self._call("save", root, step, extra)[0]

    def load(self, root: str) -> int:
        return self._call("load", root)[0]

    def save_hf(self, folder: str) -> str:
        return self._call("save_hf", folder)[0]

    def save_lora(self, folder: str) -> str:
        return self._call("save_lora", folder)[0]

    def offload(self) -> None:
        self._call("offload")

    def onload(self) -> None:
        self._call("onload")

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        except Exception:  # a rank already died: killing below is what matters
            pass
        for worker in self.workers:
            ray.kill(worker)
