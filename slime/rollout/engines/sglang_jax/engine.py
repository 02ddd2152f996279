"""sglang-jax adapter (the JAX backend's engine): generate over its SGLang-style HTTP API, update weights by
reloading the server from a checkpoint folder.

sglang-jax (0.0.x) has no weight-update endpoint. So an update is:
  1. tensors -> staged on the host, validated against the serving checkpoint's names and shapes (a bad
     name or shape rejects the whole update; nothing is written, the server keeps serving);
  2. `finish` -> a complete HF checkpoint folder is written under `staging_dir/weights-v<version>`
     (the previous checkpoint's tensors overlaid with the staged ones, plus its config and tokenizer files);
  3. the server is stopped and started again on that folder.
Cost per update: writing the whole checkpoint (model size on disk) plus a full server start: process
start, weight load, and JIT compilation of the model, which for real models takes minutes. Use it with
few, large updates (e.g. --update-weights-interval), not every step for big models. If the new server
fails to start, the old folder is relaunched and the update raises WeightUpdateError.

Pause / resume / release / resume memory are no-ops: the server has no such endpoints, and a reload
replaces its memory anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from slime.net import free_port
from slime.rollout.engines.base import GenerateRequest, GenerateResult, WeightUpdateError
from slime.rollout.engines.sglang.client import SGLangClient
from slime.rollout.engines.sglang.launcher import (
    ServerLaunchError,
    ServerProcess,
    server_argv,
    start_process,
)

WEIGHTS_FILE = "model.safetensors"


def _server_parser() -> argparse.ArgumentParser | None:
    """sglang-jax's own server-argument parser, when it is installed here."""
    try:
        from sgl_jax.srt.server_args import ServerArgs
    except ImportError:
        return None
    parser = argparse.ArgumentParser(prog="sgl_jax.launch_server", add_help=False)
    ServerArgs.add_cli_args(parser)
    return parser


def typed_server_options(options: Mapping[str, str]) -> dict[str, object]:
    """--sglang-* options as sglang-jax's ServerArgs fields, typed by its own parser (the in-process Engine takes
    keyword arguments, not a command line)."""
    parser = _server_parser()
    if parser is None or not options:
        return dict(options)
    parsed = vars(parser.parse_args(["--model-path", "unused", *server_argv(options, parser)]))
    return {name: parsed[name] for name in options}


