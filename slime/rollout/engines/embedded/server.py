"""SGLang-compatible HTTP server for any in-process engine (`base.ServableEngine`: the embedded engine, the JAX
engine); the subset RL uses, JSON in protocol.py.

    python -m slime.rollout.engines.embedded.server --model PATH [--port N]
    -> prints "slime embedded engine ready at http://127.0.0.1:PORT" once it accepts requests.

aiohttp, because it is already installed (Ray depends on it) and asyncio-native: each in-flight
/generate is a coroutine awaiting a future that the engine's worker thread completes, so hundreds of
concurrent requests cost no threads, and they all land in the engine's queue at once, which is what lets
continuous batching fill the batch. Blocking engine calls (weight copies, pause) run in the default
executor so the event loop keeps answering /health. Binds 127.0.0.1 unless told otherwise.

Endpoints: /generate, /health, /health_generate, /get_model_info, /get_weight_version, /flush_cache,
/update_weights_from_tensor, /update_weights_from_disk, /pause_generation, /continue_generation,
/abort_request, /release_memory_occupation, /resume_memory_occupation, and SGLang's distributed weight update
(/init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group; distributed.py).
Any in-process engine (`ServableEngine`: the embedded and the JAX engine) can sit behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from slime.rollout.engines.base import EngineError, GenerateRequest, GenerateResult, ServableEngine
from slime.rollout.engines.embedded.distributed import DEFAULT_GROUP, DEFAULT_TIMEOUT_S, WeightGroups, finishes_update
from slime.rollout.engines.protocol import (
    FLATTENED_BUCKET,
    ProtocolError,
    deserialize_payload,
    generate_response_json,
    parse_generate_request,
)

logger = logging.getLogger(__name__)
READY_PREFIX = "slime embedded engine ready at "


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": {"message": message}, "success": False, "message": message}, status=400)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    return body


def _parse_version(body: dict[str, Any], current: int) -> int:
    version = body.get("weight_version")
    if version is None:
        return current
    try:
        return int(version)
    except (TypeError, ValueError):
        raise ProtocolError(f"weight_version must be an integer (or its string), got {version!r}") from None


def _require_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key} must be true or false, got {value!r}")
    return value


class EmbeddedServer:
    def __init__(self, engine: ServableEngine, weight_group_timeout_s: float = DEFAULT_TIMEOUT_S):
        self.engine = engine
        self.groups = WeightGroups(engine, weight_group_timeout_s)
        self.app = web.Application(client_max_size=1 << 31, middlewares=[self._errors])
        post, get = self.app.router.add_post, self.app.router.add_get
        post("/generate", self.generate)
        for path in ("/health", "/health_generate"):  # GET only, as in SGLang (the contract test checks methods)
            get(path, self.health)
        get("/get_model_info", self.model_info)
        get("/get_weight_version", self.weight_version)
        get("/get_server_info", self.server_info)
        for path in ("/flush_cache",):
            get(path, self.flush_cache)
            post(path, self.flush_cache)
        post("/update_weights_from_tensor", self.update_from_tensor)
        post("/update_weights_from_disk", self.update_from_disk)
        post("/init_weights_update_group", self.init_group)
        post("/update_weights_from_distributed", self.update_from_distributed)
        post("/destroy_weights_update_group", self.destroy_group)
        post("/pause_generation", self.pause)
        post("/continue_generation", self.resume)
        post("/abort_request", self.abort)
        post("/release_memory_occupation", self.release_memory)
        post("/resume_memory_occupation", self.resume_memory)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        try:
            return await handler(request)
        except (ProtocolError, EngineError) as e:
            return _bad_request(str(e))

    async def _run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def generate(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        encode = (lambda text: self.engine.tokenizer.encode(text)) if self.engine.tokenizer is not None else None
        requests, batch = parse_generate_request(body, encode, self.engine.new_rid)
        results = await self._results_of(requests)
        if not batch and results[0].finish_reason == "error":
            return _bad_request(results[0].error or "invalid request")
        outputs = [generate_response_json(r) for r in results]
        return web.json_response(outputs if batch else outputs[0])

    async def _results_of(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Submit the requests together and await all their results, waking this event loop once for the
        batch rather than once per result (each wake-up takes the interpreter from the engine's thread)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        results: list[GenerateResult | None] = [None] * len(requests)
        remaining = [len(requests)]
        lock = threading.Lock()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        def on_result(index: int, result: GenerateResult) -> None:
            with lock:
                results[index] = result
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                loop.call_soon_threadsafe(finish)

        self.engine.submit_all(requests, on_result)
        try:
            await done
        except asyncio.CancelledError:  # the client went away: stop spending compute on its requests
            for req in requests:
                await self._run_blocking(self.engine.abort, req.rid)
            raise
        return [r for r in results if r is not None]

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.engine.health() else 503)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.engine.model_path,
                "tokenizer_path": self.engine.model_path if self.engine.tokenizer is not None else None,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": str(self.engine.weight_version),
                "max_total_num_tokens": self.engine.max_batch_size * self.engine.max_seq_len,
                "context_length": self.engine.max_seq_len,
                "max_running_requests": self.engine.max_batch_size,
                "model_type": self.engine.model_type,
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        """SGLang answers with its server arguments; this engine with its own, and its process id."""
        return web.json_response(
            {
                "model_path": self.engine.model_path,
                "max_running_requests": self.engine.max_batch_size,
                "context_length": self.engine.max_seq_len,
                "weight_version": str(self.engine.weight_version),
                "pid": os.getpid(),
                "engine": self.engine.engine_name,
                "enable_return_routed_experts": self.engine.returns_routed_experts,
            }
        )

    async def weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": str(self.engine.weight_version)})

    async def flush_cache(self, request: web.Request) -> web.Response:
        """Ends a weight update sent in buckets (it applies them), then answers as SGLang does: a flush is
        refused with 400 while requests run or wait."""
        await self._run_blocking(self.engine.commit_pending_update)
        busy = self.engine.num_running() + self.engine.num_waiting()
        if busy:
            return _bad_request(f"Cache not flushed: {busy} request(s) are running or waiting")
        self.engine.flush_cache()
        return web.Response(text="Cache flushed.\n")

    async def update_from_tensor(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        serialized = body.get("serialized_named_tensors")
        if not isinstance(serialized, list) or not serialized:
            raise ProtocolError(
                "serialized_named_tensors must be a non-empty list (one entry per tensor-parallel rank)"
            )
        load_format = body.get("load_format")
        if load_format not in (None, "direct", FLATTENED_BUCKET):
            raise ProtocolError(
                f"load_format {load_format!r} is not supported by this engine (use null or {FLATTENED_BUCKET})"
            )
        finish = finishes_update(body, self.engine)
        if _require_bool(body, "abort_all_requests", False):
            await self._run_blocking(self.engine.abort, None)
        version = _parse_version(body, self.engine.weight_version)
        named = deserialize_payload(serialized[0], load_format)  # one rank: the in-process engines take whole tensors
        await self._run_blocking(lambda: self.engine.update_weights_from_tensors(named, version, finish=finish))
        return web.json_response({"success": True, "message": "Succeeded to update model weights."})

    async def update_from_disk(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise ProtocolError("model_path must be a folder path")
        if body.get("load_format") not in (None, "auto", "safetensors"):
            raise ProtocolError(f"load_format {body.get('load_format')!r} is not supported by this engine")
        if _require_bool(body, "abort_all_requests", False):
            await self._run_blocking(self.engine.abort, None)
        version = _parse_version(body, self.engine.weight_version)
        await self._run_blocking(self.engine.update_weights_from_disk, path, version)
        return web.json_response(
            {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        )

    async def init_group(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        await self._run_blocking(self.groups.init_group, body)
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if _require_bool(body, "abort_all_requests", False):
            await self._run_blocking(self.engine.abort, None)
        version = _parse_version(body, self.engine.weight_version)
        await self._run_blocking(self.groups.receive, body, version)
        return web.json_response({"success": True, "message": "Succeeded to update parameter online."})

    async def destroy_group(self, request: web.Request) -> web.Response:
        name = (await _json_body(request)).get("group_name", DEFAULT_GROUP)
        if not self.groups.destroy(str(name)):
            return _bad_request(f"weight group {name!r} does not exist")
        return web.json_response({"success": True, "message": "Succeeded to destroy custom process group."})

    async def pause(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise ProtocolError(f"mode must be one of abort, retract, in_place; got {mode!r}")
        await self._run_blocking(self.engine.pause)
        if mode == "abort":
            await self._run_blocking(self.engine.abort, None)
        return web.json_response({"success": True})

    async def resume(self, request: web.Request) -> web.Response:
        self.engine.discard_pending_update()  # buckets never ended by a flush: an update the sender gave up
        self.engine.resume()
        return web.json_response({"success": True})

    async def abort(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        abort_all = _require_bool(body, "abort_all", False)
        rid = body.get("rid", "")
        if not isinstance(rid, str):
            raise ProtocolError(f"rid must be a string, got {rid!r}")
        if abort_all:
            await self._run_blocking(self.engine.abort, None)
        elif rid:
            await self._run_blocking(self.engine.abort, rid)
        return web.Response(status=200)

    async def release_memory(self, request: web.Request) -> web.Response:
        tags = (await _json_body(request)).get("tags")
        await self._run_blocking(lambda: self.engine.release_memory(tags))
        return web.json_response({"success": True})

    async def resume_memory(self, request: web.Request) -> web.Response:
        tags = (await _json_body(request)).get("tags")
        await self._run_blocking(lambda: self.engine.resume_memory(tags))
        return web.json_response({"success": True})


@dataclass
class ServerHandle:
    url: str
    port: int
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _runner: web.AppRunner

    def stop(self) -> None:
        """Stop serving (the engine stays up; shut it down separately)."""
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        future.result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def serve_http(
    engine: ServableEngine,
    host: str = "127.0.0.1",
    port: int = 0,
    weight_group_timeout_s: float = DEFAULT_TIMEOUT_S,
    advertise: str | None = None,
) -> ServerHandle:
    """Serve `engine` on a background thread; port 0 picks a free port. Returns once it accepts requests.
    `weight_group_timeout_s` bounds every collective of a distributed weight update. The handle's URL names
    `advertise` (default: `host`; a server bound to 0.0.0.0 is reached at its node's address)."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(EmbeddedServer(engine, weight_group_timeout_s).app, access_log=None)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock).start())
        except BaseException as e:  # reported to the caller below
            failure.append(e)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name=f"embedded-http-{bound_port}", daemon=True)
    thread.start()
    started.wait()
    if failure:
        raise failure[0]
    return ServerHandle(f"http://{advertise or host}:{bound_port}", bound_port, loop, thread, runner)


