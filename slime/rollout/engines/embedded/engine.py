"""The embedded engine: an in-process, continuously batching generator over a static KV cache.

One worker thread owns the model. Callers (generate(), the HTTP server's handlers) submit requests to a
waiting queue and get a callback when each finishes. Each worker iteration admits waiting requests into
free cache slots (lowest slot first, so the active rows stay packed at the front), prefills them in one
padded batch, then decodes one token for every active slot. A finished sequence frees its slot at once,
so the next waiting request joins the running batch on the following iteration (continuous batching).

Locks: `_model_lock` is held for a prefill or decode step and for weight copies, so weights only change
between steps; `_cond` guards the queues and slot table. Order: _model_lock before _cond.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

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
from slime.rollout.engines.embedded.model import DecoderSpec, ServingModel
from slime.rollout.engines.embedded.sampling import BatchSampling, find_stop_string, sample_tokens
from slime.rollout.engines.embedded.weights import (
    copy_into_model,
    load_checkpoint_into,
    missing_names,
    read_checkpoint_tensors,
    validate_named_tensors,
)

logger = logging.getLogger(__name__)

# Upper bound on prompt tokens (padded) in one prefill batch; bounds activation memory for long prompts.
PREFILL_TOKEN_BUDGET = 16384


@dataclass
class _Routes:
    tensor: torch.Tensor | None = None  # [rows, moe layers, k] of one forward


@dataclass(eq=False)
class _Sequence:
    request: GenerateRequest
    prompt: list[int]
    params: SamplingParams
    callback: ResultCallback
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    serial: int  # unique per engine: identifies the sequence in caches (ids of dead objects get reused)
    slot: int = -1
    matched_stop: int | str | None = None
    output_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    routed: list[torch.Tensor] = field(default_factory=list)  # [tokens, moe layers, k] per forward, when asked

    @property
    def next_position(self) -> int:
        """Position of the last sampled token, which the next decode step feeds."""
        return len(self.prompt) + len(self.output_ids) - 1

    @property
    def uses_filter(self) -> bool:
        p = self.params
        return (p.top_k > 1) or p.top_p < 1.0 or p.min_p > 0.0


def _distinct_prompts(seqs: list[_Sequence]) -> tuple[list[_Sequence], dict[int, list[_Sequence]]]:
    """The first sequence of each distinct prompt, shortest prompts first, and by id(first) every sequence
    (first included) that has that prompt."""
    first: dict[tuple[int, ...], _Sequence] = {}
    members: dict[int, list[_Sequence]] = {}
    for seq in seqs:
        leader = first.setdefault(tuple(seq.prompt), seq)
        members.setdefault(id(leader), []).append(seq)
    return sorted(first.values(), key=lambda s: len(s.prompt)), members


def _prefill_batches(seqs: list[_Sequence]) -> list[list[_Sequence]]:
    """Consecutive runs of `seqs` (sorted by prompt length) whose padded size fits PREFILL_TOKEN_BUDGET."""
    batches: list[list[_Sequence]] = []
    for seq in seqs:  # sorted ascending, so the newest prompt is the batch's longest
        if batches and len(seq.prompt) * (len(batches[-1]) + 1) <= PREFILL_TOKEN_BUDGET:
            batches[-1].append(seq)
        else:
            batches.append([seq])
    return batches


class CheckpointTokenizer:
    """The checkpoint's tokenizer.json through the `tokenizers` library (what HF fast tokenizers wrap):
    encode adds the special tokens its post-processor defines (e.g. Llama's BOS), as HF's encode does.
    Loading it this way keeps transformers out of the server process, which halves its start time."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _load_tokenizer(path: str) -> CheckpointTokenizer | None:
    """The checkpoint's tokenizer when it ships one (needed for text prompts and stop strings), else None."""
    file = os.path.join(path, "tokenizer.json")
    return CheckpointTokenizer(file) if os.path.isfile(file) else None


class EmbeddedEngine(ServableEngine):
    """Serve an HF checkpoint (Qwen2, Qwen3, Llama) in this process on any torch device."""

    engine_name = "slime-embedded"

    def __init__(
        self,
        hf_checkpoint_dir: str,
        device: str = "cpu",
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(
                f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size} and {max_seq_len}"
            )
        self.model_path = hf_checkpoint_dir
        self.spec = DecoderSpec.from_checkpoint(hf_checkpoint_dir)
        self.model_type = self.spec.model_type
        self.model = ServingModel(self.spec, max_batch_size, max_seq_len, device, dtype)
        load_checkpoint_into(self.model, hf_checkpoint_dir)
        self.tokenizer = _load_tokenizer(hf_checkpoint_dir)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        # Sampling draws happen on the host (one number per row), whatever the model's device.
        self._generator = torch.Generator().manual_seed(seed)
        self._weight_version = 0
        self._pending_update: dict[str, torch.Tensor] = {}
        self._update_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._slots: list[_Sequence | None] = [None] * max_batch_size
        self._free_slots = list(range(max_batch_size))
        self._sampling_cache: tuple[tuple[int, ...], BatchSampling] | None = None
        self._paused = False
        self._stopping = False
        self._rid_counter = itertools.count()
        self._serials = itertools.count()
        self._worker = threading.Thread(target=self._run, name="embedded-engine", daemon=True)
        self._worker.start()

    # ---- submission ----------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, callback: ResultCallback) -> None:
        """Queue one request; `callback(result)` runs on the worker thread (or here, for invalid requests)."""
        prompt = [int(t) for t in request.input_ids]
        problem = self.request_problem(request, prompt)
        if problem is not None:
            callback(self._result(request, [], [], "error", error=problem, prompt_tokens=len(prompt)))
            return
        params = request.sampling_params
        if params.max_new_tokens == 0:
            callback(self._result(request, [], [], "length", prompt_tokens=len(prompt)))
            return
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.spec.eos_token_ids)
        generator = None
        if params.seed is not None and not params.is_greedy:
            generator = torch.Generator().manual_seed(params.seed)
        seq = _Sequence(request, prompt, params, callback, frozenset(stop_ids), generator, next(self._serials))
        with self._cond:
            if self._stopping:
                raise EngineError("the engine was shut down")
            self._waiting.append(seq)
            self._cond.notify_all()

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def new_rid(self) -> str:
        return f"embedded-{next(self._rid_counter)}"

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
                logger.exception("embedded engine step failed")
                finished = self._fail_all(f"engine step failed: {type(error).__name__}: {error}")
            for seq, result in finished:
                seq.callback(result)

    def _has_work_locked(self) -> bool:
        if self._paused or not self.model.kv_cache_allocated:
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
        running = [s for s in self._slots if s is not None and s not in admitted]
        if running:
            finished += self._decode(running)
        return finished

    def _sampling_rows(self, rows: list[_Sequence | None]) -> BatchSampling:
        """Per-row parameters; None rows (free slots inside the decoded range) are greedy dummies.

        Cached while the rows stay the same sequences (most decode steps), to keep per-step host work low.
        """
        key = tuple(s.serial if s is not None else -1 for s in rows)
        if self._sampling_cache is not None and self._sampling_cache[0] == key:
            return self._sampling_cache[1]
        params = self._build_sampling_rows(rows)
        self._sampling_cache = (key, params)
        return params

    def _build_sampling_rows(self, rows: list[_Sequence | None]) -> BatchSampling:
        params = [s.params if s is not None else None for s in rows]
        temperature = [p.temperature if p is not None else 0.0 for p in params]
        top_k = [p.top_k if p is not None else 0 for p in params]
        top_p = [p.top_p if p is not None else 1.0 for p in params]
        min_p = [p.min_p if p is not None else 0.0 for p in params]
        greedy = [p is None or p.is_greedy for p in params]
        device = self.model.device
        return BatchSampling(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            unit_temperature=all(t in (0.0, 1.0) for t in temperature),
            any_filter=any(s is not None and s.uses_filter for s in rows),
        )

    def _uniforms(self, rows: list[_Sequence | None], params: BatchSampling) -> torch.Tensor | None:
        """One U[0,1) per row: from the request's own generator when it has a seed, else the engine's."""
        if params.all_greedy:
            return None
        draws = torch.rand(len(rows), generator=self._generator, dtype=torch.float64).tolist()
        for i, seq in enumerate(rows):
            if seq is not None and seq.generator is not None:
                draws[i] = torch.rand(1, generator=seq.generator, dtype=torch.float64).item()
        return torch.tensor(draws, dtype=torch.float32, device=self.model.device)

    def _sample(self, logits: torch.Tensor, rows: list[_Sequence | None]) -> tuple[list[int], list[float]]:
        params = self._sampling_rows(rows)
        tokens, log_probs = sample_tokens(logits, params, self._uniforms(rows, params))
        return tokens.tolist(), log_probs.tolist()

    def _prefill(self, admitted: list[_Sequence]) -> list[tuple[_Sequence, GenerateResult]]:
        """Prefill each distinct prompt once (a GRPO group's samples share theirs), copy its cache into the
        other slots that hold the same prompt, then sample every row from its prompt's logits."""
        finished = []
        leaders, members = _distinct_prompts(admitted)
        for batch in _prefill_batches(leaders):
            logits, routes = self._prefill_forward(batch)
            rows, row_logits = [], []
            for i, leader in enumerate(batch):
                copies = members[id(leader)]
                self.model.copy_prompt_cache(leader.slot, [s.slot for s in copies[1:]], len(leader.prompt))
                for seq in copies:
                    if routes is not None:
                        seq.routed.append(routes[i, : len(seq.prompt)])
                rows += copies
                row_logits += [i] * len(copies)
            ids, log_probs = self._sample(logits[torch.tensor(row_logits, device=logits.device)], rows)
            finished += self._append(rows, ids, log_probs)
        return finished

    def _prefill_forward(self, group: list[_Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits at each prompt's last token [rows, V], and the routed experts [rows, width, moe layers, k]
        when asked for."""
        device = self.model.device
        width = max(len(s.prompt) for s in group)
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        for i, s in enumerate(group):
            tokens[i, : len(s.prompt)] = torch.tensor(s.prompt, dtype=torch.long)
        lengths = torch.tensor([len(s.prompt) for s in group], device=device)
        slots = torch.tensor([s.slot for s in group], device=device)
        with self._recording_routes(group) as routed:
            logits = self.model.prefill(tokens.to(device), lengths, slots)
        if routed.tensor is None:
            return logits, None
        return logits, routed.tensor.view(len(group), width, *routed.tensor.shape[1:])

    def _decode(self, running: list[_Sequence]) -> list[tuple[_Sequence, GenerateResult]]:
        num_rows = max(s.slot for s in running) + 1
        rows: list[_Sequence | None] = [None] * num_rows
        for s in running:
            rows[s.slot] = s
        tokens = [s.output_ids[-1] if s is not None else 0 for s in rows]
        positions = [s.next_position if s is not None else self.model.scratch_position for s in rows]
        attend_len = max(s.next_position for s in running) + 1
        device = self.model.device
        with self._recording_routes(running) as routed:
            logits = self.model.decode(
                torch.tensor(tokens, device=device), torch.tensor(positions, device=device), num_rows, attend_len
            )
        if routed.tensor is not None:
            for s in running:
                s.routed.append(routed.tensor[s.slot : s.slot + 1])
        ids, log_probs = self._sample(logits, rows)
        return self._append(running, [ids[s.slot] for s in running], [log_probs[s.slot] for s in running])

    @contextlib.contextmanager
    def _recording_routes(self, seqs: list[_Sequence]):
        """Yields a holder whose tensor, after the forward, is the routed experts [rows, moe layers, k] (rows as
        the forward laid them out) when a sequence asked for them and the model has MoE layers; else None."""
        holder: _Routes = _Routes()
        if not any(s.request.return_routed_experts for s in seqs) or not self.model.spec.sparse_layers:
            yield holder
            return
        self.model.routed_experts = []
        try:
            yield holder
            holder.tensor = torch.stack(self.model.routed_experts, dim=1).to(torch.int32).cpu()
        finally:
            self.model.routed_experts = None

    def _append(
        self, seqs: list[_Sequence], ids: list[int], log_probs: list[float]
    ) -> list[tuple[_Sequence, GenerateResult]]:
        finished = []
        for seq, token, log_prob in zip(seqs, ids, log_probs):
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
            assert self.tokenizer is not None  # checked at submission
            text = self.tokenizer.decode(seq.output_ids)
            matched = find_stop_string(text, seq.params.stop)
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
            seq.request,
            seq.output_ids,
            seq.log_probs,
            reason,
            error=error,
            prompt_tokens=len(seq.prompt),
            matched=seq.matched_stop,
            routed=seq.routed if seq.request.return_routed_experts else None,
        )

    def _result(
        self, request, output_ids, log_probs, reason, error=None, prompt_tokens=0, matched=None, routed=None
    ) -> GenerateResult:
        # every token fed to the model: prompt + outputs but the last (SGLang's shape: len(tokens) - 1)
        fed = len(output_ids) + prompt_tokens - 1 if output_ids else 0
        routed_flat = torch.cat(routed)[:fed].flatten().tolist() if routed else None
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
            routed_experts=routed_flat,
        )

    def _fail_all(self, message: str) -> list[tuple[_Sequence, GenerateResult]]:
        with self._model_lock:
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
        if not wants_kv_cache(tags):  # the weights stay: they are host memory the trainer does not need
            return
        with self._model_lock:
            running = self.num_running()
            if running:
                raise EngineError(
                    f"release_memory needs an idle engine, but {running} request(s) are running; abort them first"
                )
            self.model.free_kv_cache()

    def resume_memory(self, tags: list[str] | None = None) -> None:
        if not wants_kv_cache(tags):
            return
        with self._model_lock:
            if not self.model.kv_cache_allocated:
                self.model.allocate_kv_cache()
        with self._cond:
            self._cond.notify_all()

    def flush_cache(self) -> None:
        """No prefix cache to flush: each request prefills its own slot."""

    @property
    def weight_version(self) -> int:
        return self._weight_version

    # ---- weights -------------------------------------------------------------------------------------
    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, finish: bool = True
    ) -> None:
        with self._update_lock:
            try:
                checked = validate_named_tensors(self.model, list(named_tensors))
            except WeightUpdateError:
                self._pending_update.clear()  # the whole multi-bucket update is void
                raise
            if finish and not self._pending_update:
                # A whole update in one bucket: validated already, so it goes straight into the model (one copy).
                with self._model_lock:
                    copy_into_model(self.model, checked)
                    self._weight_version = int(version)
                return
            for name, tensor in checked:
                # Staged copies: the caller may reuse its buffers, and nothing is applied before `finish`.
                self._pending_update[name] = tensor.detach().to(self.model.device, self.model.dtype, copy=True)
            if finish:
                staged, self._pending_update = list(self._pending_update.items()), {}
                with self._model_lock:
                    copy_into_model(self.model, staged)
                    self._weight_version = int(version)

    def discard_pending_update(self) -> None:
        """Drop the buckets staged so far (an update that cannot finish); the serving weights are untouched."""
        with self._update_lock:
            self._pending_update.clear()

    def update_weights_from_disk(self, path: str, version: int) -> None:
        with self._update_lock:
            self._pending_update.clear()
            try:
                spec = DecoderSpec.from_checkpoint(path)
            except ValueError as e:
                raise WeightUpdateError(str(e)) from None
            if spec != self.spec:
                raise WeightUpdateError(
                    f"{path}: its config.json describes a different model than the one being served ({self.model_path})"
                )
            tensors = read_checkpoint_tensors(path)
            checked = validate_named_tensors(self.model, tensors.items())
            missing = missing_names(self.model, (n for n, _ in checked))
            if missing:
                raise WeightUpdateError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
            with self._model_lock:
                copy_into_model(self.model, checked)
                self._weight_version = int(version)

    def named_weights(self) -> dict[str, torch.Tensor]:
        """HF name -> the live tensor (a view into the fused buffers). Read-only by convention."""
        return dict(self.model.hf_views)

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
