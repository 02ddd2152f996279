"""The remote reward client against a real local HTTP server: retries with backoff, no retry on 4xx, timeouts."""

import asyncio

import pytest
from aiohttp import web

from slime.rollout.rm_hub.remote import RemoteRewardError, RemoteRewardModel
from slime.testing.ci_register import register_cpu_ci
from slime.types import Sample

register_cpu_ci(est_time=6, suite="base-b-test-cpu")


async def serve(handler):
    app = web.Application()
    app.router.add_post("/score", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/score"


def test_retries_server_errors_then_succeeds():
    calls = []

    async def handler(request):
        body = await request.json()
        calls.append(body)
        if len(calls) < 3:
            return web.Response(status=503, text="busy")
        return web.json_response({"reward": len(body["response"])})

    async def main():
        runner, url = await serve(handler)
        client = RemoteRewardModel(url, timeout=2, max_retries=4, backoff=0.01)
        try:
            return await client.score(Sample(prompt="p", response="abcd", label=1))
        finally:
            await client.close()
            await runner.cleanup()

    assert asyncio.run(main()) == 4.0
    assert len(calls) == 3 and calls[-1]["label"] == 1


def test_client_error_is_not_retried():
    calls = []

    async def handler(request):
        calls.append(1)
        return web.Response(status=422, text="label missing")

    async def main():
        runner, url = await serve(handler)
        client = RemoteRewardModel(url, timeout=2, max_retries=4, backoff=0.01)
        try:
            await client.score(Sample(response="x"))
        finally:
            await client.close()
            await runner.cleanup()

    with pytest.raises(RemoteRewardError, match="HTTP 422: label missing"):
        asyncio.run(main())
    assert len(calls) == 1


def test_timeouts_exhaust_retries_with_a_clear_error():
    async def handler(request):
        await asyncio.sleep(5)
        return web.json_response({"reward": 1})

    async def main():
        runner, url = await serve(handler)
        client = RemoteRewardModel(url, timeout=0.2, max_retries=1, backoff=0.01)
        try:
            await client.score(Sample(response="x"))
        finally:
            await client.close()
            await runner.cleanup()

    with pytest.raises(RemoteRewardError, match="failed 2 times; last error: TimeoutError"):
        asyncio.run(main())


def test_a_failing_reward_service_is_named_or_counted_under_reward_errors():
    """The rollout's reward step over the remote client: retries exhausted name the service and the sample; with
    --reward-errors zero the sample scores 0 and says why; NaN from the service is refused like any reward."""
    from types import SimpleNamespace

    from slime.config import parse_config
    from slime.plugin_failures import PluginFailure
    from slime.rollout.reward_checks import REWARD_ERROR
    from slime.rollout.rollout import RewardSpec

    async def handler(request):
        body = await request.json()
        if body["response"] == "down":
            return web.Response(status=503, text="busy")
        return web.Response(text="NaN" if body["response"] == "nan" else "1.5")

    def group():
        return [Sample(prompt="2+2=", response=r, index=i, group_index=0) for i, r in enumerate(["4", "down", "nan"])]

    async def score(policy: str) -> list[Sample]:
        runner, url = await serve(handler)
        flags = ["--hf-checkpoint", "m", "--prompt-data", "p", "--rm-type", "remote_rm", "--rm-url", url]
        ctx = SimpleNamespace(config=parse_config([*flags, "--reward-errors", policy]))
        client = RemoteRewardModel(url, timeout=2, max_retries=1, backoff=0.01)
        samples = group()
        try:
            await RewardSpec("remote_rm", None, False, client).score_group(ctx, samples)
            return samples
        finally:
            await client.close()
            await runner.cleanup()

    samples = asyncio.run(score("zero"))
    assert [s.reward for s in samples] == [1.5, 0.0, 0.0]
    url = samples[1].metadata[REWARD_ERROR].split(" ")[3]
    assert samples[1].metadata[REWARD_ERROR] == (
        f"--rm-type remote_rm at {url} raised RemoteRewardError: reward model at {url} failed 2 times; last error: "
        "ConnectionError: HTTP 503 (sample 1 of group 0, prompt '2+2=')"
    )
    assert (
        samples[2]
        .metadata[REWARD_ERROR]
        .endswith("returned nan, not a finite number (sample 2 of group 0, prompt '2+2=')")
    )
    with pytest.raises(
        PluginFailure, match=r"failed 2 times; .*\(sample 1 of group 0, prompt '2\+2='\); --reward-errors"
    ):
        asyncio.run(score("fail"))
