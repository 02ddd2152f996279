"""A rollout engine in a Ray actor: it serves SGLang's HTTP API (which the generate functions use) and takes
weight updates and memory calls as actor methods (which the loop uses).

Which engine runs is `--rollout-engine` or the backend's default (slime.rollout.engines.selection): the embedded
or the JAX engine behind the SGLang-compatible server (embedded/server.py), an SGLang server (GPU backends), or
an sglang-jax server. All are `RolloutEngine`s, so everything below the constructor is the same code for
every engine. A JAX engine's process gets the backend's JAX environment from the rollout manager.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slime.cores import CoreBudget


@dataclass(frozen=True)
class EngineSpec:
    kind: str  # "embedded" | "jax" | "sglang" | "sglang_jax"
    hf_checkpoint: str
    max_batch_size: int = 64
    max_seq_len: int = 2048
    dtype: str = "float32"
    seed: int = 0
    server_options: dict[str, str] = field(default_factory=dict)  # --sglang-* pass-through
    return_routed_experts: bool = False  # the rollout asks for routed experts (SGLang: a server flag)
    log_dir: str | None = None
    staging_dir: str | None = None  # sglang-jax: where updated checkpoints are written
    # sglang-jax: its offline Engine in the worker's (or, hosted, the trainer's) process, weights assigned into its
    # model state (sglang_jax/in_process.py); False: its server, restarted on every update, and restart_reason
    # says why (slime.rollout.engines.selection.sglang_jax_mode)
    sglang_jax_in_process: bool = False
    restart_reason: str = ""
    # jax or in-process sglang-jax engine, --colocate with the JAX trainer: the engine runs inside the trainer's
    # process (one engine) and takes the trainer's parameters device to device instead of HF-named buckets
    hosted_by_trainer: bool = False
    # --bind-address as the driver resolved it (slime.ray.cluster.run_bind_address): node, 0.0.0.0 or an IP
    bind_address: str = "127.0.0.1"
    cores: CoreBudget | None = None  # threads while generating (slime.cores); None: the process's default


def start_engine(spec: EngineSpec, backend):
    """(engine, url, stop) for the spec's engine kind on this process's device, its server bound and advertised
    as --bind-address says."""
    from slime.net import worker_addresses

    host, advertise = worker_addresses(spec.bind_address)
    if spec.kind == "embedded":
        import torch

        from slime.rollout.engines.embedded.engine import EmbeddedEngine
        from slime.rollout.engines.embedded.server import serve_http

        engine = EmbeddedEngine(
            spec.hf_checkpoint, backend.torch_device(), spec.max_batch_size, spec.max_seq_len,
            getattr(torch, spec.dtype), spec.seed,
        )  # fmt: skip
        server = serve_http(engine, host, 0, advertise=advertise)
        return engine, server.url, server.stop
    if spec.kind == "jax":
        from slime.rollout.engines.embedded.server import serve_http
        from slime.rollout.engines.jax.engine import JaxEngine

        device = backend.jax_devices()[0]
        engine = JaxEngine(spec.hf_checkpoint, spec.max_batch_size, spec.max_seq_len, spec.dtype, spec.seed, device)
        server = serve_http(engine, host, 0, advertise=advertise)
        return engine, server.url, server.stop
    if spec.kind == "sglang":
        from slime.rollout.engines.sglang.launcher import SGLangEngine, SGLangServerConfig

        server = SGLangServerConfig(
            spec.hf_checkpoint, dict(spec.server_options), host=host, advertise=advertise, log_dir=spec.log_dir,
            return_routed_experts=spec.return_routed_experts,
        )  # fmt: skip
        engine = SGLangEngine(server)
        return engine, engine.url, lambda: None
    if spec.kind == "sglang_jax" and spec.sglang_jax_in_process:
        from slime.rollout.engines.embedded.server import serve_http
        from slime.rollout.engines.sglang_jax.engine import typed_server_options
        from slime.rollout.engines.sglang_jax.in_process import SGLangJaxInProcessEngine

        options = {"dtype": spec.dtype, **typed_server_options(spec.server_options)}
        engine = SGLangJaxInProcessEngine(
            spec.hf_checkpoint, spec.max_seq_len, max_batch_size=spec.max_batch_size, **options
        )
        server = serve_http(engine, host, 0, advertise=advertise)
        return engine, server.url, server.stop
    if spec.kind == "sglang_jax":
        from slime.rollout.engines.sglang_jax.engine import SGLangJaxEngine, SGLangJaxServerConfig

        staging = spec.staging_dir or os.path.join(spec.log_dir or ".", "sglang_jax_weights")
        engine = SGLangJaxEngine(
            SGLangJaxServerConfig(
                spec.hf_checkpoint, staging, dict(spec.server_options), host, advertise, log_dir=spec.log_dir
            )
        )
        return engine, engine.url, lambda: None
    raise ValueError(f"unknown rollout engine kind {spec.kind!r}")


def place_engine_worker(spec: EngineSpec, backend, placement_group, slot, env: dict[str, str] | None = None):
    """An EngineWorker actor in `slot` of the run's placement group; `start()` it to load the engine. `env`: the
    worker process's environment, when the engine needs one set before its stack is imported (JAX)."""
    import ray

    from slime.ray.cluster import scheduling

    options = scheduling(placement_group, slot, backend)
    if env:
        options["runtime_env"] = {"env_vars": env}
    return ray.remote(EngineWorker).options(**options).remote(spec, backend.name)


class EngineWorker:
    """Wrapped by ray.remote in the rollout manager; one per engine."""

    def __init__(self, spec: EngineSpec, hardware: str):
        from slime.backends import backend_for_worker
        from slime.net import bind_worker_network
        from slime.ray.cluster import bind_worker_devices

        self.spec = spec
        self.backend = backend_for_worker(hardware)  # the driver selected it; a worker does not probe again
        bind_worker_devices(self.backend)  # before the engine touches the device stack
        bind_worker_network(self.backend, spec.bind_address)  # before its weight group forms

    def devices(self) -> dict:
        from slime.ray.cluster import device_report

        return device_report(self.backend)

    def start(self) -> dict:
        """Start the engine (and its server) on this worker's device; returns `info()`."""
        self.backend.setup_process(self.backend.device_index)
        if self.spec.cores is not None:  # before the engine's worker thread exists: it takes this value
            self.spec.cores.apply("generate")
        self.engine, self.url, self._stop_server = start_engine(self.spec, self.backend)
        return self.info()

    def info(self) -> dict:
        import ray

        node = {"node_id": ray.get_runtime_context().get_node_id(), "node": ray.util.get_node_ip_address()}
        return {"url": self.url, "pid": os.getpid(), "weight_version": self.engine.weight_version, **node}

    def health(self) -> bool:
        return self.engine.health()

    def update_weights(self, bucket_refs: list, version: int) -> float:
        """Apply HF-named tensor buckets (object refs to `PackedBucket`s, fetched one at a time) as weight
        `version`; seconds taken."""
        import ray

        start = time.perf_counter()
        self.engine.begin_weight_update()
        try:
            for i, ref in enumerate(bucket_refs):
                self.engine.update_weights_from_tensors(
                    ray.get(ref).tensors(), version, finish=i == len(bucket_refs) - 1
                )
        finally:
            self.engine.end_weight_update()
        return time.perf_counter() - start

    def release_memory(self, tags: list[str] | None = None) -> None:
        self.engine.release_memory(tags)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self.engine.resume_memory(tags)

    def shutdown(self) -> None:
        self._stop_server()
        self.engine.shutdown()