def _dtype(name: str):
    import torch

    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise argparse.ArgumentTypeError(f"--dtype must be one of {', '.join(choices)}")
    return choices[name]


def _build_engine(args: argparse.Namespace) -> ServableEngine:
    if args.engine == "jax":
        from slime.rollout.engines.jax.engine import JaxEngine

        dtype = str(args.dtype).removeprefix("torch.")
        return JaxEngine(args.model, args.max_batch_size, args.max_seq_len, dtype, args.seed)
    from slime.rollout.engines.embedded.engine import EmbeddedEngine

    return EmbeddedEngine(args.model, args.device, args.max_batch_size, args.max_seq_len, args.dtype, args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve an HF checkpoint with an in-process engine over SGLang's HTTP API."
    )
    parser.add_argument("--engine", choices=("embedded", "jax"), default="embedded")
    parser.add_argument("--model", "--model-path", dest="model", required=True, help="HF checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--dtype", type=_dtype, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weight-group-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a weight-group collective may take",
    )
    parser.add_argument(
        "--enable-return-routed-experts",
        action="store_true",
        help="SGLang's flag, accepted so the SGLang launcher's argv works; this server answers routes either way",
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        engine = _build_engine(args)
    except (ValueError, EngineError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    handle = serve_http(engine, args.host, args.port, args.weight_group_timeout)
    print(f"{READY_PREFIX}{handle.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
        engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
