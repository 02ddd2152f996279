"""SGLang's native HTTP JSON for the subset RL uses, both directions: the embedded server parses requests
and writes responses with these functions, the SGLang client writes requests and parses responses with
them, so the two cannot drift apart. Shapes follow sglang's GenerateReqInput / tokenizer-manager output:

request  {"input_ids": [..] | [[..], ..], "text": str | [str], "sampling_params": {..} | [{..}],
          "return_logprob": bool, "rid": str | [str], "logprob_start_len": -1, "stream": false}
response {"text": str, "output_ids": [..], "meta_info": {"id", "finish_reason": {"type": "stop", "matched": 2}
          | {"type": "length", "length": 64} | {"type": "abort", "message": ..}, "prompt_tokens",
          "completion_tokens", "cached_tokens", "output_token_logprobs": [[logprob, token_id, null], ..],
          "weight_version": "3", "routed_experts": base64 of int32 [len(tokens) - 1, num_hidden_layers, top_k] (zeros in dense layers)
          (only with "return_routed_experts": true, as SGLang returns it)}}   (a list of these for a batch request)
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from slime.rollout.engines.base import (
    EngineUnavailable,
    GenerateRequest,
    GenerateResult,
    RequestRejected,
    SamplingParams,
)


class ProtocolError(ValueError):
    """A request the server answers with HTTP 400; the message names the field."""


# SGLang sampling keys we implement, with their SGLang names.
_SAMPLING_KEYS = {f.name for f in fields(SamplingParams)} - {"seed"}
_SEED_KEYS = ("sampling_seed", "seed")
# SGLang keys accepted when they hold their neutral value (anything else changes sampling, which we don't do).
_NEUTRAL = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "n": 1,
    "regex": None,
    "json_schema": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
}
# Keys that only shape the returned text.
_TEXT_ONLY = ("skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


# meta_info key of the per-token weight versions (the in-process engines send it; SGLang does not)
TOKEN_VERSIONS_FIELD = "output_token_weight_versions"


def parse_sampling_params(raw: Any, where: str = "sampling_params") -> SamplingParams:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where} must be an object, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SAMPLING_KEYS:
            values[key] = value
        elif key in _SEED_KEYS:
            if value is not None:
                values["seed"] = value
        elif key in _NEUTRAL:
            if value is not None and value != _NEUTRAL[key]:
                raise ProtocolError(f"{where}.{key}={value!r} is not supported by this engine (only {_NEUTRAL[key]!r})")
        elif key not in _TEXT_ONLY:
            raise ProtocolError(f"{where}.{key} is not a known sampling parameter")
    for key in ("stop_token_ids", "stop"):
        value = values.get(key)
        if value is None:
            values.pop(key, None)
        elif key == "stop" and isinstance(value, str):
            values[key] = (value,)
        elif not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where}.{key} must be a list, got {type(value).__name__}")
    for key in ("max_new_tokens", "top_k"):
        if key in values and isinstance(values[key], float) and values[key].is_integer():
            values[key] = int(values[key])
    if values.get("max_new_tokens", 0) is None:
        values.pop("max_new_tokens")
    for key in ("temperature", "top_p", "min_p"):
        if key in values and not (isinstance(values[key], (int, float)) and not isinstance(values[key], bool)):
            raise ProtocolError(f"{where}.{key} must be a number, got {values[key]!r}")
    try:
        stop_ids = values.get("stop_token_ids", [])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise ValueError(f"{where}.stop_token_ids must be integers")
        params = SamplingParams(**values)
        params.validate()
    except (TypeError, ValueError) as e:
        raise ProtocolError(str(e).replace("sampling_params", where)) from None
    return params


def sampling_params_to_json(params: SamplingParams) -> dict[str, Any]:
    """SGLang's JSON for these parameters (seed travels as `sampling_seed`, SGLang's name)."""
    out: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "max_new_tokens": params.max_new_tokens,
        "ignore_eos": params.ignore_eos,
    }
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.stop:
        out["stop"] = list(params.stop)
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    return out


def _per_item(value: Any, count: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * count
    if isinstance(value, list):
        if len(value) != count:
            raise ProtocolError(f"{name} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def parse_generate_request(
    body: Any, encode: Callable[[str], list[int]] | None, new_rid: Callable[[], str]
) -> tuple[list[GenerateRequest], bool]:
    """A /generate body -> (requests, is_batch). Raises ProtocolError naming the bad field."""
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    if body.get("stream"):
        raise ProtocolError("stream=true is not supported by this server")
    if body.get("top_logprobs_num") not in (None, 0):
        raise ProtocolError("top_logprobs_num is not supported by this server")
    if body.get("logprob_start_len") not in (None, -1):
        raise ProtocolError("logprob_start_len must be -1 (prompt log-probs are not supported)")
    input_ids, text = body.get("input_ids"), body.get("text")
    if (input_ids is None) == (text is None):
        raise ProtocolError("give exactly one of input_ids and text")
    if text is not None:
        if encode is None:
            raise ProtocolError("text input needs a tokenizer, and the served checkpoint has none; send input_ids")
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ProtocolError("text must be a string or a list of strings")
        prompts = [encode(t) for t in texts]
    else:
        if not isinstance(input_ids, list) or not input_ids:
            raise ProtocolError("input_ids must be a non-empty list of token ids (or a list of such lists)")
        batch = isinstance(input_ids[0], list)
        prompts = input_ids if batch else [input_ids]
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ProtocolError(f"input_ids{f'[{i}]' if batch else ''} must be a list of integers")
    count = len(prompts)
    params = _per_item(body.get("sampling_params"), count, "sampling_params", {})
    rids = _per_item(body.get("rid"), count, "rid", None)
    logprob = _per_item(body.get("return_logprob"), count, "return_logprob", False)
    routed = _per_item(body.get("return_routed_experts"), count, "return_routed_experts", False)
    requests = []
    for i in range(count):
        where = (
            f"sampling_params[{i}]" if batch and isinstance(body.get("sampling_params"), list) else "sampling_params"
        )
        rid = rids[i]
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError(f"rid must be a string, got {rid!r}")
        if rid is not None and batch and not isinstance(body.get("rid"), list):
            rid = f"{rid}-{i}"
        requests.append(
            GenerateRequest(
                rid or new_rid(), prompts[i], parse_sampling_params(params[i], where), bool(logprob[i]), bool(routed[i])
            )
        )
    return requests, batch


def finish_reason_json(result: GenerateResult) -> dict[str, Any]:
    if result.finish_reason == "stop":
        return {"type": "stop", "matched": result.matched_stop}
    if result.finish_reason == "length":
        return {"type": "length", "length": len(result.output_ids)}
    if result.finish_reason == "abort":
        return {"type": "abort", "message": result.error or "aborted"}
    return {"type": "abort", "message": result.error or "error", "status_code": 400, "err_type": "BadRequest"}


def generate_response_json(result: GenerateResult) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": result.rid,
        "finish_reason": finish_reason_json(result),
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.output_ids),
        "cached_tokens": 0,
        "weight_version": str(result.weight_version),
    }
    if result.output_log_probs is not None:
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(result.output_log_probs, result.output_ids)]
    if result.routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(result.routed_experts)
    if result.output_weight_versions:  # slime's own field (SGLang reports only the version at the finish)
        meta[TOKEN_VERSIONS_FIELD] = list(result.output_weight_versions)
    return {"text": result.text or "", "output_ids": list(result.output_ids), "meta_info": meta}


def parse_generate_response(payload: Any, rid: str) -> GenerateResult:
    """One SGLang /generate output object -> GenerateResult (the client side)."""
    if not isinstance(payload, dict) or "meta_info" not in payload:
        raise ProtocolError(f"unexpected /generate response for {rid}: {str(payload)[:200]}")
    meta = payload["meta_info"]
    logprobs = meta.get("output_token_logprobs")
    if logprobs is not None:
        # SGLang's entries are (logprob, token_id, text-or-null); the token ids are authoritative here.
        output_ids = [int(entry[1]) for entry in logprobs]
        output_log_probs: list[float] | None = [
            float(entry[0]) if entry[0] is not None else -math.inf for entry in logprobs
        ]
    else:
        output_ids = [int(t) for t in payload.get("output_ids") or []]
        output_log_probs = None
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else None
    error = None
    if kind == "stop":
        finish = "stop"
    elif kind == "length":
        finish = "length"
    elif kind == "abort" and reason.get("status_code") in (None, 200) and reason.get("err_type") in (None, "Abort"):
        finish, error = "abort", reason.get("message")
    else:
        finish, error = (
            "error",
            (reason.get("message") if isinstance(reason, dict) else None) or f"finish_reason {reason!r}",
        )
    version = meta.get("weight_version")
    return GenerateResult(
        rid=str(meta.get("id", rid)),
        output_ids=output_ids,
        output_log_probs=output_log_probs,
        finish_reason=finish,
        error=error,
        weight_version=int(version) if isinstance(version, (int, str)) and str(version).lstrip("-").isdigit() else 0,
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        text=payload.get("text"),
        matched_stop=reason.get("matched") if isinstance(reason, dict) else None,
        routed_experts=decode_routed_experts(meta["routed_experts"]) if meta.get("routed_experts") else None,
        output_weight_versions=_token_versions(meta, len(output_ids)),
    )


def _token_versions(meta: dict, count: int) -> list[int] | None:
    versions = meta.get(TOKEN_VERSIONS_FIELD)
    if not isinstance(versions, list) or len(versions) != count:
        return None
    return [int(v) for v in versions]


def encode_routed_experts(expert_ids: list[int]) -> str:
    import numpy as np

    return base64.b64encode(np.asarray(expert_ids, dtype="<i4").tobytes()).decode("ascii")


def decode_routed_experts(payload: str) -> list[int]:
    import numpy as np

    return np.frombuffer(base64.b64decode(payload), dtype="<i4").tolist()


# ---- tensors over HTTP (/update_weights_from_tensor) --------------------------------------------------
def serialize_named_tensors(named_tensors: list[tuple[str, Any]]) -> str:
    """SGLang's MultiprocessingSerializer format for host tensors: base64 of a pickle of [(name, tensor)], each
    tensor's bytes in the payload (any process can read them).

    A tensor pickles with its whole storage, so a view into a larger buffer (a packed bucket's tensors) is copied
    out first: the payload carries each tensor's own bytes once. Device tensors travel as memory handles through
    the backend's serializer (`Backend.serialize_ipc_tensors`), never through this function.
    """
    import base64
    import io
    import pickle

    on_device = [name for name, t in named_tensors if t.device.type != "cpu"]
    if on_device:
        raise ProtocolError(
            f"{on_device[0]} is a device tensor: send device memory with Backend.serialize_ipc_tensors, or host copies"
        )
    buffer = io.BytesIO()
    pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump([(n, own_bytes(t)) for n, t in named_tensors])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def own_bytes(tensor: Any) -> Any:
    """`tensor`, or a compact copy of it when its storage holds more than its own elements."""
    tensor = tensor.detach().contiguous()
    if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


# SGLang's load_format for one flattened tensor per bucket: {"flattened_tensor": uint8 tensor, "metadata": [..]},
# each metadata entry with name, shape, dtype, start_idx, end_idx, numel (byte offsets into the flat tensor).
# One tensor means one device-memory handle per bucket instead of one per weight.
FLATTENED_BUCKET = "flattened_bucket"


def flatten_bucket(named_tensors: list[tuple[str, Any]]) -> dict[str, Any]:
    """[(name, tensor)] -> SGLang's flattened bucket. The metadata entries are SimpleNamespaces: SGLang reads them
    by attribute, and its unpickler admits the `types` module (a class of our own would be refused)."""
    from types import SimpleNamespace

    import torch

    parts, metadata, start = [], [], 0
    for name, tensor in named_tensors:
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        end = start + flat.numel()
        metadata.append(
            SimpleNamespace(
                name=name, shape=tensor.shape, dtype=tensor.dtype, start_idx=start, end_idx=end, numel=flat.numel()
            )
        )
        parts.append(flat)
        start = end
    return {"flattened_tensor": torch.cat(parts), "metadata": metadata}


def unflatten_bucket(bucket: Any) -> list[tuple[str, Any]]:
    """Inverse of flatten_bucket (views into the flat tensor)."""
    if not isinstance(bucket, dict) or not {"flattened_tensor", "metadata"} <= set(bucket):
        raise ProtocolError("a flattened_bucket payload must hold a dict with flattened_tensor and metadata")
    flat = bucket["flattened_tensor"]
    try:
        return [(str(m.name), flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape)) for m in bucket["metadata"]]
    except (AttributeError, RuntimeError, TypeError) as e:
        raise ProtocolError(f"flattened_bucket metadata does not describe its tensor: {e}") from None


def deserialize_payload(payload: str | bytes, load_format: str | None) -> list[tuple[str, Any]]:
    """One `serialized_named_tensors` entry in either of SGLang's formats -> [(name, tensor)]."""
    if load_format == FLATTENED_BUCKET:
        return unflatten_bucket(_unpickle(payload))
    return deserialize_named_tensors(payload)


def _unpickle(payload: str | bytes) -> Any:
    import base64
    import binascii
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions with ForkingPickler)

    try:
        raw = base64.b64decode(payload, validate=True) if isinstance(payload, str) else payload
        return ForkingPickler.loads(raw)
    except (binascii.Error, ValueError, EOFError) as e:
        raise ProtocolError(f"serialized_named_tensors is not a serialized tensor list: {e}") from None


