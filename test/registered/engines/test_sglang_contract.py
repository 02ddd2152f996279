"""slime's SGLang adapter against the pinned `sglang` package's own definitions, without a server or a GPU:
the launcher's argv parses with ServerArgs' parser, every request body the client sends (generate, weight
updates from tensors / disk / distributed, memory release and resume, pause / continue, abort, cache flush) is
accepted by the request dataclass its route parses into, and every route the client calls exists with that
method. The definitions are read from the installed source (sglang_source.py); moving the pin in
requirements/constraints-cuda.txt makes this fail wherever SGLang's API moved."""

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=10, suite="base-b-test-cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import pytest  # noqa: E402
import sglang_source  # noqa: E402
import torch  # noqa: E402

from slime.rollout.engines.base import EngineError, GenerateRequest, SamplingParams  # noqa: E402
from slime.rollout.engines.sglang.client import SGLangClient  # noqa: E402
from slime.rollout.engines.sglang.launcher import SGLangServerConfig, server_command  # noqa: E402

ROOT, WHY_NOT = sglang_source.installed_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason=WHY_NOT)


def sglang_parser() -> argparse.ArgumentParser:
    """SGLang's own parser when sglang.srt.server_args imports here (it needs part of its GPU stack), else the
    same options read from its source."""
    try:
        from sglang.srt.server_args import ServerArgs
    except Exception:  # ImportError, or a dependency failing at import (torchvision ops, ...)
        return sglang_source.server_args_parser(ROOT)
    parser = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(parser)
    return parser


def test_launcher_argv_parses_with_server_args():
    parser = sglang_parser()
    options = {"mem_fraction_static": "0.7", "enable_memory_saver": "true", "tp_size": "1", "log_level": "warning"}
    command = server_command(SGLangServerConfig("/models/qwen", options), 30000, parser)
    assert command[1:3] == ["-m", "sglang.launch_server"]
    parsed = parser.parse_args(command[3:])
    assert (parsed.model_path, parsed.host, parsed.port) == ("/models/qwen", "127.0.0.1", 30000)
    assert parsed.enable_memory_saver is True and parsed.mem_fraction_static == 0.7 and parsed.tensor_parallel_size == 1
    with pytest.raises(EngineError, match="--sglang-mem-fraction: the installed sglang has no server option"):
        server_command(SGLangServerConfig("/m", {"mem_fraction": "0.7"}), 30000, parser)


