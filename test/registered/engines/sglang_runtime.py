"""SGLang's own receiving side of weight sync, run from the installed pinned package without a GPU, behind a small
HTTP front (`python sglang_runtime.py`, one process per engine: torch registers a weight group by name per process).

What runs is SGLang's code, unchanged:
- `sglang.srt.utils.common`: `init_custom_process_group` (the weight group's rendezvous), `MultiprocessingSerializer`
  and its `SafeUnpickler`; `sglang.srt.weight_sync.tensor_bucket.FlattenedTensorBucket`; imported as modules.
- the methods behind the routes, from their source files: ModelRunner's `init_weights_update_group`,
  `destroy_weights_update_group`, `update_weights_from_distributed`, `update_weights_from_tensor` (and the helpers
  they call), TpModelWorker's pass-throughs, the scheduler's update mixin (which asserts a flush after an update
  with `flush_cache=true`), and Scheduler's `pause_generation`, `continue_generation`, `flush_cache`,
  `is_fully_idle`; the request dataclasses from io_struct. Their modules do not import here (model_runner and
  io_struct pull transformers 5.3 APIs; this environment has 5.25), so each definition is compiled from its
  module's source, with the module's own import statements executed where they import.
They run on stand-ins: a model that records `load_weights`, a scheduler whose batches are lists of request ids.
The HTTP front replaces SGLang's HTTP server and tokenizer manager (status 200 on success, 400 otherwise, as its
routes answer; the weight version published on success). A failed assert in the scheduler ends it, as in SGLang:
every later call answers 500.

Importing sglang.srt.utils needs three modules of SGLang's GPU stack that cannot install beside this CPU torch:
`torchvision` (PyPI's build fails beside torch 2.13; SGLang imports `torchvision.io.decode_jpeg` at module level),
`sgl_kernel` and `flashinfer` (CUDA-only). Those three, and only those, are stubbed when they do not import.
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import sys
import types
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sglang_source

ROOT, WHY_NOT = sglang_source.installed_root()
STUBBED = ("torchvision", "sgl_kernel", "flashinfer")


def _stub_gpu_stack() -> list[str]:
    stubbed = []
    for name in STUBBED:
        try:
            importlib.import_module(name)
        except Exception:  # ImportError, or torchvision's own failure beside this torch
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    if "torchvision" in stubbed:
        io = sys.modules["torchvision.io"] = types.ModuleType("torchvision.io")
        io.decode_jpeg = None  # bound at import by sglang.srt.utils.common; never called here
        sys.modules["torchvision"].io = io
    return stubbed


def import_sglang_utils() -> types.ModuleType:
    """sglang.srt.utils.common, the real module (see the module docstring for what is stubbed)."""
    _stub_gpu_stack()
    return importlib.import_module("sglang.srt.utils.common")


def definitions(relative: str, names: dict[str, list[str] | None], namespace: dict | None = None) -> dict:
    """Compile top-level definitions of `ROOT/relative` from source into one namespace: `names` maps a
    function or class to None (the whole definition) or, for a class, the methods to take from it (returned as a
    dict of functions under the class name). The module's imports run first, each where it imports."""
    tree = ast.parse((ROOT / relative).read_text())
    module = types.ModuleType(f"sglang_source_{relative.replace('/', '_').removesuffix('.py')}")
    sys.modules[module.__name__] = module  # dataclasses look their module up by name
    module.__dict__.update(namespace or {})
    namespace = module.__dict__
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            try:
                exec(compile(ast.Module([node], []), relative, "exec"), namespace)
            except Exception:  # an import this environment cannot satisfy: its names stay unbound
                pass
    for node in tree.body:
        if getattr(node, "name", None) not in names:
            continue
        methods = names[node.name]
        if methods is None:
            exec(compile(ast.Module([node], []), relative, "exec"), namespace)
            continue
        picked = [item for item in node.body if getattr(item, "name", None) in methods]
        assert len(picked) == len(methods), f"{relative}: {node.name} lacks some of {methods}"
        scope: dict = {}
        for item in picked:
            exec(compile(ast.Module([item], []), relative, "exec"), namespace, scope)
        namespace[node.name] = scope
    return namespace


