"""HTTP client for an SGLang server (or anything speaking its native API, like the embedded server).

Generation is concurrent: `generate` posts every request at once over one aiohttp session (bounded by
max_concurrency) so the server can batch them. Control calls (weights, pause, abort, memory) are plain
blocking POSTs with the stdlib, with a timeout on every call so a dead server is an error, never a hang.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

import torch

from slime.rollout.engines.base import (
    EngineError,
    EngineUnavailable,
    GenerateRequest,
    GenerateResult,
    RequestRejected,
    RolloutEngine,
    WeightUpdateError,
)
from slime.rollout.engines.protocol import (
    ProtocolError,
    error_message,
    parse_generate_response,
    post_generate,
    sampling_params_to_json,
    serialize_named_tensors,
)


def generate_payload(request: GenerateRequest) -> dict[str, Any]:
    payload = {
        "rid": request.rid,
        "input_ids": list(request.input_ids),
        "sampling_params": sampling_params_to_json(request.sampling_params),
        "return_logprob": request.return_logprob,
    }
    if request.return_routed_experts:  # SGLang answers it only with --enable-return-routed-experts
        payload["return_routed_experts"] = True
    return payload


class SGLangClient(RolloutEngine):
    """RolloutEngine over SGLang's HTTP API at `url` (e.g. http://127.0.0.1:30000)."""

    def __init__(self, url: str, timeout_s: float = 600.0, max_concurrency: int = 512, tp_size: int = 1):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.tp_size = tp_size
        self._update_complete = False  # the last bucket of the update in progress was accepted

    # ---- plumbing ------------------------------------------------------------------------------------
    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """One blocking call; returns parsed JSON (or text). Raises EngineError with the server's message."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            raise EngineError(
                f"{self.url}{path}: HTTP {e.code}: {error_message(e.code, e.read().decode(errors='replace'))}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EngineError(f"{self.url}{path}: cannot reach the server ({reason})") from None
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def _post_update(self, path: str, body: dict[str, Any]) -> None:
        try:
            result = self.request("POST", path, body)
        except EngineError as e:
            raise WeightUpdateError(str(e)) from None
        if isinstance(result, dict) and result.get("success") is False:
            raise WeightUpdateError(f"{self.url}{path}: {result.get('message', 'update failed')}")

    # ---- generation ----------------------------------------------------------------------------------
    async def async_generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        import aiohttp

        limit = asyncio.Semaphore(self.max_concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.max_concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def one(request: GenerateRequest) -> GenerateResult:
                async with limit:
                    try:
                        body = await post_generate(session, self.url, generate_payload(request))
                    except EngineUnavailable as e:
                        raise EngineError(f"{self.url}/generate: {e}") from None
                    except RequestRejected as e:
                        if e.status != 400:
                            raise EngineError(str(e)) from None
                        # the request itself was bad: an error for this request only
                        empty = [] if request.return_logprob else None
                        return GenerateResult(request.rid, [], empty, "error", error=str(e))
                try:
                    return parse_generate_response(body, request.rid)
                except ProtocolError as e:
                    raise EngineError(f"{self.url}/generate: {e}") from None

            return list(await asyncio.gather(*(one(r) for r in requests)))

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.async_generate(requests))
        raise EngineError("SGLangClient.generate was called inside a running event loop; await async_generate instead")

    # ---- weights -------------------------------------------------------------------------------------
    # Buckets never carry SGLang's flush_cache=true: SGLang asserts that flush succeeded, a flush fails while
    # requests wait (the ones a "retract" pause re-queued), and the failed assert kills its scheduler. The cache
    # is flushed by end_weight_update instead, where a refusal is an answer, not a crash.
    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, finish: bool = True
    ) -> None:
        """One bucket of host tensors -> POST /update_weights_from_tensor (each tensor pickled with only its own
        bytes). SGLang applies each bucket as it arrives, so a rejected later bucket leaves the earlier ones
        applied; the trainer treats any WeightUpdateError as fatal for that update."""
        payload = serialize_named_tensors(list(named_tensors))
        self.update_weights_from_serialized([payload] * self.tp_size, version, finish)

    def update_weights_from_serialized(
        self, payloads: list[str], version: int, finish: bool = True, load_format: str | None = None
    ) -> None:
        """One bucket already serialized (one entry per tensor-parallel rank), e.g. device-memory handles of a
        flattened bucket (load_format "flattened_bucket")."""
        self._post_update(
            "/update_weights_from_tensor",
            {
                "serialized_named_tensors": payloads,
                "load_format": load_format,
                "flush_cache": False,
                "weight_version": str(version),
            },
        )
        self._update_complete = finish

    def update_weights_from_disk(self, path: str, version: int) -> None:
        self._post_update("/update_weights_from_disk", {"model_path": path, "weight_version": str(version)})

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        group_name: str = "weight_update_group",
    ) -> None:
        """Join the trainer's broadcast group (backend: the hardware backend's `dist_backend`)."""
        self._post_update(
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )

    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[torch.dtype],
        shapes: list[tuple[int, ...]],
        version: int,
        group_name: str = "weight_update_group",
        finish: bool = True,
    ) -> None:
        """Announce one bucket the trainer is about to broadcast in the group (call, then broadcast)."""
        self._post_update(
            "/update_weights_from_distributed",
            {
                "names": list(names),
                "dtypes": [str(d).replace("torch.", "") for d in dtypes],
                "shapes": [list(s) for s in shapes],
                "group_name": group_name,
                "flush_cache": False,
                "weight_version": str(version),
            },
        )
        self._update_complete = finish

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> bool:
        """Leave the broadcast group; False when the engine has no group of that name (SGLang's answer then)."""
        try:
            self._post_update("/destroy_weights_update_group", {"group_name": group_name})
        except WeightUpdateError as e:
            if "does not exist" in str(e):
                return False
            raise
        return True

    def begin_weight_update(self) -> None:
        """SGLang's pause with mode "retract": running requests go back to the waiting queue and free their KV
        cache, so no decode step runs on half-updated weights; they re-prefill after the update."""
        self._update_complete = False
        self.pause(mode="retract")

    def end_weight_update(self) -> bool | None:
        """After a complete update, flush the prefix cache built with the old weights; then always continue.
        Returns whether the cache was flushed (None after an incomplete update, which flushes nothing).

        SGLang refuses a flush while requests wait (retracted by the pause, or arrived during it): those
        re-prefill over prefix-cache entries of the old weights, and the caller reports it. A failed continue
        raises: the engine would stay paused."""
        try:
            return self._flush_cache_if_idle() if self._update_complete else None
        finally:
            self._update_complete = False
            self.resume()

    def _flush_cache_if_idle(self) -> bool:
        try:
            self.flush_cache()
        except EngineError as e:
            if "HTTP 400" in str(e):  # SGLang's answer while requests run or wait
                return False
            raise
        return True

    # ---- control -------------------------------------------------------------------------------------
    def pause(self, mode: str = "in_place") -> None:
        """SGLang modes: "abort" (abort running requests), "retract" (re-queue them), "in_place" (keep them)."""
        self.request("POST", "/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self.request("POST", "/continue_generation", {})

    def abort(self, rid: str | None = None) -> None:
        self.request("POST", "/abort_request", {"rid": rid or "", "abort_all": rid is None})

    def health(self) -> bool:
        try:
            self.request("GET", "/health", timeout_s=min(self.timeout_s, 10.0))
        except EngineError:
            return False
        return True

    def release_memory(self, tags: list[str] | None = None) -> None:
        self.request("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self.request("POST", "/resume_memory_occupation", {"tags": tags})

    def flush_cache(self) -> None:
        self.request("POST", "/flush_cache")

    def get_model_info(self) -> dict[str, Any]:
        info = self.request("GET", "/get_model_info")
        if not isinstance(info, dict):
            raise EngineError(f"{self.url}/get_model_info: unexpected answer {str(info)[:200]}")
        return info

    @property
    def weight_version(self) -> int:
        version = self.get_model_info().get("weight_version")
        try:
            return int(version) if version is not None else 0
        except ValueError:
            raise EngineError(f"{self.url}: weight_version {version!r} is not an integer") from None

    def shutdown(self) -> None:
        """The client owns no server; SGLangEngine (launcher.py) stops the one it started."""
