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
runner's `model_state_leaves` are rebound to the new state (its jitted calls read that list on every call, as
tunix's sampler relies on), so nothing is recompiled.

Behind the SGLang-compatible HTTP server (ServableEngine): requests queue, one thread hands all queued requests
to the offline Engine's blocking `generate` as one batch. Where it runs (slime.ray.engine_worker): in an
EngineWorker actor that owns its chips, taking HF-named buckets; or, --colocate with the JAX trainer and one
engine, inside the trainer's actor (EngineSpec.hosted_by_trainer), taking the trainer's sharded parameters
device to device (update_weights_in_place). Chosen by slime.rollout.engines.selection.sglang_jax_mode.

Not covered: KV-head padding (sglang-jax replicates KV heads when the tensor-parallel degree exceeds them; such
an update is refused in one line) and MoE experts. Needs an sglang-jax whose Engine accepts
`enable_single_process` and exposes its scheduler in `scheduler_info` (newer than the registry's 0.0.2, which
the hardware extra pins; install such a version from sglang-jax's repository to use this adapter).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

from slime.rollout.engines.base import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    ResultCallback,
    ServableEngine,
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
    """Check every tensor against the model's state, then assign them all; returns how many were assigned.
    Embedding / LM-head rows beyond the model's (a JAX trainer pads its vocabulary to its TP degree) are cut."""
    import jax

    planned = []
    for name, tensor in named:
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        path, transpose = state_path(name)
        variable = _variable(model, path)
        value = _as_jax(name, tensor)
        value = value.T if transpose else value
        if path.endswith(".embedding") and value.shape[0] > variable.value.shape[0]:
            value = value[: variable.value.shape[0]]
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


def rebind_state_leaves(runner) -> None:
    """Point the model runner's jitted calls at the model's current state: its `model_state_leaves`, flattened as
    its initialize_jit does, keeping the placeholders initialize_jit put where the state holds shape structs."""
    import jax
    from flax import nnx

    leaves, _ = jax.tree_util.tree_flatten(nnx.split(runner.model)[1])
    old = runner.model_state_leaves
    runner.model_state_leaves = [o if isinstance(n, jax.ShapeDtypeStruct) else n for n, o in zip(leaves, old)]


def unsupported_model(hf_config: Mapping[str, object]) -> str | None:
    """What the pinned sglang-jax cannot serve, found before it starts (it fails deep inside a jitted call)."""
    heads = int(hf_config.get("num_attention_heads", 1))
    head_dim = int(hf_config.get("head_dim") or int(hf_config.get("hidden_size", 0)) // heads)
    if head_dim % 128:
        return f"sglang-jax's attention needs head_dim to be a multiple of 128, this model has {head_dim}"
    if hf_config.get("model_type") == "qwen2" and int(hf_config.get("num_key_value_heads", heads)) == 1:
        return "sglang-jax's Qwen2 fails on a single KV head (a sharding error in its attention)"
    return None


class SGLangJaxInProcessEngine(ServableEngine):
    """sglang-jax's offline Engine in this process; see the module docstring."""

    engine_name = "sglang-jax"

    def __init__(self, hf_checkpoint: str, context_length: int, tp_size: int = 1, max_batch_size: int = 64, **args):
        try:
            from sgl_jax.srt.entrypoints.engine import Engine
        except ImportError:
            raise EngineError(
                "the in-process sglang-jax engine needs sglang-jax at its known-good commit (`slime env` prints the "
                "install command)"
            ) from None
        from slime.rollout.engines.embedded.engine import _load_tokenizer

        hf_config = json.loads((Path(hf_checkpoint) / "config.json").read_text())
        problem = unsupported_model(hf_config)
        if problem:
            raise EngineError(f"{hf_checkpoint}: {problem}; --rollout-engine jax serves it")
        self.model_path, self.model_type = hf_checkpoint, hf_config.get("model_type", "")
        self.vocab_size, self.tokenizer = int(hf_config["vocab_size"]), _load_tokenizer(hf_checkpoint)
        self.max_batch_size, self.max_seq_len = max_batch_size, context_length
        engine_args = dict(
            model_path=hf_checkpoint,
            context_length=context_length,
            tp_size=tp_size,
            max_running_requests=max_batch_size,
            enable_single_process=True,
            # slime sends no grammar constraints (its /generate refuses them), and llguidance refuses tokenizers
            # whose decoder it does not know (the quickstart's character tokenizer among them) at start-up
            grammar_backend="none",
            # at the pinned commit on JAX's CPU backend, the overlap scheduler (the next batch scheduled while the
            # current one runs) served wrong tokens in about one start of three; without it, none in the tests
            disable_overlap_schedule=True,
            enable_deterministic_sampling=True,
        )
        self._engine = Engine(**{**engine_args, **args})
        self._weight_version = 0
        self._pending: list[tuple[str, object]] = []
        self._model_lock = threading.Lock()  # held while a batch generates and while weights are assigned
        self._cond = threading.Condition()
        self._waiting: deque[tuple[GenerateRequest, ResultCallback]] = deque()
        self._stopping = False
        self._paused = False  # queued requests stay queued (and abortable) until resume
        self._rids = itertools.count()
        self._worker = threading.Thread(target=self._run, name="sglang-jax-in-process", daemon=True)
        self._worker.start()

    def _model_runner(self):
        info = self._engine.scheduler_info
        if "scheduler" not in info:
            raise EngineError("this sglang-jax runs its scheduler in another process; in-process updates need one")
        return info["scheduler"].tp_worker.worker.model_runner

    # ---- generation: queued requests go to the offline Engine as one batch ----------------------------------
    def submit(self, request: GenerateRequest, callback: ResultCallback) -> None:
        problem = self.request_problem(request, [int(t) for t in request.input_ids])
        if problem is not None:
            callback(GenerateResult(request.rid, [], None, "error", error=problem))
            return
        with self._cond:
            if self._stopping:
                raise EngineError("the engine was shut down")
            self._waiting.append((request, callback))
            self._cond.notify_all()

    def new_rid(self) -> str:
        return f"sglang-jax-{next(self._rids)}"

    def _run(self) -> None:
        while True:
            with self._cond:
                while (self._paused or not self._waiting) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                count = min(len(self._waiting), self.max_batch_size)
                batch = [self._waiting.popleft() for _ in range(count)]
            try:
                with self._model_lock:
                    results = self._generate_batch([request for request, _ in batch])
            except Exception as error:  # the engine failed this batch: every request in it gets the reason
                results = [GenerateResult(r.rid, [], None, "error", error=f"sglang-jax: {error}") for r, _ in batch]
            for (_, callback), result in zip(batch, results):
                callback(result)

    def _generate_batch(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        outputs = self._engine.generate(
            input_ids=[[int(t) for t in r.input_ids] for r in requests],
            sampling_params=[sampling_params_to_json(r.sampling_params) for r in requests],
            return_logprob=[r.return_logprob for r in requests],
        )
        results = [parse_generate_response(o, r.rid) for o, r in zip(outputs, requests)]
        return [
            GenerateResult(**{**result.__dict__, "rid": r.rid, "weight_version": self._weight_version})
            for result, r in zip(results, requests)
        ]

    # ---- weights ---------------------------------------------------------------------------------------
    def _assign(self, named: Iterable[tuple[str, object]], version: int) -> None:
        with self._model_lock:
            runner = self._model_runner()
            assign_hf_weights(runner.model, named)
            rebind_state_leaves(runner)
            self._flush_prefix_cache()
            self._weight_version = int(version)

    def _flush_prefix_cache(self) -> None:
        """Drop the prefix cache computed with the old weights (the engine is idle here: batches run under the
        model lock, and sglang-jax flushes only an idle engine)."""
        result = self._engine.flush_cache()
        if getattr(result, "success", True) is False:
            raise WeightUpdateError(f"sglang-jax did not flush its prefix cache after the update: {result}")

    def update_weights_from_tensors(self, named_tensors, version: int, finish: bool = True) -> None:
        self._pending.extend(named_tensors)
        if not finish:
            return
        staged, self._pending = self._pending, []
        self._assign(staged, version)

    def update_weights_in_place(self, params: Mapping[str, object], version: int) -> None:
        """A colocated JAX trainer's HF-named parameters (sharded over its mesh): resharded onto the engine's
        state device to device by assign_hf_weights' device_put, no host copy."""
        self._pending = []
        self._assign(params.items(), version)

    def update_weights_from_disk(self, path: str, version: int) -> None:
        from slime.rollout.engines.embedded.weights import read_checkpoint_tensors

        self._pending = []
        self._assign(read_checkpoint_tensors(path).items(), version)

    # ---- control ---------------------------------------------------------------------------------------
    def pause(self) -> None:
        """No new batch starts; returns once the batch in flight (the offline Engine's blocking generate) ends."""
        with self._cond:
            self._paused = True
        with self._model_lock:
            pass

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def begin_weight_update(self) -> None:
        """Generation runs in whole batches under the model lock, so an update waits for the batch in flight."""

    def end_weight_update(self) -> None:
        """Nothing to resume: see begin_weight_update."""

    def abort(self, rid: str | None = None) -> None:
        """Queued requests end as "abort"; a batch inside the offline Engine's blocking generate runs to its end."""
        with self._cond:
            keep = deque(item for item in self._waiting if rid is not None and item[0].rid != rid)
            dropped = [item for item in self._waiting if item not in keep]
            self._waiting = keep
        for request, callback in dropped:
            callback(GenerateResult(request.rid, [], None, "abort", weight_version=self._weight_version))

    def health(self) -> bool:
        return self._engine is not None and self._worker.is_alive()

    def release_memory(self, tags: list[str] | None = None) -> None:
        """The offline Engine has no memory release: a colocated one keeps its KV cache (size it with
        --sglang-mem-fraction-static)."""

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """See release_memory."""

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.abort()
        engine, self._engine = self._engine, None
        if engine is not None:
            close_single_process_engine(engine)


def close_single_process_engine(engine) -> None:
    """Close what a single-process sglang-jax Engine owns in this process. Not Engine.shutdown: that kills every
    child process of its host (its cleanup for the multi-process mode), which in a trainer's or a Ray worker's
    process takes down processes that are not the engine's. In single-process mode the engine is threads: its
    scheduler and detokenizer loops (daemon threads with no stop, idle once nothing is sent) and the socket
    this process sends to them on."""
    socket = getattr(engine, "send_to_rpc", None)
    if socket is not None:
        socket.close()
    engine.scheduler_info.pop("scheduler", None)