class _Recorder(BaseHTTPRequestHandler):
    calls: list[tuple[str, str, object]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        path = self.path.split("?", 1)[0]
        self.calls.append((self.command, path, body))
        if path == "/generate":
            meta = {"id": body["rid"], "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 1}
            answer = {"text": "", "output_ids": [3], "meta_info": {**meta, "output_token_logprobs": [[-0.5, 3, None]]}}
        elif path == "/get_model_info":
            answer = {"weight_version": "4"}
        else:
            answer = {"success": True, "message": ""}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def sent():
    """Every call the SGLang client makes for the loop, as (method, path, body), recorded by a local server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = SGLangClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=30)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop_token_ids=[2], seed=3)
    [result] = client.generate([GenerateRequest("r1", [5, 6], params, return_logprob=True)])
    assert result.output_ids == [3] and result.output_log_probs == [-0.5]
    tensors = [("model.norm.weight", torch.ones(4))]
    client.begin_weight_update()
    client.update_weights_from_tensors(tensors, version=4, finish=True)
    client.update_weights_from_disk("/checkpoints/step_4", version=4)
    client.init_weights_update_group("127.0.0.1", 29500, 1, 3, "gloo", "slime_weight_sync")
    client.update_weights_from_distributed(
        ["model.norm.weight"], [torch.bfloat16], [(4,)], 4, "slime_weight_sync", True
    )
    client.end_weight_update()
    client.release_memory(["kv_cache"])
    client.resume_memory(["weights"])
    client.release_memory()
    client.pause()
    client.resume()
    client.abort("r1")
    client.abort()
    assert client.health() and client.weight_version == 4
    server.shutdown()
    return list(_Recorder.calls)


EXPECTED_PATHS = {
    "/generate", "/update_weights_from_tensor", "/update_weights_from_disk", "/init_weights_update_group",
    "/update_weights_from_distributed", "/release_memory_occupation", "/resume_memory_occupation",
    "/pause_generation", "/continue_generation", "/flush_cache", "/abort_request", "/health", "/get_model_info",
}  # fmt: skip


def test_every_route_the_client_calls_exists_with_its_method(sent):
    routes = sglang_source.routes(ROOT)
    assert {path for _, path, _ in sent} == EXPECTED_PATHS
    for method, path, _ in sent:
        assert path in routes, f"sglang {sglang_source.pinned_version()} has no route {path}"
        assert method in routes[path].methods, f"{path} takes {routes[path].methods}, the client sends {method}"
    assert "GET" in routes["/health_generate"].methods  # the launcher's readiness probe


def test_every_request_body_is_accepted_by_sglang_request_types(sent):
    routes, types = sglang_source.routes(ROOT), sglang_source.request_types(ROOT)
    for _, path, body in sent:
        assert path in routes, f"sglang has no route {path}"
        request_type = routes[path].request_type
        if request_type is None:
            assert not body, f"{path} takes no body in sglang, the client sends {body}"
            continue
        assert request_type in types, f"{path} parses into {request_type}, not a dataclass of io_struct"
        assert sglang_source.accepts(types[request_type], body or {}) == [], path


def test_sampling_params_and_tensor_payload_match_sglang(sent):
    names = sglang_source.sampling_param_names(ROOT)
    [generate] = [body for _, path, body in sent if path == "/generate"]
    assert set(generate["sampling_params"]) <= names, f"unknown to sglang: {set(generate['sampling_params']) - names}"
    [distributed] = [body for _, path, body in sent if path == "/update_weights_from_distributed"]
    assert distributed["dtypes"] == ["bfloat16"] and all(
        hasattr(torch, d) for d in distributed["dtypes"]
    )  # getattr(torch, d)
    [tensor] = [body for _, path, body in sent if path == "/update_weights_from_tensor"]
    assert isinstance(tensor["serialized_named_tensors"], list) and isinstance(
        tensor["serialized_named_tensors"][0], str
    )


def test_a_drifted_body_is_refused():
    """The check itself can fail: an unknown field, a missing required one and a value outside a Literal."""
    types = sglang_source.request_types(ROOT)
    assert sglang_source.accepts(types["UpdateWeightsFromDistributedReqInput"], {"names": [], "shape": []}) == [
        "UpdateWeightsFromDistributedReqInput has no field 'shape'",
        "UpdateWeightsFromDistributedReqInput requires 'dtypes'",
        "UpdateWeightsFromDistributedReqInput requires 'shapes'",
    ]
    assert sglang_source.accepts(types["PauseGenerationReqInput"], {"mode": "later"})


def sglang_unpickle(payload: str):
    """Load a payload under SGLang's SafeUnpickler rules (its allow-list and deny-list, read from its source)."""
    import base64
    import io
    import pickle

    allowed, denied = sglang_source.unpickler_rules(ROOT)

    class RuleUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            assert (module, name) not in denied and any((module + ".").startswith(p) for p in allowed), (
                f"SGLang's unpickler refuses {module}.{name}"
            )
            return super().find_class(module, name)

    return RuleUnpickler(io.BytesIO(base64.b64decode(payload))).load()


def test_tensor_payloads_pass_sglang_unpickler_and_match_its_bucket_format():
    import base64
    import pickle

    from slime.rollout.engines.protocol import flatten_bucket, serialize_named_tensors, unflatten_bucket

    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.bfloat16))]
    loaded = sglang_unpickle(serialize_named_tensors(named))
    assert [n for n, _ in loaded] == ["a.weight", "b.bias"] and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(loaded, named)
    )
    bucket = sglang_unpickle(base64.b64encode(pickle.dumps(flatten_bucket(named))).decode())
    # SGLang rebuilds FlattenedTensorMetadata from these attributes (model_runner._update_weights_from_flattened_bucket)
    fields = sglang_source.dataclass_fields(ROOT, "srt/weight_sync/tensor_bucket.py", "FlattenedTensorMetadata")
    assert sorted(vars(bucket["metadata"][0])) == sorted(fields)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(unflatten_bucket(bucket), named))
    runner = (ROOT / "srt/model_executor/model_runner.py").read_text()
    assert '"flattened_bucket"' in runner and 'flattened_tensor_bucket_dict["flattened_tensor"]' in runner


def test_embedded_server_routes_are_sglang_routes():
    """The embedded engine imitates SGLang's HTTP API: every route it serves must exist in SGLang with that method."""
    from slime.rollout.engines.embedded.server import EmbeddedServer

    routes = sglang_source.routes(ROOT)
    served = {(r.method, r.resource.canonical) for r in EmbeddedServer(None).app.router.routes() if r.method != "HEAD"}
    assert len(served) > 15
    for method, path in sorted(served):
        assert path in routes and method in routes[path].methods, f"embedded {method} {path} is not an SGLang route"
