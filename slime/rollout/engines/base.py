"""The rollout-engine contract: what the RL loop asks of every engine (embedded, SGLang, sglang-jax).

Log-probabilities (`GenerateResult.output_log_probs`, SGLang's `meta_info.output_token_logprobs`):
    log p(token) under softmax(logits / temperature) over the FULL vocabulary, i.e. after temperature
    scaling and BEFORE top-k / top-p / min-p truncation. Greedy requests (temperature 0) use
    temperature 1, so their log-probs are log_softmax(logits). This is SGLang's default convention
    (its sampler returns log(softmax(logits / T)) and samples from the truncated copy), and it is what the
    trainer computes (log_softmax(logits / T)), so rollout and trainer log-probs agree at step 0.

Weight updates from tensors are bucketed, inside a begin/end pair:
    engine.begin_weight_update()                                           # no forward pass runs from here
    engine.update_weights_from_tensors(bucket_1, version=7, finish=False)
    engine.update_weights_from_tensors(bucket_2, version=7, finish=False)
    engine.update_weights_from_tensors(bucket_3, version=7, finish=True)   # publishes version 7
    engine.end_weight_update()                                             # generation continues
begin/end are SGLang's pause_generation(mode="retract"), then /flush_cache (only after a complete update, and
only as its own call: SGLang refuses a flush while requests wait) and continue_generation, which always
follows a pause. Requests in flight are kept and re-prefilled with the new weights. (The embedded engine copies
weights between decode steps anyway; for it begin/end are pause/resume.)
Each bucket is validated when it arrives (unknown name, wrong shape -> WeightUpdateError naming the
tensor and both shapes); a rejected bucket discards the whole pending update. `finish=True` ends the
update and sets `weight_version`; engines that can (the embedded one) apply all buckets at once at that
point, so a rejected update never leaves a half-updated model. SGLang applies each bucket as it arrives.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")


MEMORY_TAGS = ("weights", "kv_cache")  # what release_memory/resume_memory can name, as in SGLang


def wants_kv_cache(tags: list[str] | None) -> bool:
    """Whether a release/resume with these tags covers the KV cache; unknown tags are an EngineError."""
    if tags is None:
        return True
    if not isinstance(tags, list) or any(t not in MEMORY_TAGS for t in tags):
        raise EngineError(f"memory tags must be a list drawn from {list(MEMORY_TAGS)}, got {tags!r}")
    return "kv_cache" in tags


class EngineError(RuntimeError):
    """A one-line, user-facing failure of an engine call (bad request, server gone, ...)."""


class EngineUnavailable(ConnectionError):
    """The engine could not be reached (died, restarting). The request is safe to retry elsewhere/later."""


class RequestRejected(ValueError):
    """The engine answered a request with a 4xx status: the request is at fault, not the engine."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # survives pickling through Ray with its status
        return type(self), (str(self), self.status)


class WeightUpdateError(EngineError):
    """A weight update was rejected; the engine keeps the weights it had and keeps serving."""


@dataclass(frozen=True)
class SamplingParams:
    """SGLang's sampling parameters (the subset RL needs), with SGLang's defaults and meanings.

    temperature 0 = greedy. top_k -1 (or 0) = no top-k. max_new_tokens counts generated tokens.
    stop_token_ids and the model's EOS end a sequence (unless ignore_eos); the stop token is part of the
    output. `stop` strings end a sequence once the decoded output contains one (needs a tokenizer).
    seed makes this request's sampling reproducible, independent of what else is in the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so the dataclass stays hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)

    def validate(self) -> None:
        """Raise ValueError naming the field and the value when a parameter is out of range."""
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"sampling_params.temperature must be a number >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"sampling_params.top_k must be an integer >= -1 (-1 = off), got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"sampling_params.min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 0:
            raise ValueError(f"sampling_params.max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"sampling_params.stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"sampling_params.stop must be non-empty strings, got {list(self.stop)}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"sampling_params.seed must be an integer, got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class GenerateRequest:
    rid: str
    input_ids: tuple[int, ...] | list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    return_logprob: bool = True
    return_routed_experts: bool = False  # MoE: the experts every token was routed to (SGLang's request field)


@dataclass(frozen=True)
class GenerateResult:
    """What came back for one request.

    finish_reason: "stop" (EOS, a stop token or a stop string), "length" (max_new_tokens or the context
    length), "abort" (abort() or shutdown; output so far is kept), "error" (the request itself was invalid,
    `error` says why; other requests are unaffected).
    weight_version: the engine's weight version when the request finished.
    """

    rid: str
    output_ids: list[int]
    output_log_probs: list[float] | None
    finish_reason: FinishReason
    error: str | None = None
    weight_version: int = 0
    prompt_tokens: int = 0
    text: str | None = None
    matched_stop: int | str | None = None  # the stop token id or stop string that ended a "stop" finish
    # MoE, when asked: expert ids of every token the model ran on (prompt + output but the last token), each
    # of the num_hidden_layers layers (0 in a dense one), each top-k slot, flattened in that order: SGLang's
    # int32 [len(tokens) - 1, num_hidden_layers, top_k] (meta_info["routed_experts"], decoded)
    routed_experts: list[int] | None = None
    # the weight version each output token was sampled under (an update between two decode steps changes it
    # mid-request); None from engines that report only the version at the finish (SGLang's weight_version)
    output_weight_versions: list[int] | None = None


class RolloutEngine(ABC):
    """The interface the RL loop drives. All methods are synchronous and thread-safe."""

    @abstractmethod
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Run all requests (batched together) and return one result per request, in order."""

    @abstractmethod
    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, finish: bool = True
    ) -> None:
        """One bucket of HF-named tensors; see the module docstring for the bucket protocol."""

    @abstractmethod
    def update_weights_from_disk(self, path: str, version: int) -> None:
        """Load an HF checkpoint folder (same architecture) in place and set the weight version."""

    def begin_weight_update(self) -> None:
        """Stop forward passes before the buckets of an update arrive (see the module docstring)."""
        self.pause()

    def end_weight_update(self) -> bool:
        """Resume generation after the final bucket; returns whether caches built with the old weights were
        dropped (engines without a prefix cache have none to keep)."""
        self.resume()
        return True

    @abstractmethod
    def pause(self) -> None:
        """Stop scheduling: running requests keep their state and continue after resume()."""

    @abstractmethod
    def resume(self) -> None:
        """Undo pause()."""

    @abstractmethod
    def abort(self, rid: str | None = None) -> None:
        """Finish one request (or all, rid=None) now with finish_reason "abort", keeping its output so far."""

    @abstractmethod
    def health(self) -> bool:
        """True when the engine can serve a request now."""

    @abstractmethod
    def release_memory(self, tags: list[str] | None = None) -> None:
        """Colocate: give back the memory the engine holds, for the tags given (MEMORY_TAGS; None = all of them);
        generation must be idle. As in SGLang, "weights" can come back alone to receive a weight update before
        "kv_cache" does, so the trainer's memory and the engine's KV cache are never held at once."""

    @abstractmethod
    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Undo release_memory() for the tags given (None = all)."""

    @property
    @abstractmethod
    def weight_version(self) -> int:
        """Version of the weights now serving (0 = the checkpoint it started from)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Abort what is running and free the engine's resources. Idempotent."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


