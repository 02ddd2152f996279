"""sglang-jax inside this process: generation through its offline `Engine`, weight updates assigned straight into
the engine's model state (no checkpoint folder, no server restart).

sglang-jax has no weight-update endpoint, so the server adapter (engine.py) restarts the server from a written
folder on every update; that stays as the fallback for sglang-jax versions without a single-process scheduler.
This adapter follows the way google/tunix drives sglang-jax for RL: start `sgl_jax.srt.entrypoints.engine.Engine`
with `enable_single_process=True`, so the scheduler and its model runner live in this process and
`engine.scheduler_info["scheduler"].tp_worker.worker.model_runner.model` is the flax-nnx model being served.

A weight update maps each HF name onto the model's state path (the same mapping sglang-jax's own loaders use
for the dense families: embeddings and RMSNorm weights are `embedding` / `scale`, linear kernels are stored
transposed), then `jax.device_put`s the array onto the sharding that state already has: a JAX array from the
trainer's mesh is resharded device to device, a host tensor is placed once. After the assignment the model
runner re-creates its jitted functions (`initialize_jit`), which close over the state.

Not covered: KV-head padding (sglang-jax replicates KV heads when the tensor-parallel degree exceeds them; such
an update is refused in one line) and MoE experts. Needs an sglang-jax whose Engine accepts
`enable_single_process` and exposes its scheduler in `scheduler_info` (newer than the registry's 0.0.2, which
the hardware extra pins; install such a version from sglang-jax's repository to use this adapter).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from slime.rollout.engines.base import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    RolloutEngine,
    WeightUpdateError,
)
from slime.rollout.engines.protocol import parse_generate_response, sampling_params_to_json

_NORM = re.compile(r"(input_layernorm|post_attention_layernorm|q_norm|k_norm|model\.norm)\.weight$")
_LINEAR = re.compile(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(weight|bias)$")


def state_path(hf_name: str) -> tuple[str, bool]:
    """(path of the nnx variable in sglang-jax's dense models, whether the HF tensor is stored transposed)."""
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return hf_name.removesuffix(".weight") + ".embedding", False
    if _NORM.search(hf_name):
        return hf_name.removesuffix(".weight") + ".scale", False
    match = _LINEAR.search(hf_name)
    if match:
        return hf_name, match.group(2) == "weight"
    raise WeightUpdateError(f"weight update rejected: {hf_name!r} has no place in the sglang-jax model")


def _variable(model, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part, None)
        if node is None:
            raise WeightUpdateError(f"weight update rejected: the sglang-jax model has no {path}")
    return node


def _as_jax(name: str, tensor):
    import jax.numpy as jnp

    if hasattr(tensor, "detach"):  # torch: through float32 (numpy has no bfloat16)
        return jnp.asarray(tensor.detach().to("cpu").float().numpy())
    return tensor if hasattr(tensor, "sharding") else jnp.asarray(tensor)


def assign_hf_weights(model, named: Iterable[tuple[str, object]]) -> int:
    """Check every tensor against the model's state, then assign them all; returns how many were assigned."""
    import jax

    planned = []
    for name, tensor in named:
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        path, transpose = state_path(name)
        variable = _variable(model, path)
        value = _as_jax(name, tensor)
        value = value.T if transpose else value
        if tuple(value.shape) != tuple(variable.value.shape):
            raise WeightUpdateError(
                f"weight update rejected: {name!r} maps to {path} of shape {tuple(variable.value.shape)}, got "
                f"{tuple(value.shape)} (KV-head padding, used when tensor parallelism exceeds the KV heads, is not "
                "supported in process)"
            )
        planned.append((variable, value))
    for variable, value in planned:
        variable.value = jax.device_put(value.astype(variable.value.dtype), variable.value.sharding)
    return len(planned)


class SGLangJaxInProcessEngine(RolloutEngine):
    """sglang-jax's offline Engine in this process; see the module docstring."""

    def __init__(self, hf_checkpoint: str, context_length: int, tp_size: int = 1, **engine_args):
        try:
            from sgl_jax.srt.entrypoints.engine import Engine
        except ImportError:
            raise EngineError("the in-process sglang-jax engine needs sglang-jax: pip install sglang-jax") from None
        self.model_path = hf_checkpoint
        args = dict(
            model_path=hf_checkpoint,
            context_length=context_length,
            tp_size=tp_size,
            enable_single_process=True,
            disable_radix_cache=True,  # a weight update must not serve prefixes cached under the old weights
            enable_deterministic_sampling=True,
        )
        args.update(engine_args)
        self._engine = Engine(**args)
        self._weight_version = 0
        self._pending: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def _model_runner(self):
        info = self._engine.scheduler_info
        if "scheduler" not in info:
            raise EngineError("this sglang-jax runs its scheduler in another process; in-process updates need one")
        return info["scheduler"].tp_worker.worker.model_runner

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        if not requests:
            return []
        with self._lock:
            outputs = self._engine.generate(
                input_ids=[list(r.input_ids) for r in requests],
                sampling_params=[sampling_params_to_json(r.sampling_params) for r in requests],
                return_logprob=[r.return_logprob for r in requests],
            )
        results = [parse_generate_response(o, r.rid) for o, r in zip(outputs, requests)]
        return [
            GenerateResult(**{**result.__dict__, "rid": r.rid, "weight_version": self._weight_version})
            for result, r in zip(results, requests)
        ]

    def update_weights_from_tensors(self, named_tensors, version: int, finish: bool = True) -> None:
        self._pending.extend(named_tensors)
        if not finish:
            return
        staged, self._pending = self._pending, []
        with self._lock:
            runner = self._model_runner()
            assign_hf_weights(runner.model, staged)
            runner.initialize_jit()
            self._weight_version = int(version)

    def update_weights_from_disk(self, path: str, version: int) -> None:
        from slime.rollout.engines.embedded.weights import read_checkpoint_tensors

        self.update_weights_from_tensors(read_checkpoint_tensors(path).items(), version)

    def pause(self) -> None:
        self._lock.acquire()

    def resume(self) -> None:
        if self._lock.locked():
            self._lock.release()

    def begin_weight_update(self) -> None:
        """Generation is synchronous under the lock, so an update simply waits for the current batch."""

    def end_weight_update(self) -> None:
        """Nothing to resume: see begin_weight_update."""

    def abort(self, rid: str | None = None) -> None:
        """The offline Engine's generate is one blocking call; nothing can be aborted from outside it."""

    def health(self) -> bool:
        return self._engine is not None

    def release_memory(self, tags: list[str] | None = None) -> None:
        """The offline Engine has no memory release; colocation keeps its memory (documented limitation)."""

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """See release_memory."""

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