def checkpoint_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """name -> shape for every tensor of an HF safetensors checkpoint (reads headers only)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise WeightUpdateError(f"{path}: no *.safetensors files")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 -- safetensors handles are not iterable
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def write_updated_checkpoint(base: str, updates: Mapping[str, torch.Tensor], out_dir: str) -> str:
    """Write base's tensors overlaid with `updates` (same dtype as base) plus base's other files to out_dir.

    Written to a temporary sibling and renamed, so a crash never leaves a half-written folder behind.
    """
    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(base, "*.safetensors"))):
        tensors.update(load_file(file))
    for name, tensor in updates.items():
        tensors[name] = tensor.to(tensors[name].dtype).contiguous()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".writing-", dir=parent)
    for entry in os.listdir(base):
        source = os.path.join(base, entry)
        if entry.endswith(".safetensors") or entry.endswith(".safetensors.index.json") or not os.path.isfile(source):
            continue
        shutil.copy2(source, os.path.join(tmp, entry))
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


@dataclass(frozen=True)
class SGLangJaxServerConfig:
    model_path: str
    staging_dir: str  # where updated checkpoints are written (needs room for two model copies)
    server_options: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"  # the address the server binds
    advertise: str | None = None  # the address in its URL (default: host)
    port: int = 0
    startup_timeout_s: float = 1800.0
    request_timeout_s: float = 600.0
    log_dir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    launch_module: str = "sgl_jax.launch_server"  # CPU contract tests point this at the embedded server
    keep_versions: int = 2  # staged checkpoint folders kept on disk (the serving one included)
    python: str = sys.executable


class SGLangJaxEngine(SGLangClient):
    def __init__(self, config: SGLangJaxServerConfig, parser: argparse.ArgumentParser | None = None):
        self.config = config
        self.port = config.port or free_port(config.host)
        self._passthrough = (
            server_argv(config.server_options, parser or _server_parser()) if config.server_options else []
        )
        self._serving_path = config.model_path
        self._shapes = checkpoint_tensor_shapes(config.model_path)
        self._staged: dict[str, torch.Tensor] = {}
        self._version = 0
        self._written: list[str] = []
        super().__init__(f"http://{config.advertise or config.host}:{self.port}", timeout_s=config.request_timeout_s)
        self.server: ServerProcess = self._launch(config.model_path)

    def _launch(self, model_path: str) -> ServerProcess:
        command = [
            self.config.python,
            "-m",
            self.config.launch_module,
            "--model-path",
            model_path,
            "--host",
            self.config.host,
            "--port",
            str(self.port),
            *self._passthrough,
        ]
        server = start_process(command, self.url, self.config.log_dir, f"sglang-jax-{self.port}", self.config.env)
        try:
            server.wait_ready(self.config.startup_timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    # ---- generation: results carry the version this adapter tracks (the server does not know it) ---------
    async def async_generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        results = await super().async_generate(requests)
        return [dataclasses.replace(r, weight_version=self._version) for r in results]

    # ---- weights -------------------------------------------------------------------------------------
    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, finish: bool = True
    ) -> None:
        bucket = list(named_tensors)
        for name, tensor in bucket:
            expected = self._shapes.get(name)
            if expected is None:
                self._staged.clear()
                raise WeightUpdateError(
                    f"weight update rejected: unknown tensor name {name!r} (not in {self._serving_path})"
                )
            if tuple(tensor.shape) != expected:
                self._staged.clear()
                raise WeightUpdateError(
                    f"weight update rejected: {name!r} has shape {tuple(tensor.shape)}, the model expects {expected}"
                )
        for name, tensor in bucket:
            self._staged[name] = tensor.detach().to("cpu", copy=True)
        if not finish:
            return
        staged, self._staged = self._staged, {}
        out_dir = os.path.join(self.config.staging_dir, f"weights-v{version}")
        write_updated_checkpoint(self._serving_path, staged, out_dir)
        self._reload(out_dir, version)
        self._written.append(out_dir)
        self._prune_written()

    def update_weights_from_disk(self, path: str, version: int) -> None:
        self._staged.clear()
        shapes = checkpoint_tensor_shapes(path)
        if shapes != self._shapes:
            raise WeightUpdateError(
                f"{path}: its tensors (names or shapes) differ from the serving checkpoint {self._serving_path}"
            )
        self._reload(path, version)

    def _reload(self, path: str, version: int) -> None:
        self.server.stop()
        try:
            self.server = self._launch(path)
        except ServerLaunchError as error:
            self.server = self._launch(self._serving_path)  # keep serving the old weights
            raise WeightUpdateError(
                f"reloading from {path} failed; still serving {self._serving_path}: {error}"
            ) from None
        self._serving_path = path
        self._version = int(version)

    def _prune_written(self) -> None:
        while len(self._written) > self.config.keep_versions:
            old = self._written.pop(0)
            if old != self._serving_path:
                shutil.rmtree(old, ignore_errors=True)

    @property
    def serving_path(self) -> str:
        return self._serving_path

    @property
    def weight_version(self) -> int:
        return self._version

    # ---- control: no server support; see the module docstring --------------------------------------------
    def pause(self, mode: str = "in_place") -> None:
        """No-op: sglang-jax has no pause endpoint."""

    def resume(self) -> None:
        """No-op."""

    def release_memory(self, tags: list[str] | None = None) -> None:
        """No-op: the server keeps its memory until the next reload."""

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """No-op."""

    def health(self) -> bool:
        return self.server.process.poll() is None and super().health()

    def shutdown(self) -> None:
        self.server.stop()


__all__ = ["SGLangJaxEngine", "SGLangJaxServerConfig", "checkpoint_tensor_shapes", "write_updated_checkpoint"]
