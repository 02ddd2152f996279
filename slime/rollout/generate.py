"""Generation over SGLang's HTTP API — the same code path for SGLang, sglang-jax and the embedded engine.

A generate function (default or `--custom-generate-function-path`) has the signature

    async def generate(ctx: RolloutContext, sample: Sample, sampling_params: dict) -> Sample

It POSTs to `ctx.url + "/generate"` (or calls `ctx.post_generate`), appends what came back to the
sample with `Sample.append_response(..., trainable=True)`, and may append tool/environment tokens with
`trainable=False` (multi-turn). It sets `sample.status`.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from slime.rollout.engines.protocol import parse_generate_response, post_generate
from slime.types import Sample, SampleStatus

_FINISH_TO_STATUS = {
    "stop": SampleStatus.COMPLETED,
    "length": SampleStatus.TRUNCATED,
    "abort": SampleStatus.ABORTED,  # aborted by request (weight update, partial rollout): may be resumed
    "error": SampleStatus.FAILED,  # rejected by the engine (e.g. over the context length)
}


@dataclass
class RolloutContext:
    """What a generate function gets: the frozen config, the tokenizer, and the way to the engines."""

    config: Any
    tokenizer: Any
    urls: list[str]
    request_timeout: float = 600.0
    return_routed_experts: bool = False  # MoE: ask the engines for every token's experts (routing replay)
    weight_version: int = 0  # the newest version sent to the engines (what a request sent now starts under)
    _session: Any = None
    _round_robin: Any = None
    _semaphore: asyncio.Semaphore | None = None

    def set_urls(self, urls: list[str]) -> None:
        """Point at a new set of engines (after a restart); requests already sent keep their engine."""
        self.urls = list(urls)
        self._round_robin = None

    @property
    def url(self) -> str:
        """An engine URL (round robin across engines)."""
        if self._round_robin is None:
            self._round_robin = itertools.cycle(self.urls)
        return next(self._round_robin)

    async def session(self):
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.request_timeout)
            )
        return self._session

    def concurrency(self) -> asyncio.Semaphore:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.config.rollout.rollout_concurrency * max(1, len(self.urls)))
        return self._semaphore

    async def post_generate(self, payload: dict[str, Any], url: str | None = None) -> Any:
        """POST /generate (protocol.post_generate) with bounded concurrency, round robin unless `url` is given.
        A batched payload (lists) returns a list of outputs."""
        async with self.concurrency():
            return await post_generate(await self.session(), url or self.url, payload)

    async def abort_all(self) -> None:
        import aiohttp

        session = await self.session()
        for url in self.urls:
            try:
                async with session.post(f"{url}/abort_request", json={"rid": "", "abort_all": True}) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def sampling_params_for(config: Any, evaluation: bool = False) -> dict[str, Any]:
    r = config.rollout
    if evaluation:
        return {
            "temperature": r.eval_temperature,
            "top_p": 1.0,
            "top_k": -1,
            "max_new_tokens": r.eval_max_response_len or r.rollout_max_response_len,
            "stop": list(r.rollout_stop),
            "stop_token_ids": list(r.rollout_stop_token_ids),
        }
    return {
        "temperature": r.rollout_temperature,
        "top_p": r.rollout_top_p,
        "top_k": r.rollout_top_k,
        "max_new_tokens": r.rollout_max_response_len,
        "stop": list(r.rollout_stop),
        "stop_token_ids": list(r.rollout_stop_token_ids),
    }


def _request(sample: Sample, sampling_params: dict[str, Any]) -> tuple[str, list[int], dict[str, Any]] | None:
    """(rid, input ids, sampling params) for the rest of a sample's budget; None when nothing is left."""
    budget = sampling_params["max_new_tokens"] - sample.response_length
    if budget <= 0:
        sample.status = SampleStatus.TRUNCATED
        return None
    return f"s{sample.index}-{sample.response_length}", sample.tokens, dict(sampling_params, max_new_tokens=budget)


def _take_output(ctx: RolloutContext, sample: Sample, body: dict[str, Any], submitted_version: int) -> Sample:
    result = parse_generate_response(body, f"s{sample.index}")
    log_probs = result.output_log_probs if result.output_log_probs is not None else [0.0] * len(result.output_ids)
    sample.append_response(result.output_ids, log_probs, trainable=True, versions=_versions(result, submitted_version))
    # Decoded here rather than taken from the engine's "text": SGLang trims stop strings from its text and
    # the embedded engine does not, while the tokens (what is trained on) are the same on every engine.
    sample.response = ctx.tokenizer.decode(sample.response_tokens, skip_special_tokens=True)
    sample.status = _FINISH_TO_STATUS[result.finish_reason]
    sample.weight_version = result.weight_version
    if result.routed_experts is not None:  # covers the whole sequence so far (earlier turns included)
        sample.routed_experts = result.routed_experts
    return sample


def _versions(result, submitted_version: int) -> list[int]:
    """Each output token's weight version: the engine's own record, or (engines that report only the version at
    the finish) the version current when the request was sent for the first token and the finish's for the rest."""
    if result.output_weight_versions is not None:
        return result.output_weight_versions
    count = len(result.output_ids)
    return ([submitted_version] + [result.weight_version] * (count - 1))[:count]


def routed_experts_wanted(config) -> bool:
    """Ask the engines for routed experts: to replay them (--use-rollout-routing-replay), or, for MoE models
    under --ci-test, to count the tokens whose experts differ between engine and trainer."""
    if config.train.use_rollout_routing_replay:
        return True
    if not config.logging.ci_test:
        return False
    from slime.models import bridge_class_for, load_hf_config

    return bridge_class_for(load_hf_config(config.checkpoint.hf_checkpoint)).has_experts


def _routing_field(ctx: RolloutContext) -> dict[str, Any]:
    return {"return_routed_experts": True} if ctx.return_routed_experts else {}


async def generate(ctx: RolloutContext, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """The default: one turn, the whole remaining budget, trainable tokens."""
    request = _request(sample, sampling_params)
    if request is None:
        return sample
    rid, input_ids, params = request
    submitted = ctx.weight_version
    body = await ctx.post_generate(
        {"rid": rid, "input_ids": input_ids, "sampling_params": params, "return_logprob": True} | _routing_field(ctx)
    )
    return _take_output(ctx, sample, body, submitted)


async def generate_batch(
    ctx: RolloutContext, samples: list[Sample], sampling_params: list[dict[str, Any]]
) -> list[Sample]:
    """`generate` for several samples (a group) in one batched /generate request, as SGLang accepts: the same
    result per sample as one request each, with one HTTP round trip instead of n."""
    requests = [(s, _request(s, p)) for s, p in zip(samples, sampling_params)]
    todo = [(s, r) for s, r in requests if r is not None]
    if not todo:
        return samples
    payload = {
        "rid": [r[0] for _, r in todo],
        "input_ids": [r[1] for _, r in todo],
        "sampling_params": [r[2] for _, r in todo],
        "return_logprob": True,
    } | _routing_field(ctx)
    submitted = ctx.weight_version
    bodies = await ctx.post_generate(payload)
    if not isinstance(bodies, list) or len(bodies) != len(todo):
        raise ValueError(f"batched /generate returned {type(bodies).__name__} for {len(todo)} requests")
    for (sample, _), body in zip(todo, bodies):
        _take_output(ctx, sample, body, submitted)
    return samples
