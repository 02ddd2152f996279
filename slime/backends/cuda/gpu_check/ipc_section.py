"""IPC weight handles between two processes on one GPU, received by SGLang's own code.

This process flattens a bucket of HF-named tensors (slime.rollout.engines.protocol.flatten_bucket) and serialises
it with the one IPC serialiser (slime.backends.cuda.ipc: CUDA handles carrying the device's UUID). A second,
spawned process receives the string as an SGLang scheduler does for /update_weights_from_tensor with
load_format "flattened_bucket": monkey_patch_torch_reductions() (UUID -> its device index), then
MultiprocessingSerializer.deserialize, then FlattenedTensorBucket.reconstruct_tensors. It sends back every
tensor's bytes and device, then writes a marker into the flat tensor it mapped: seeing the marker here proves the
handle mapped this process's memory (no copy). With --dry-run-on-cpu the same path runs on CPU tensors in shared
memory (no CUDA handle, no UUID)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import traceback
import types

from slime.backends.cuda.gpu_check.common import CheckContext
from slime.backends.cuda.gpu_check.needs import SGLANG_STUBBED

MARKER = (0xA5, 0x5A, 0xC3, 0x3C)
ANSWER_TIMEOUT_S = 90  # spawn + torch + CUDA context + SGLang's imports in the receiver


class _StubModule(types.ModuleType):
    """A stand-in for a package SGLang imports at module level but the receiving path never calls."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def absent(*_args, **_kwargs):
            raise RuntimeError(f"{self.__name__}.{attr} is a gpu_check stub: the package is not installed")

        return absent


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _tensor_bytes(tensor) -> bytes:
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _sglang_receive(payload: str) -> tuple[dict, object]:
    """What SGLang's tp_worker and model_runner do with one rank's flattened-bucket payload."""
    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    monkey_patch_torch_reductions()
    received = MultiprocessingSerializer.deserialize(payload)
    metadata = [
        FlattenedTensorMetadata(
            name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx, end_idx=m.end_idx, numel=m.numel
        )
        for m in received["metadata"]
    ]
    flat = received["flattened_tensor"]
    named = FlattenedTensorBucket(flattened_tensor=flat, metadata=metadata).reconstruct_tensors()
    return {name: (str(t.device), str(t.dtype), _tensor_bytes(t)) for name, t in named}, flat


def receive(conn) -> None:
    """The spawned receiver (an SGLang scheduler's part): one payload in, tensors' bytes out, then the marker."""
    try:
        stubbed = tuple(name for name in SGLANG_STUBBED if importlib.util.find_spec(name) is None)
        sys.meta_path.insert(0, _StubFinder(stubbed))
        import torch

        tensors, flat = _sglang_receive(conn.recv())
        conn.send({"tensors": tensors, "stubbed": list(stubbed), "flat_device": str(flat.device)})
        flat[: len(MARKER)] = torch.tensor(MARKER, dtype=torch.uint8)
        if flat.is_cuda:
            torch.cuda.synchronize()
        conn.send({"marker_written": True})
        conn.recv()  # hold the mapping until the sender has looked
    except Exception as exc:  # the sender reports it; a dead receiver would only time out
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})


def _bucket(device):
    """HF-named tensors of the dtypes a weight bucket carries, one non-contiguous."""
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 48, generator=g)
    return [
        ("model.layers.0.self_attn.q_proj.weight", q.to(device=device, dtype=torch.bfloat16)),
        ("model.layers.0.mlp.down_proj.weight", q.t().to(device)),  # a transposed view: flatten makes it contiguous
        ("model.norm.weight", torch.rand(48, generator=g).to(device=device, dtype=torch.float16)),
        ("model.layers.0.mlp.experts_ids", torch.arange(7, dtype=torch.int64, device=device)),
    ]


def _answer(conn, timeout_s: float, receiver) -> dict:
    try:
        if conn.poll(timeout_s):
            return conn.recv()
    except EOFError:
        receiver.join(timeout=5)
        return {"error": f"the receiving process died (exit code {receiver.exitcode}) before answering"}
    return {"error": f"the receiving process did not answer within {timeout_s:.0f} s"}


def check_ipc_sglang(ctx: CheckContext) -> dict:
    import torch
    import torch.multiprocessing as mp

    from slime.backends.cuda.ipc import serialize_ipc_named_tensors
    from slime.rollout.engines.protocol import flatten_bucket

    named = _bucket(ctx.backend.torch_device())
    bucket = flatten_bucket(named)  # kept alive until the receiver is done: the handles point into it
    payload = serialize_ipc_named_tensors(bucket)
    expected = {name: (str(t.dtype), _tensor_bytes(t)) for name, t in named}
    spawn = mp.get_context("spawn")
    here, there = spawn.Pipe()
    receiver = spawn.Process(target=receive, args=(there,), daemon=True)
    receiver.start()
    try:
        here.send(payload)
        timeout = min(ANSWER_TIMEOUT_S, max(ctx.seconds_left(), 1.0))
        reply = _answer(here, timeout, receiver)
        written = _answer(here, 30, receiver) if "error" not in reply else {}
        if ctx.on_gpu:
            torch.cuda.synchronize()
        seen = tuple(bucket["flattened_tensor"][: len(MARKER)].cpu().tolist())
        if receiver.is_alive():
            here.send("done")
    finally:
        receiver.join(timeout=10)
        if receiver.is_alive():
            receiver.kill()
    return _ipc_verdict(ctx, expected, reply, written, seen, len(payload))


def _ipc_verdict(ctx: CheckContext, expected: dict, reply: dict, written: dict, seen: tuple, payload_chars: int):
    if "error" in reply:
        return {"ok": False, "error": reply["error"], "traceback": reply.get("traceback", "")}
    received = reply["tensors"]
    mismatched = [n for n, (dtype, raw) in expected.items() if received.get(n, (None, None, None))[1:] != (dtype, raw)]
    devices = sorted({device for device, _, _ in received.values()})
    want_device = "cuda" if ctx.on_gpu else "cpu"
    result = {
        "payload_chars": payload_chars,
        "tensors": len(expected),
        "bytes": sum(len(raw) for _, raw in expected.values()),
        "received_on": devices,
        "stubbed_modules": reply["stubbed"],
        "mismatched": mismatched,
        "receiver_wrote_into_sender_memory": written.get("marker_written", False) and seen == MARKER,
    }
    if "error" in written:
        result["error"] = written["error"]
    result["ok"] = (
        not mismatched
        and set(received) == set(expected)
        and all(d.startswith(want_device) for d in devices)
        and result["receiver_wrote_into_sender_memory"]
    )
    return result
