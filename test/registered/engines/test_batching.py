"""The shared continuous-batching lifecycle (rollout/engines/batching.py) over a counting model: admission into
the lowest free slots, finishing on stop tokens, stop strings, lengths and the context, a failed step (results
that finished before it still arrive; the engine keeps serving), whether prefilled rows decode in the same
iteration, staged multi-bucket weight updates, and shutdown. The real engines run the same code in
test_embedded_engine.py and test_jax_engine.py."""

import threading

import pytest

from slime.rollout.engines.base import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    WeightUpdateError,
)
from slime.rollout.engines.batching import BatchedSequence, ContinuousBatchingEngine
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=5, suite="base-a-test-cpu")

EOS = 0
FAIL_TOKEN = 99  # a decode over a sequence whose prompt holds it raises, as a device failure would


class LetterTokenizer:
    """Token t is the letter chr(ord('a') + t % 26)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)


class CountingEngine(ContinuousBatchingEngine):
    """Each sampled token is the previous one + 1 (the prompt's last, at prefill) with log-prob -weights['w'].
    `calls` records (iteration, kind, rids, slots) for every forward. A decode that brings a sequence to `stall_at`
    tokens pauses the engine after it, as a caller's pause() would, and sets `stalled`."""

    rid_prefix = "counting"

    def __init__(self, max_batch_size=2, max_seq_len=32, decodes_after_prefill=False):
        super().__init__(max_batch_size, max_seq_len)
        self.decodes_after_prefill = decodes_after_prefill
        self.model_path, self.model_type, self.vocab_size = "counting", "counting", 100
        self.tokenizer = LetterTokenizer()
        self.eos_token_ids = (EOS,)
        self.weights = {"w": 1.0, "v": 2.0}
        self.cache = True
        self.iteration = 0
        self.calls: list[tuple[int, str, list[str], list[int]]] = []
        self.repairs = 0
        self.stall_at: int | None = None
        self.stalled = threading.Event()
        self._start_worker()

    def _new_sequence(self, request, prompt, callback, stop_ids):
        return BatchedSequence(request, prompt, callback, stop_ids)

    def _step(self, finished):
        self.iteration += 1
        super()._step(finished)

    def _record(self, kind, seqs):
        self.calls.append((self.iteration, kind, [s.request.rid for s in seqs], [s.slot for s in seqs]))

    def _prefill(self, seqs):
        self._record("prefill", seqs)
        return [(s.prompt[-1] + 1) % 100 for s in seqs], [-self.weights["w"]] * len(seqs)

    def _decode(self, running):
        self._record("decode", running)
        if any(FAIL_TOKEN in s.prompt for s in running):
            raise RuntimeError("device lost")
        if any(len(s.output_ids) + 1 == self.stall_at for s in running):
            with self._cond:
                self._paused = True
            self.stalled.set()
        return [(s.output_ids[-1] + 1) % 100 for s in running], [-self.weights["w"]] * len(running)

    def _after_failed_step(self):
        self.repairs += 1

    def _kv_cache_allocated(self):
        return self.cache

    def _free_kv_cache(self):
        self.cache = False

    def _allocate_kv_cache(self):
        self.cache = True

    def _check_bucket(self, named_tensors):
        checked = list(named_tensors)
        for name, _ in checked:
            if name not in self.weights:
                raise WeightUpdateError(f"unknown tensor name {name!r}")
        return checked

    def _install_weights(self, prepared):
        self.weights.update(prepared)

    def update_weights_from_disk(self, path, version):
        raise WeightUpdateError("no disk here")


@pytest.fixture
def engine():
    with CountingEngine() as engine:
        yield engine


def params(n, **kw):
    return SamplingParams(temperature=0.0, max_new_tokens=n, **kw)


def submit_all(engine, requests) -> tuple[dict[str, GenerateResult], threading.Event]:
    results: dict[str, GenerateResult] = {}
    done = threading.Event()

    def keep(result):
        results[result.rid] = result
        if len(results) == len(requests):
            done.set()

    for request in requests:
        engine.submit(request, keep)
    return results, done


def test_more_requests_than_slots_take_the_lowest_free_slots_in_order(engine):
    engine.pause()  # all five wait before the first iteration
    by_rid, done = submit_all(engine, [GenerateRequest(f"r{i}", [10 * i + 1], params(3)) for i in range(5)])
    engine.resume()
    assert done.wait(10)
    results = [by_rid[f"r{i}"] for i in range(5)]
    assert [r.output_ids for r in results] == [[10 * i + 2, 10 * i + 3, 10 * i + 4] for i in range(5)]
    assert all(r.finish_reason == "length" and r.output_log_probs == [-1.0] * 3 for r in results)
    prefills = [(rids, slots) for _, kind, rids, slots in engine.calls if kind == "prefill"]
    assert prefills == [(["r0", "r1"], [0, 1]), (["r2", "r3"], [0, 1]), (["r4"], [0])]
    assert engine.num_running() == 0 and engine.num_waiting() == 0
    assert engine.new_rid() == "counting-0" and engine.new_rid() == "counting-1"


def test_finish_reasons(engine):
    stop_token, stop_string, eos, context, zero, bad = engine.generate(
        [
            GenerateRequest("tok", [1], params(10, stop_token_ids=[4])),
            GenerateRequest("str", [1], params(10, stop=["de"])),  # tokens 2, 3, 4 read "cde"
            GenerateRequest("eos", [97], params(10)),  # 98, 99, then 0 (EOS)
            GenerateRequest("ctx", list(range(1, 30)), params(10, ignore_eos=True)),
            GenerateRequest("zero", [1], params(0)),
            GenerateRequest("bad", [1], params(5, top_p=0.0)),
        ]
    )
    assert (stop_token.output_ids, stop_token.finish_reason, stop_token.matched_stop) == ([2, 3, 4], "stop", 4)
    assert (stop_string.output_ids, stop_string.matched_stop, stop_string.text) == ([2, 3, 4], "de", "cde")
    assert (eos.output_ids, eos.finish_reason, eos.matched_stop) == ([98, 99, 0], "stop", 0)
    assert (context.finish_reason, len(context.output_ids), context.prompt_tokens) == ("length", 3, 29)
    assert (zero.finish_reason, zero.output_ids) == ("length", [])
    assert bad.finish_reason == "error" and "top_p" in bad.error


def test_a_failed_step_fails_the_running_and_keeps_those_that_finished_before_it():
    with CountingEngine(decodes_after_prefill=True) as engine:  # prefill and the failing decode in one iteration
        engine.pause()
        results, done = submit_all(
            engine,
            [
                GenerateRequest("doomed", [FAIL_TOKEN], params(5, ignore_eos=True)),
                GenerateRequest("quick", [1], params(1)),
            ],
        )
        engine.resume()
        assert done.wait(10), f"a result was lost: got {sorted(results)}"
        # One iteration: both prefilled, "quick" finished there, then the decode of "doomed" raised.
        assert results["quick"].finish_reason == "length" and results["quick"].output_ids == [2]
        assert results["doomed"].finish_reason == "error" and "RuntimeError: device lost" in results["doomed"].error
        assert results["doomed"].output_ids == [0] and engine.repairs == 1
        assert engine.health() and engine.num_running() == 0
        assert engine.generate([GenerateRequest("after", [5], params(2))])[0].output_ids == [6, 7]


@pytest.mark.parametrize("decodes_after_prefill", [False, True])
def test_whether_prefilled_rows_decode_in_the_same_iteration(decodes_after_prefill):
    with CountingEngine(decodes_after_prefill=decodes_after_prefill) as engine:
        assert engine.generate([GenerateRequest("r", [1], params(3))])[0].output_ids == [2, 3, 4]
        kinds = [(iteration, kind) for iteration, kind, _, _ in engine.calls]
    if decodes_after_prefill:
        assert kinds == [(1, "prefill"), (1, "decode"), (2, "decode")]
    else:
        assert kinds == [(1, "prefill"), (2, "decode"), (3, "decode")]


def test_buckets_are_staged_until_finish_and_a_rejected_one_voids_the_update(engine):
    engine.update_weights_from_tensors([("w", 3.0)], version=1, finish=False)
    assert engine.weights["w"] == 1.0 and engine.weight_version == 0  # staged only
    with pytest.raises(WeightUpdateError, match="unknown tensor name 'nope'"):
        engine.update_weights_from_tensors([("nope", 0.0)], version=1, finish=False)
    engine.update_weights_from_tensors([("v", 5.0)], version=2, finish=True)
    assert engine.weights == {"w": 1.0, "v": 5.0}  # the first bucket went with the rejected update
    engine.update_weights_from_tensors([("w", 4.0)], version=3, finish=False)
    engine.discard_pending_update()
    engine.update_weights_from_tensors([("w", 2.0)], version=4, finish=False)
    engine.update_weights_from_tensors([("v", 6.0)], version=4, finish=True)
    assert engine.weights == {"w": 2.0, "v": 6.0} and engine.weight_version == 4
    result = engine.generate([GenerateRequest("r", [1], params(1))])[0]
    assert result.weight_version == 4 and result.output_log_probs == [-2.0]


def test_memory_release_waits_for_idle_and_requests_wait_for_memory(engine):
    engine.stall_at = 3
    results, _ = submit_all(engine, [GenerateRequest("held", [1], params(20))])
    assert engine.stalled.wait(10)
    engine.pause()
    with pytest.raises(EngineError, match="needs an idle engine, but 1 request"):
        engine.release_memory()
    engine.abort("held")
    assert results["held"].finish_reason == "abort" and results["held"].error == "aborted"
    assert results["held"].output_ids == [2, 3, 4]  # the output so far is kept
    engine.release_memory(["weights"])  # the weights stay: nothing to do
    assert engine.cache
    engine.release_memory()
    engine.resume()
    results, done = submit_all(engine, [GenerateRequest("later", [1], params(2))])
    assert not done.wait(0.2) and engine.num_waiting() == 1
    engine.resume_memory()
    assert done.wait(10) and results["later"].output_ids == [2, 3]


def test_shutdown_aborts_waiting_requests_and_refuses_new_ones():
    engine = CountingEngine()
    engine.pause()
    results, done = submit_all(engine, [GenerateRequest("w", [1], params(5))])
    engine.shutdown()
    assert done.is_set() and results["w"].finish_reason == "abort" and results["w"].output_ids == []
    assert not engine.health()
    with pytest.raises(EngineError, match="shut down"):
        engine.submit(GenerateRequest("late", [1], params(1)), lambda r: None)
    engine.shutdown()  # idempotent
