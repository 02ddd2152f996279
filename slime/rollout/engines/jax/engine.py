"""The JAX engine: continuous batching over a static KV cache with jitted, shape-bucketed steps (model.py).

The scheduling mirrors the embedded engine: one worker thread owns the model; requests wait in a queue, are
admitted into free cache slots (lowest first, so active rows stay packed at the front), prefilled in one
padded batch, and then every active slot decodes one token per step. A finished sequence frees its slot at
once, so waiting requests join the running batch on the next step.

Determinism: each request samples with its own key, fold_in(PRNGKey(seed), index of the token), where seed is
the request's sampling seed (or one the engine draws from its own seed, in submission order). A request's
tokens therefore do not depend on what else is in the batch.

Weights are a `{hf_name: array}` pytree, the same layout as the JAX trainer's, so an update is a dict of new
arrays: validated names and shapes, staged until `finish`, swapped in between two steps.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from slime.models import jax_dense
from slime.models.jax_dense import EMBED, LM_HEAD
from slime.rollout.engines.base import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    ResultCallback,
    SamplingParams,
    ServableEngine,
    WeightUpdateError,
    wants_kv_cache,
)
from slime.rollout.engines.embedded.engine import _load_tokenizer
from slime.rollout.engines.embedded.model import DecoderSpec
from slime.rollout.engines.embedded.sampling import find_stop_string
from slime.rollout.engines.jax.model import RowSampling, StepFunctions, allocate_cache, bucket

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(eq=False)
class _Sequence:
    request: GenerateRequest
    prompt: list[int]
    params: SamplingParams
    callback: ResultCallback
    stop_ids: frozenset[int]
    seed: int  # uint32
    slot: int = -1
    matched_stop: int | str | None = None
    output_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)

    @property
    def truncates(self) -> bool:
        p = self.params
        return p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)


def _sampling_rows(rows: list[_Sequence | None]) -> tuple[RowSampling, bool]:
    """Per-row sampling inputs (None rows are greedy fillers) and whether any row truncates."""
    params = [s.params if s is not None else SamplingParams(temperature=0.0) for s in rows]
    sampling = RowSampling(
        temperature=np.array([p.temperature for p in params], np.float32),
        top_k=np.array([p.top_k for p in params], np.int32),
        top_p=np.array([p.top_p for p in params], np.float32),
        min_p=np.array([p.min_p for p in params], np.float32),
        seed=np.array([s.seed if s is not None else 0 for s in rows], np.uint32),
        counter=np.array([len(s.output_ids) if s is not None else 0 for s in rows], np.int32),
    )
    return sampling, any(s is not None and s.truncates for s in rows)


class JaxEngine(ServableEngine):
    """Serve an HF checkpoint (the dense families of slime.models.jax_dense) with jitted JAX steps."""

    engine_name = "slime-jax"

    def __init__(
        self,
        hf_checkpoint_dir: str,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        dtype: str = "float32",
        seed: int = 0,
        device=None,
    ):
        """device: the JAX device to serve on (default: the first one); a colocated engine takes one of the
        trainer's."""
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(
                f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size} and {max_seq_len}"
            )
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.model_path = hf_checkpoint_dir
        self.model_type = DecoderSpec.from_checkpoint(hf_checkpoint_dir).model_type
        self.eos_token_ids = DecoderSpec.from_checkpoint(hf_checkpoint_dir).eos_token_ids
        self.spec, self.shapes = jax_dense.spec_from_hf(hf_checkpoint_dir)
        self.dtype = DTYPES[dtype]
        params, _ = jax_dense.load_hf_params(hf_checkpoint_dir, self.spec, self.shapes)
        self.device = device if device is not None else jax.local_devices()[0]
        self.params = {
            name: jax.device_put(jnp.asarray(value, self.dtype), self.device) for name, value in params.items()
        }
        self.tokenizer = _load_tokenizer(hf_checkpoint_dir)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.steps = StepFunctions(self.spec)
        self._cache: tuple | None = allocate_cache(self.spec, max_batch_size, max_seq_len, self.dtype, self.device)
        self._seeds = random.Random(seed)
        self._weight_version = 0
        self._pending_update: dict[str, np.ndarray] = {}
        self._update_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._slots: list[_Sequence | None] = [None] * max_batch_size
        self._free_slots = list(range(max_batch_size))
        self._paused = False
        self._stopping = False
        self._rid_counter = itertools.count()
        self._worker = threading.Thread(target=self._run, name="jax-engine", daemon=True)
        self._worker.start()

    @property
    def traces(self) -> dict[str, int]:
        """Compilations so far per step kind (prefill, decode): bounded by the number of shape buckets."""
        return dict(self.steps.traces)

    # ---- submission ----------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, callback: ResultCallback) -> None:
        prompt = [int(t) for t in request.input_ids]
        problem = self.request_problem(request, prompt)
        if problem is not None:
            callback(self._result(request, [], [], "error", error=problem, prompt_tokens=len(prompt)))
            return
        params = request.sampling_params
        if params.max_new_tokens == 0:
            callback(self._result(request, [], [], "length", prompt_tokens=len(prompt)))
            return
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        with self._cond:
            if self._stopping:
                raise EngineError("the engine was shut down")
            seed = self._seeds.getrandbits(32) if params.seed is None else params.seed % (1 << 32)
            self._waiting.append(_Sequence(request, prompt, params, callback, frozenset(stop_ids), seed))
            self._cond.notify_all()

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def new_rid(self) -> str:
        return f"jax-{next(self._rid_counter)}"

    # ---- worker --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work_locked():
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                with self._model_lock:
                    finished = self._step()
            except Exception as error:  # a bug or device failure: fail what is running, keep the thread alive
                logger.exception("jax engine step failed")
                finished = self._fail_all(f"engine step failed: {type(error).__name__}: {error}")
            for seq, result in finished:
                seq.callback(result)

    def _has_work_locked(self) -> bool:
        if self._paused or self._cache is None:
            return False
        return bool(self._waiting) or any(s is not None for s in self._slots)

    def _step(self) -> list[tuple[_Sequence, GenerateResult]]:
        finished: list[tuple[_Sequence, GenerateResult]] = []
        with self._cond:
            if not self._has_work_locked():
                return finished
            admitted = []
            while self._waiting and self._free_slots:
                seq = self._waiting.popleft()
                seq.slot = heapq.heappop(self._free_slots)
                self._slots[seq.slot] = seq
                admitted.append(seq)
        if admitted:
            finished += self._prefill(admitted)
        running = [s for s in self._slots if s is not None]
        if running:
            finished += self._decode(running)
        return finished

    def _prefill(self, group: list[_Sequence]) -> list[tuple[_Sequence, GenerateResult]]:
        rows = bucket(len(group), self.max_batch_size)
        width = bucket(max(len(s.prompt) for s in group), self.max_seq_len)
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)
        slots = np.full(rows, self.max_batch_size, np.int32)  # padding rows write the scratch row
        for i, s in enumerate(group):
            tokens[i, : len(s.prompt)] = s.prompt
            lengths[i], slots[i] = len(s.prompt), s.slot
        sampling, filtered = _sampling_rows(group + [None] * (rows - len(group)))
        k_cache, v_cache = self._cache
        k_cache, v_cache, ids, log_probs = self.steps.prefill(
            self.params, k_cache, v_cache, tokens, lengths, slots, sampling, filtered=filtered
        )
        self._cache = (k_cache, v_cache)
        return self._append(group, np.asarray(ids)[: len(group)], np.asarray(log_probs)[: len(group)])

    def _decode(self, running: list[_Sequence]) -> list[tuple[_Sequence, GenerateResult]]:
        rows = bucket(max(s.slot for s in running) + 1, self.max_batch_size)
        table: list[_Sequence | None] = [None] * rows
        for s in running:
            table[s.slot] = s
        # A free row writes its (ignored) key at the last position, which any sequence overwrites before reading.
        free_position = self.max_seq_len - 1
        positions = np.array([len(s.prompt) + len(s.output_ids) - 1 if s else free_position for s in table], np.int32)
        tokens = np.array([s.output_ids[-1] if s else 0 for s in table], np.int32)
        attend = bucket(max(len(s.prompt) + len(s.output_ids) for s in running), self.max_seq_len)
        sampling, filtered = _sampling_rows(table)
        k_cache, v_cache = self._cache
        k_cache, v_cache, ids, log_probs = self.steps.decode(
            self.params, k_cache, v_cache, tokens, positions, sampling, attend=attend, filtered=filtered
        )
        self._cache = (k_cache, v_cache)
        ids, log_probs = np.asarray(ids), np.asarray(log_probs)
        return self._append(running, ids[[s.slot for s in running]], log_probs[[s.slot for s in running]])

    def _append(self, seqs: list[_Sequence], ids, log_probs) -> list[tuple[_Sequence, GenerateResult]]:
        finished = []
        for seq, token, log_prob in zip(seqs, ids.tolist(), log_probs.tolist()):
            seq.output_ids.append(token)
            seq.log_probs.append(log_prob)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                finished.append((seq, self._release(seq, reason)))
        return finished

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        if token in seq.stop_ids:
            seq.matched_stop = token
            return "stop"
        if seq.params.stop:
            matched = find_stop_string(self.tokenizer.decode(seq.output_ids), seq.params.stop)
            if matched is not None:
                seq.matched_stop = matched
                return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            return "length"
        if len(seq.prompt) + len(seq.output_ids) >= self.max_seq_len:
            return "length"
        return None

    def _release(self, seq: _Sequence, reason: str, error: str | None = None) -> GenerateResult:
        """Free the sequence's slot and build its result. Caller holds _model_lock (slot reuse is safe)."""
        with self._cond:
            if seq.slot >= 0 and self._slots[seq.slot] is seq:
                self._slots[seq.slot] = None
                heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1
        return self._result(
            seq.request, seq.output_ids, seq.log_probs, reason, error, len(seq.prompt), seq.matched_stop
        )

    def _result(
        self, request, output_ids, log_probs, reason, error=None, prompt_tokens=0, matched=None
    ) -> GenerateResult:
        return GenerateResult(
            rid=request.rid,
            output_ids=list(output_ids),
            output_log_probs=list(log_probs) if request.return_logprob else None,
            finish_reason=reason,
            error=error,
            weight_version=self._weight_version,
            prompt_tokens=prompt_tokens,
            text=self.tokenizer.decode(output_ids, skip_special_tokens=True) if self.tokenizer is not None else None,
            matched_stop=matched,
        )

    def _fail_all(self, message: str) -> list[tuple[_Sequence, GenerateResult]]:
        with self._model_lock:
            if self._cache is not None and any(a.is_deleted() for a in self._cache):  # donated into a failed step
                self._cache = allocate_cache(self.spec, self.max_batch_size, self.max_seq_len, self.dtype, self.device)
            active = [s for s in self._slots if s is not None]
            return [(s, self._release(s, "error", error=message)) for s in active]

    # ---- control -------------------------------------------------------------------------------------
    def pause(self) -> None:
        with self._cond:
            self._paused = True
        with self._model_lock:  # return once the current step is over
            pass

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def abort(self, rid: str | None = None) -> None:
        finished = []
        with self._model_lock:
            with self._cond:
                waiting = [s for s in self._waiting if rid is None or s.request.rid == rid]
                for s in waiting:
                    self._waiting.remove(s)
                active = [s for s in self._slots if s is not None and (rid is None or s.request.rid == rid)]
            for s in waiting + active:
                finished.append((s, self._release(s, "abort", error="aborted")))
        for seq, result in finished:
            seq.callback(result)

    def health(self) -> bool:
        return self._worker.is_alive() and not self._stopping

    def num_running(self) -> int:
        with self._cond:
            return sum(s is not None for s in self._slots)

    def release_memory(self, tags: list[str] | None = None) -> None:
        if not wants_kv_cache(tags):  # the weights stay: the trainer sends the next ones into them
            return
        with self._model_lock:
            running = self.num_running()
            if running:
                raise EngineError(
                    f"release_memory needs an idle engine, but {running} request(s) are running; abort them first"
                )
            self._cache = None

    def resume_memory(self, tags: list[str] | None = None) -> None:
        if not wants_kv_cache(tags):
            return
        with self._model_lock:
            if self._cache is None:
                self._cache = allocate_cache(self.spec, self.max_batch_size, self.max_seq_len, self.dtype, self.device)
        with self._cond:
            self._cond.notify_all()

    @property
    def weight_version(self) -> int:
        return self._weight_version

    # ---- weights -------------------------------------------------------------------------------------
    def _checked(self, named: Iterable[tuple[str, object]]) -> list[tuple[str, np.ndarray]]:
        """Host fp32 copies of a bucket, every name and shape checked before anything is kept."""
        checked = []
        for name, tensor in named:
            if name.endswith(IGNORED_SUFFIXES) or (self.spec.tied and name == LM_HEAD):
                continue
            if name not in self.shapes:
                raise WeightUpdateError(f"weight update rejected: unknown tensor name {name!r} for this model")
            value = _host_array(name, tensor)
            if tuple(value.shape) != tuple(self.shapes[name]):
                raise WeightUpdateError(
                    f"weight update rejected: {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(self.shapes[name])}"
                )
            checked.append((name, value))
        return checked

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, object]], version: int, finish: bool = True
    ) -> None:
        with self._update_lock:
            try:
                checked = self._checked(named_tensors)
            except WeightUpdateError:
                self._pending_update.clear()  # the whole multi-bucket update is void
                raise
            self._pending_update.update(checked)
            if finish:
                staged, self._pending_update = self._pending_update, {}
                self._swap_in(staged, version)

    def _swap_in(self, staged: dict[str, np.ndarray], version: int) -> None:
        new = {name: jax.device_put(jnp.asarray(value, self.dtype), self.device) for name, value in staged.items()}
        with self._model_lock:
            self.params = {**self.params, **new}
            self._weight_version = int(version)

    def update_weights_in_place(self, params: Mapping[str, jax.Array], version: int) -> None:
        """A colocated JAX trainer's parameter pytree (same HF names, possibly sharded over the trainer's mesh and
        with vocabulary rows padded) placed onto this engine's device and dtype: device to device, no host copy and
        no renaming. Every name and shape is checked before anything is swapped in."""
        missing = sorted(set(self.shapes) - set(params))
        if missing:
            raise WeightUpdateError(f"weight update rejected: {missing[0]} is missing ({len(missing)} in all)")
        placed = {}
        for name, shape in self.shapes.items():
            value = params[name]
            if name in (EMBED, LM_HEAD) and value.shape[0] > self.spec.vocab_size:
                value = value[: self.spec.vocab_size]  # the trainer's padded rows (a multiple of its TP degree)
            if tuple(value.shape) != tuple(shape):
                raise WeightUpdateError(
                    f"weight update rejected: {name!r} has shape {tuple(value.shape)}, the model expects {tuple(shape)}"
                )
            placed[name] = jax.device_put(value, self.device).astype(self.dtype)
        with self._update_lock:
            self._pending_update.clear()
            with self._model_lock:
                self.params = placed
                self._weight_version = int(version)

    def update_weights_from_disk(self, path: str, version: int) -> None:
        with self._update_lock:
            self._pending_update.clear()
            try:
                spec, shapes = jax_dense.spec_from_hf(path)
                if spec != self.spec:
                    raise WeightUpdateError(
                        f"{path}: its config.json describes a different model than the one being served "
                        f"({self.model_path})"
                    )
                params, _ = jax_dense.load_hf_params(path, spec, shapes)
            except (ValueError, FileNotFoundError) as e:
                raise WeightUpdateError(str(e)) from None
            self._swap_in(params, version)

    def named_weights(self) -> dict[str, np.ndarray]:
        """HF name -> the serving array (read-only)."""
        return dict(self.params)

    # ---- lifecycle -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        with self._cond:
            if self._stopping:
                return
        self.abort(None)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._worker.join(timeout=30)


def _host_array(name: str, tensor: object) -> np.ndarray:
    """A float32 numpy copy of a torch tensor, numpy array or JAX array; non-float tensors are rejected."""
    if hasattr(tensor, "detach"):  # torch (bfloat16 has no numpy dtype, so go through float32)
        if not tensor.is_floating_point():
            raise WeightUpdateError(f"weight update rejected: {name!r} has dtype {tensor.dtype}, expected floats")
        return tensor.detach().to("cpu").float().numpy()
    value = np.asarray(tensor)
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
        raise WeightUpdateError(f"weight update rejected: {name!r} has dtype {value.dtype}, expected floats")
    return value.astype(np.float32)
