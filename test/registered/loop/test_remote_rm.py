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