ResultCallback = Callable[[GenerateResult], None]
IndexedResultCallback = Callable[[int, GenerateResult], None]  # (index of the request in its batch, result)


class Tokenizer(Protocol):
    """What engines and the HTTP server need of a tokenizer: text prompts and stop strings."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class ServableEngine(RolloutEngine):
    """An in-process engine that the SGLang-compatible HTTP server (embedded/server.py) can sit in front of.

    The server needs a non-blocking submit (each HTTP request awaits its own callback, so hundreds of them fill
    one batch), request ids for requests that come without one, the checkpoint's tokenizer (text prompts, stop
    strings; None when the folder has none), and the few facts /get_model_info reports. `generate` is built on
    `submit` here, so an engine implements scheduling once.
    """

    model_path: str
    model_type: str
    max_batch_size: int
    max_seq_len: int
    vocab_size: int
    tokenizer: Tokenizer | None
    engine_name: str = "slime"  # reported by /get_server_info
    # /get_server_info's enable_return_routed_experts (SGLang's flag): whether return_routed_experts is answered
    returns_routed_experts: bool = False

    @abstractmethod
    def submit(self, request: GenerateRequest, callback: ResultCallback) -> None:
        """Queue one request; `callback(result)` runs once, on the engine's thread (or the caller's, for a
        request rejected at once). Raises EngineError after shutdown."""

    def submit_all(self, requests: list[GenerateRequest], callback: IndexedResultCallback) -> None:
        """Queue several requests (one HTTP request's batch); `callback(i, result)` once per request, as for
        `submit`. Engines that can queue them together (one lock, one wake-up) override this."""
        for i, request in enumerate(requests):
            self.submit(request, lambda result, i=i: callback(i, result))

    @abstractmethod
    def new_rid(self) -> str:
        """A request id unique within this engine."""

    def flush_cache(self) -> None:
        """Drop cached prefixes (engines without a prefix cache have nothing to do)."""

    def request_problem(self, request: GenerateRequest, prompt: list[int]) -> str | None:
        """Why this engine cannot serve `request` (one line, answered as the request's error), or None."""
        try:
            request.sampling_params.validate()
        except ValueError as e:
            return str(e)
        if not prompt:
            return "input_ids is empty"
        if len(prompt) >= self.max_seq_len:
            return (
                f"the prompt ({len(prompt)} tokens) is longer than the engine's context "
                f"(max_seq_len {self.max_seq_len}, which must leave room for at least one new token)"
            )
        bad = [t for t in prompt if t < 0 or t >= self.vocab_size]
        if bad:
            return f"input_ids contains token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
        if request.sampling_params.stop and self.tokenizer is None:
            return f"sampling_params.stop needs a tokenizer, and {self.model_path} has none (use stop_token_ids)"
        return None

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        if not requests:
            return []
        results: list[GenerateResult | None] = [None] * len(requests)
        remaining = [len(requests)]
        done = threading.Event()
        lock = threading.Lock()

        def on_result(index: int, result: GenerateResult) -> None:
            results[index] = result
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        self.submit_all(requests, on_result)
        done.wait()
        return [r for r in results if r is not None]