class RecordingModel:
    """What ModelRunner's update methods hand weights to: records each load_weights call."""

    def __init__(self):
        self.loads: list[list[tuple[str, object]]] = []

    def load_weights(self, weights) -> None:
        self.loads.append([(name, tensor.detach().clone()) for name, tensor in weights])


class StandInBatch:
    """A running batch as the scheduler's pause code uses it: request ids."""

    def __init__(self, reqs=()):
        self.reqs = list(reqs)
        self.batch_is_full = False

    def is_empty(self) -> bool:
        return not self.reqs

    def filter_batch(self, **_) -> None:
        pass

    def retract_all(self, _server_args) -> list:
        reqs, self.reqs = self.reqs, []
        return reqs


def _bind_methods(instance, scope: dict) -> None:
    for name, fn in scope.items():
        setattr(instance, name, types.MethodType(fn, instance))


class SGLangSide:
    """One engine's receiving side: a stand-in ModelRunner, TpModelWorker and Scheduler carrying SGLang's methods."""

    def __init__(self):
        import torch

        common = import_sglang_utils()
        self.requests = _request_types()
        base = {"torch": torch, "logger": logging.getLogger("sglang_runtime"), **self.requests}
        runner_ns = definitions(
            "srt/model_executor/model_runner.py",
            {
                "ModelRunner": [
                    "init_weights_update_group",
                    "destroy_weights_update_group",
                    "update_weights_from_distributed",
                    "update_weights_from_tensor",
                    "_update_weights_from_flattened_bucket",
                ],
                "_unwrap_tensor": None,
                "_model_load_weights_direct": None,
                "LocalSerializedTensor": None,
            },
            {**base, "init_custom_process_group": common.init_custom_process_group},
        )
        worker_ns = definitions(
            "srt/managers/tp_worker.py",
            {"BaseTpWorker": ["init_weights_update_group", "destroy_weights_update_group",
                               "update_weights_from_distributed", "update_weights_from_tensor"]},
            base,
        )  # fmt: skip
        mixin_ns = definitions(
            "srt/managers/scheduler_update_weights_mixin.py",
            {"SchedulerUpdateWeightsMixin": ["init_weights_update_group", "destroy_weights_update_group",
                                             "update_weights_from_distributed", "update_weights_from_tensor"]},
            base,
        )  # fmt: skip
        scheduler_ns = definitions(
            "srt/managers/scheduler.py",
            {"Scheduler": ["flush_cache", "is_fully_idle", "pause_generation", "continue_generation"]},
            base,
        )
        self.model = RecordingModel()
        self.runner = types.SimpleNamespace(
            tp_rank=0, device="cpu", _model_update_group={}, model=self.model,
            server_args=types.SimpleNamespace(custom_weight_loader=[]),
        )  # fmt: skip
        _bind_methods(self.runner, runner_ns["ModelRunner"])
        self.worker = types.SimpleNamespace(model_runner=self.runner, tp_rank=0)
        _bind_methods(self.worker, worker_ns["BaseTpWorker"])
        self.scheduler = self._scheduler(scheduler_ns["DisaggregationMode"])
        _bind_methods(self.scheduler, {**mixin_ns["SchedulerUpdateWeightsMixin"], **scheduler_ns["Scheduler"]})
        self.weight_version = "default"
        self.crashed = ""

    def _scheduler(self, disaggregation_mode) -> types.SimpleNamespace:
        import torch.distributed as dist

        scheduler = types.SimpleNamespace(
            tp_worker=self.worker, draft_worker=None, tp_cpu_group=dist.group.WORLD, server_args=None,
            running_batch=StandInBatch(), waiting_queue=[], chunked_req=None, last_batch=None, cur_batch=None,
            enable_overlap=False, result_queue=deque(), pp_size=1, running_mbs=[],
            dllm_manager=types.SimpleNamespace(any_staging_reqs=lambda: False),
            grammar_manager=types.SimpleNamespace(grammar_queue=[], clear=lambda: None),
            disaggregation_mode=disaggregation_mode.NULL, enable_hierarchical_cache=False, _engine_paused=False, flushes=0,
        )  # fmt: skip
        scheduler._add_request_to_queue = scheduler.waiting_queue.append

        def cleared() -> None:
            scheduler.flushes += 1

        scheduler.tree_cache = types.SimpleNamespace(reset=cleared)
        scheduler.req_to_token_pool = scheduler.token_to_kv_pool_allocator = types.SimpleNamespace(clear=lambda: None)
        scheduler.reset_metrics = lambda: None
        return scheduler

    # ---- the routes --------------------------------------------------------------------------------------
    def call(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/_state":  # the test's own view, also of a dead scheduler
            return 200, self.state()
        if self.crashed:
            return 500, {"success": False, "message": f"the scheduler is dead: {self.crashed}"}
        try:
            return self._route(path, body)
        except AssertionError as e:  # SGLang's scheduler process dies on a failed assert
            self.crashed = str(e) or "AssertionError"
            return 500, {"success": False, "message": self.crashed}
        except Exception as e:  # SGLang's HTTP server answers 500 with the error
            return 500, {"success": False, "message": f"{type(e).__name__}: {e}"}

    def _route(self, path: str, body: dict) -> tuple[int, dict]:
        updates = {
            "/init_weights_update_group": ("InitWeightsUpdateGroupReqInput", "init_weights_update_group"),
            "/destroy_weights_update_group": ("DestroyWeightsUpdateGroupReqInput", "destroy_weights_update_group"),
            "/update_weights_from_distributed": ("UpdateWeightsFromDistributedReqInput", "update_weights_from_distributed"),
            "/update_weights_from_tensor": ("UpdateWeightsFromTensorReqInput", "update_weights_from_tensor"),
        }  # fmt: skip
        if path in updates:
            kind, method = updates[path]
            request = self.requests[kind](**body)
            out = getattr(self.scheduler, method)(request)
            if out.success and getattr(request, "weight_version", None) is not None:
                self.weight_version = request.weight_version
            return (200 if out.success else 400), {"success": out.success, "message": out.message}
        if path == "/pause_generation":
            self.scheduler.pause_generation(self.requests["PauseGenerationReqInput"](**body))
            return 200, {"success": True}
        if path == "/continue_generation":
            self.scheduler.continue_generation(self.requests["ContinueGenerationReqInput"](**body))
            return 200, {"success": True}
        if path == "/flush_cache":
            return (200, {"message": "Cache flushed."}) if self.scheduler.flush_cache() else (400, {"message": "not"})
        if path == "/get_model_info":
            return 200, {"weight_version": self.weight_version}
        if path == "/_add_running":  # the test's own: requests that are decoding when an update starts
            self.scheduler.running_batch.reqs += list(body["rids"])
            return 200, {}
        return 404, {"message": f"{path} is not served here"}

    def state(self) -> dict:
        scheduler = self.scheduler
        return {
            "loads": [[[name, list(t.shape), str(t.dtype), float(t.double().sum())] for name, t in load]
                      for load in self.model.loads],
            "groups": sorted(self.runner._model_update_group),
            "paused": scheduler._engine_paused, "waiting": list(scheduler.waiting_queue),
            "running": list(scheduler.running_batch.reqs), "flushes": scheduler.flushes,
            "weight_version": self.weight_version, "crashed": self.crashed,
        }  # fmt: skip


def _request_types() -> dict[str, type]:
    kinds = ["InitWeightsUpdateGroupReqInput", "DestroyWeightsUpdateGroupReqInput", "UpdateWeightsFromDistributedReqInput",
             "UpdateWeightsFromTensorReqInput", "PauseGenerationReqInput", "ContinueGenerationReqInput"]  # fmt: skip
    outputs = [k.replace("ReqInput", "ReqOutput") for k in kinds[:4]]
    namespace = definitions("srt/managers/io_struct.py", dict.fromkeys(["BaseReq", *kinds, *outputs]))
    return {k: namespace[k] for k in kinds + outputs}


def serve(side: SGLangSide, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            status, answer = side.call(self.path.split("?", 1)[0], body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    return ThreadingHTTPServer((host, 0), Handler)


def main() -> None:
    """Serve one SGLang side on a free port; print its URL, then serve until killed."""
    import signal
    import tempfile

    import torch.distributed as dist

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the folder below is removed on terminate

    # SGLang's runner asserts a default group (its own tensor-parallel world): a world of one, here.
    with tempfile.TemporaryDirectory(prefix="sglang_side_") as folder:
        dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", 1), rank=0, world_size=1)
        server = serve(SGLangSide())
        print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