def deserialize_named_tensors(payload: str | bytes) -> list[tuple[str, Any]]:
    """Inverse of serialize_named_tensors. Unpickling runs code from the payload: this is why the servers
    bind 127.0.0.1 only (SGLang's own trust model for this endpoint)."""
    value = _unpickle(payload)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(item, (list, tuple)) and len(item) == 2 for item in value
    ):
        raise ProtocolError("serialized_named_tensors must hold a list of (name, tensor) pairs")
    return [(str(name), tensor) for name, tensor in value]


# ---- the transport -------------------------------------------------------------------------------------
async def post_generate(session, url: str, payload: dict[str, Any]) -> Any:
    """POST `payload` to `url`/generate on an aiohttp session: the JSON body of a 200 answer. The one way
    slime sends generation requests (the rollout's RolloutContext and SGLangClient both call it).
    Raises EngineUnavailable when the server cannot be reached or answers 5xx (safe to retry: a dying server
    or a proxy may not answer in JSON), RequestRejected with the server's message on 4xx."""
    import aiohttp

    try:
        async with session.post(f"{url}/generate", json=payload) as response:
            status, text = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise EngineUnavailable(f"{url}: {type(exc).__name__}: {exc}") from None
    if status >= 500:
        raise EngineUnavailable(f"{url}: HTTP {status}: {text[:200]}")
    if status != 200:
        raise RequestRejected(f"{url}/generate rejected the request: {error_message(status, text)}", status)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ProtocolError(f"{url}/generate answered with a body that is not JSON: {text[:200]!r}") from None


def error_message(status: int, text: str) -> str:
    """The message of an error answer: SGLang's {"error": {"message"}} or {"message"}, else the text."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:500] or f"HTTP {status}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return text.strip()[:500] or f"HTTP {status}"
