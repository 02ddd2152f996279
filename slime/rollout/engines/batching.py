"""Continuous batching: the request lifecycle both in-process engines share (embedded/ on torch, jax/ on JAX).

One worker thread owns the model. Callers (generate(), the HTTP server's handlers) submit requests to a
waiting queue and get a callback when each finishes. Each worker iteration admits waiting requests into free
cache slots (lowest slot first, so the active rows stay packed at the front), prefills them, then decodes one
token for every active slot. A finished sequence frees its slot at once, so the next waiting request joins the
running batch on the following iteration. Finishing (stop tokens, stop strings, max_new_tokens, the context),
abort, pause/resume, a failed step, releasing the KV cache and the staged multi-bucket weight update are here.

An engine supplies the model through hooks: `_new_sequence` (its per-request sampling state), `_prefill` and
`_decode` (a forward pass and sampling: one token and its log-prob per sequence), the KV cache hooks
(`_kv_cache_allocated`, `_free_kv_cache`, `_allocate_kv_cache`) and the weight hooks (`_check_bucket`,
`_staged_copy`, `_prepare_weights`, `_install_weights`).

Locks: `_model_lock` is held for a step and for installing weights, so weights only change between steps;
`_cond` guards the queues and the slot table; `_update_lock` makes weight updates one at a time.
Order: _update_lock before _model_lock before _cond.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from slime.rollout.engines.base import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    IndexedResultCallback,
    ResultCallback,
    SamplingParams,
    ServableEngine,
    WeightUpdateError,
    wants_kv_cache,
)

logger = logging.getLogger(__name__)

# An idle engine that receives a request waits this long for the next one before its first step (a rollout's
# requests arrive over HTTP as a burst, ~0.1 ms apart), and at most ADMISSION_WAIT_MAX_S in all: at the
# quickstart's shape 32 requests of 16 then share one prefill instead of spreading over several iterations.
ADMISSION_GAP_S = 0.002
ADMISSION_WAIT_MAX_S = 0.02

Finished = list[tuple["BatchedSequence", GenerateResult]]


@dataclass(eq=False)
class BatchedSequence:
    """One request from submission to its result. Engines subclass it to add their sampling state."""

    request: GenerateRequest
    prompt: list[int]
    callback: ResultCallback
    stop_ids: frozenset[int]  # stop_token_ids, plus the model's EOS unless ignore_eos
    slot: int = -1  # the KV cache row it decodes in; -1 while waiting and once finished
    matched_stop: int | str | None = None
    output_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the weight version each output token was sampled under

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling_params

    @property
    def next_position(self) -> int:
        """Position of the last sampled token, which the next decode step feeds."""
        return len(self.prompt) + len(self.output_ids) - 1


def find_stop_string(text: str, stops: tuple[str, ...], search_from: int = 0) -> str | None:
    """The first stop string that occurs in text[search_from:], or None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, search_from)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return None if best is None else best[1]


