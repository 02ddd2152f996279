"""A reward model behind HTTP: POST {prompt, response, label, metadata} -> {"reward": float} (or a bare number)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from slime.types import Sample


class RemoteRewardError(RuntimeError):
    pass


class RemoteRewardModel:
    """Async client with a timeout per try and exponential backoff with jitter between tries.

    4xx answers are the caller's mistake and are not retried; timeouts, connection errors and 5xx are.
    """

    def __init__(self, url: str, timeout: float = 30.0, max_retries: int = 4, backoff: float = 0.5, seed: int = 0):
        self.url = url
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._rng = random.Random(seed)
        self._session = None

    async def _post(self, payload: dict[str, Any]) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.post(self.url, json=payload) as resp:
            body = await resp.text()
            if 400 <= resp.status < 500:
                raise RemoteRewardError(
                    f"reward model at {self.url} rejected the request: HTTP {resp.status}: {body[:200]}"
                )
            if resp.status >= 500:
                raise ConnectionError(f"HTTP {resp.status}")
            return json.loads(body)

    async def score(self, sample: Sample) -> float:
        import aiohttp

        payload = {
            "prompt": sample.prompt,
            "response": sample.response,
            "label": sample.label,
            "metadata": sample.metadata,
        }
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                data = await self._post(payload)
                value = data["reward"] if isinstance(data, dict) else data
                return float(value)
            except RemoteRewardError:
                raise
            except (TimeoutError, aiohttp.ClientError, ConnectionError, json.JSONDecodeError, KeyError) as exc:
                last_error = exc
                if attempt < self.max_retries:
                    await asyncio.sleep(self.backoff * (2**attempt) * (0.5 + self._rng.random()))
        raise RemoteRewardError(
            f"reward model at {self.url} failed {self.max_retries + 1} times; last error: {type(last_error).__name__}: {last_error}"
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