class ContinuousBatchingEngine(ServableEngine):
    """The request lifecycle over a fixed table of `max_batch_size` KV cache slots; see the module docstring.

    A subclass calls `super().__init__` first, builds its model, then `_start_worker()`.
    """

    rid_prefix: str = "engine"  # new_rid() answers f"{rid_prefix}-{n}"; the worker thread is f"{rid_prefix}-engine"
    # Whether sequences prefilled in an iteration also decode in it. The JAX engine does (its tokens depend only on
    # each request's seed); the embedded one does not, and its unseeded requests draw from one engine-wide generator,
    # so changing this would change their tokens.
    decodes_after_prefill: bool = False
    eos_token_ids: tuple[int, ...] | list[int] = ()

    def __init__(self, max_batch_size: int, max_seq_len: int):
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(
                f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size} and {max_seq_len}"
            )
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self._weight_version = 0
        self._refill_pending = False  # a weight update landed under running requests (_refill)
        self._pending_update: dict[str, Any] = {}
        self._pending_version = 0
        self._update_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[BatchedSequence] = deque()
        self._slots: list[BatchedSequence | None] = [None] * max_batch_size
        self._free_slots = list(range(max_batch_size))
        self._paused = False
        self._stopping = False
        self._rid_counter = itertools.count()
        self._worker = threading.Thread(target=self._run, name=f"{self.rid_prefix}-engine", daemon=True)

    def _start_worker(self) -> None:
        self._worker.start()

    # ---- the model's hooks ---------------------------------------------------------------------------
    @abstractmethod
    def _new_sequence(
        self, request: GenerateRequest, prompt: list[int], callback: ResultCallback, stop_ids: frozenset[int]
    ) -> BatchedSequence:
        """The sequence for a valid request, with the engine's sampling state. Called under `_cond`, in submission
        order, so state drawn from an engine-wide source is drawn in that order."""

    @abstractmethod
    def _prefill(self, seqs: list[BatchedSequence]) -> tuple[list[int], list[float]]:
        """Write the prompts of newly admitted sequences into their slots and sample each one's first token:
        the tokens and their log-probs, in the order of `seqs`."""

    @abstractmethod
    def _decode(self, running: list[BatchedSequence]) -> tuple[list[int], list[float]]:
        """Feed each running sequence's last token at `next_position` and sample its next one, in order."""

    # An engine whose cache can be rebuilt sets this: after a weight update that lands while requests run, their
    # cache is computed again under the new weights (_refill) before the next decode step, so every token sampled
    # after the update comes from the new weights alone (SGLang's retract-and-continue). Otherwise the tokens
    # after the update attend over cache entries of the old weights (SGLang's in_place).
    refills_after_update = False

    def _refill(self, running: list[BatchedSequence]) -> None:
        """Recompute the running sequences' cache under the current weights (prompt and every output token but
        the last, which the next decode step feeds)."""

    def _after_failed_step(self) -> None:
        """Repair what a failed step left broken (under `_model_lock`); the running sequences then fail."""

    @abstractmethod
    def _kv_cache_allocated(self) -> bool: ...

    @abstractmethod
    def _free_kv_cache(self) -> None: ...

    @abstractmethod
    def _allocate_kv_cache(self) -> None: ...

    @abstractmethod
    def _check_bucket(self, named_tensors: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """The bucket with every name and shape checked (WeightUpdateError otherwise), ready to stage."""

    def _staged_copy(self, value: Any) -> Any:
        """What is kept of a checked tensor until the update finishes (the caller may reuse its buffer)."""
        return value

    def _prepare_weights(self, named: list[tuple[str, Any]]) -> Any:
        """Work done before the model lock is taken (e.g. moving tensors to the device), so steps go on meanwhile."""
        return named

    @abstractmethod
    def _install_weights(self, prepared: Any) -> None:
        """Make the prepared weights the serving ones; runs under `_model_lock`, between two steps."""

    def _routed_experts(self, seq: BatchedSequence) -> list[int] | None:
        """GenerateResult.routed_experts of a finished sequence (MoE engines that record routes), in SGLang's
        layout: int32 [len(tokens) - 1, num_hidden_layers, top_k] flattened, zeros in the dense layers."""
        return None

    # ---- submission ----------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, callback: ResultCallback) -> None:
        """Queue one request; `callback(result)` runs on the worker thread (or here, for invalid requests)."""
        self.submit_all([request], lambda _, result: callback(result))

    def submit_all(self, requests: list[GenerateRequest], callback: IndexedResultCallback) -> None:
        """Queue requests under one lock with one wake-up of the worker (not one per request: each wake-up
        contends with the submitting thread for the interpreter while a burst of requests is read)."""
        sequences = []
        for i, request in enumerate(requests):
            seq = self._sequence_or_answer(request, lambda result, i=i: callback(i, result))
            if seq is not None:
                sequences.append(seq)
        if not sequences:
            return
        with self._cond:
            if self._stopping:
                raise EngineError("the engine was shut down")
            self._waiting.extend(sequences)
            self._cond.notify_all()

    def _sequence_or_answer(self, request: GenerateRequest, callback: ResultCallback) -> BatchedSequence | None:
        """The request's sequence, or None once `callback` has been answered (invalid, or nothing to generate)."""
        prompt = [int(t) for t in request.input_ids]
        problem = self.request_problem(request, prompt)
        if problem is not None:
            callback(self._result(request, [], [], "error", error=problem, prompt_tokens=len(prompt)))
            return None
        params = request.sampling_params
        if params.max_new_tokens == 0:
            callback(self._result(request, [], [], "length", prompt_tokens=len(prompt)))
            return None
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        return self._new_sequence(request, prompt, callback, frozenset(stop_ids))

    def new_rid(self) -> str:
        return f"{self.rid_prefix}-{next(self._rid_counter)}"

    # ---- worker --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work_locked():
                    self._cond.wait()
                self._gather_burst_locked()
                if self._stopping:
                    return
            finished: Finished = []
            try:
                with self._model_lock:
                    self._step(finished)
            except Exception as error:  # a bug or device failure: fail what is running, keep the thread alive
                logger.exception("%s step failed", self.engine_name)
                finished += self._fail_all(f"engine step failed: {type(error).__name__}: {error}")
            for seq, result in finished:  # those that finished before a failure still get their result
                seq.callback(result)

    def _gather_burst_locked(self) -> None:
        """Idle until now: wait while requests keep arriving (a rollout's come as a burst of HTTP requests), so
        they share one prefill instead of trickling into several iterations. Waits ADMISSION_GAP_S after each
        arrival, ADMISSION_WAIT_MAX_S at most; never while sequences are running (their decode goes on)."""
        if any(s is not None for s in self._slots):
            return
        deadline = time.monotonic() + ADMISSION_WAIT_MAX_S
        while not self._stopping and self._waiting and len(self._waiting) < len(self._free_slots):
            arrived = len(self._waiting)
            self._cond.wait(ADMISSION_GAP_S)
            if len(self._waiting) == arrived or time.monotonic() >= deadline:
                return

    def _has_work_locked(self) -> bool:
        if self._paused or not self._kv_cache_allocated():
            return False
        return bool(self._waiting) or any(s is not None for s in self._slots)

    def _step(self, finished: Finished) -> None:
        """One iteration: admit, prefill, decode; sequences that finish are appended to `finished` as they do."""
        with self._cond:
            if not self._has_work_locked():
                return
            admitted = []
            while self._waiting and self._free_slots:
                seq = self._waiting.popleft()
                seq.slot = heapq.heappop(self._free_slots)
                self._slots[seq.slot] = seq
                admitted.append(seq)
        if self._refill_pending:
            self._refill_pending = False
            self._refill([s for s in self._slots if s is not None and s not in admitted])
        if admitted:
            self._append(admitted, *self._prefill(admitted), finished)
        running = [s for s in self._slots if s is not None and (self.decodes_after_prefill or s not in admitted)]
        if running:
            self._append(running, *self._decode(running), finished)

    def _append(self, seqs: list[BatchedSequence], ids: list[int], log_probs: list[float], finished: Finished) -> None:
        for seq, token, log_prob in zip(seqs, ids, log_probs):
            seq.output_ids.append(token)
            seq.log_probs.append(log_prob)
            seq.versions.append(self._weight_version)  # steps run under _model_lock: weights are this version
            reason = self._finish_reason(seq, token)
            if reason is not None:
                finished.append((seq, self._release(seq, reason)))

    def _finish_reason(self, seq: BatchedSequence, token: int) -> str | None:
        if token in seq.stop_ids:
            seq.matched_stop = token
            return "stop"
        if seq.params.stop:
            assert self.tokenizer is not None  # checked at submission
            matched = find_stop_string(self.tokenizer.decode(seq.output_ids), seq.params.stop)
            if matched is not None:
                seq.matched_stop = matched
                return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            return "length"
        if len(seq.prompt) + len(seq.output_ids) >= self.max_seq_len:
            return "length"
        return None

    def _release(self, seq: BatchedSequence, reason: str, error: str | None = None) -> GenerateResult:
        """Free the sequence's slot and build its result. Caller holds _model_lock (slot reuse is safe)."""
        with self._cond:
            if seq.slot >= 0 and self._slots[seq.slot] is seq:
                self._slots[seq.slot] = None
                heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1
        return self._result(
            seq.request,
            seq.output_ids,
            seq.log_probs,
            reason,
            error=error,
            prompt_tokens=len(seq.prompt),
            matched=seq.matched_stop,
            routed=self._routed_experts(seq),
            versions=seq.versions,
        )

    def _result(
        self,
        request,
        output_ids,
        log_probs,
        reason,
        error=None,
        prompt_tokens=0,
        matched=None,
        routed=None,
        versions=(),
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
            routed_experts=routed,
            output_weight_versions=list(versions),
        )

    def _fail_all(self, message: str) -> Finished:
        with self._model_lock:
            self._after_failed_step()
            active = [s for s in self._slots if s is not None]
            return [(s, self._release(s, "error", error=message)) for s in active]

    # ---- control -------------------------------------------------------------------------------------
    def pause(self) -> None:
        with self._cond:
            self._paused = True
        # Return only once the current step is over, so the caller sees a quiescent engine.
        with self._model_lock:
            pass

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

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

    def num_waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def release_memory(self, tags: list[str] | None = None) -> None:
        # The weights stay: the next update is written into them, and the KV cache is what the trainer needs back.
        if not wants_kv_cache(tags):
            return
        with self._model_lock:
            running = self.num_running()
            if running:
                raise EngineError(
                    f"release_memory needs an idle engine, but {running} request(s) are running; abort them first"
                )
            self._free_kv_cache()

    def resume_memory(self, tags: list[str] | None = None) -> None:
        if not wants_kv_cache(tags):
            return
        with self._model_lock:
            if not self._kv_cache_allocated():
                self._allocate_kv_cache()
        with self._cond:
            self._cond.notify_all()

    @property
    def weight_version(self) -> int:
        return self._weight_version

    # ---- weights -------------------------------------------------------------------------------------
    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, Any]], version: int, finish: bool = True
    ) -> None:
        with self._update_lock:
            try:
                checked = self._check_bucket(named_tensors)
            except WeightUpdateError:
                self._pending_update.clear()  # the whole multi-bucket update is void
                raise
            if finish and not self._pending_update:
                # A whole update in one bucket: checked already, so it goes straight in (no staged copy).
                self._set_weights(checked, version)
                return
            for name, value in checked:
                # Staged: the caller may reuse its buffers, and nothing is applied before `finish`.
                self._pending_update[name] = self._staged_copy(value)
            self._pending_version = version
        if finish:
            self.commit_pending_update()

    def commit_pending_update(self) -> bool:
        """Apply the buckets staged so far as one update (their version); False when nothing was staged."""
        with self._update_lock:
            if not self._pending_update:
                return False
            staged, self._pending_update = list(self._pending_update.items()), {}
            self._set_weights(staged, self._pending_version)
            return True

    def _set_weights(self, named: list[tuple[str, Any]], version: int) -> None:
        """Install checked weights between two steps and set the version results report from now on."""
        prepared = self._prepare_weights(named)
        with self._model_lock:
            self._install_weights(prepared)
            self._weight_version = int(version)
            self._refill_pending = self.refills_after_update and self.num_running() > 0

    def discard_pending_update(self) -> None:
        """Drop the buckets staged so far (an update that cannot finish); the serving weights are untouched."""
        with self._update_lock:
            self._pending_update.clear()

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
