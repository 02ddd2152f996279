"""Launch SGLang servers (and optionally sglang-router) as subprocesses, wait until they serve.

Server arguments come from the config's `--sglang-*` pass-through (`Config.sglang`: {"mem_fraction_static":
"0.7", "enable_memory_saver": "true", ...}) and are checked against the installed sglang's own
ServerArgs parser, so every SGLang option works without being re-declared here and a typo fails at
launch with SGLang's message. Readiness is polled over HTTP with a deadline; a server that exits or
never answers raises ServerLaunchError carrying the tail of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from slime.errors import FlagError
from slime.net import free_port
from slime.rollout.engines.base import EngineError
from slime.rollout.engines.sglang.client import SGLangClient

# Options the launcher owns: they come from the engine's own fields, not the pass-through.
RESERVED_SERVER_OPTIONS = ("model_path", "host", "port")
# SGLang answers return_routed_experts only when started with this; /get_server_info reports it.
ROUTED_EXPERTS_FLAG = "--enable-return-routed-experts"


class ServerLaunchError(EngineError):
    """A server did not become ready; the message ends with its last log lines."""


def _sglang_parser() -> argparse.ArgumentParser | None:
    """SGLang's own server-argument parser, or None when sglang is not installed here."""
    try:
        from sglang.srt.server_args import ServerArgs
    except ImportError:
        return None
    parser = argparse.ArgumentParser(prog="sglang.launch_server", add_help=False)
    ServerArgs.add_cli_args(parser)
    return parser


def server_argv(options: Mapping[str, str], parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Config.sglang ({"mem_fraction_static": "0.7", "enable_memory_saver": "true"}) -> SGLang CLI args.

    With SGLang's parser (read from the installed sglang, or passed in), a flag option gets no value,
    an unknown name is an error naming `--sglang-<name>`, and the values are checked by SGLang's types.
    Without it, "true" is taken to mean a bare flag and the rest pass through unchecked.
    """
    parser = parser if parser is not None else _sglang_parser()
    flags: dict[str, argparse.Action] = {}
    if parser is not None:
        for action in parser._actions:  # the public way to enumerate an argparse parser's options
            for option in action.option_strings:
                flags[option] = action
    argv: list[str] = []
    for name, value in options.items():
        if name in RESERVED_SERVER_OPTIONS:
            raise EngineError(f"--sglang-{name.replace('_', '-')} is set by slime itself; drop it")
        candidates = [f"--{name.replace('_', '-')}", f"--{name}"]
        option = next((c for c in candidates if c in flags), candidates[0])
        action = flags.get(option)
        if parser is not None and action is None:
            raise EngineError(
                f"--sglang-{name.replace('_', '-')}: the installed sglang has no server option {candidates[0]}"
            )
        takes_value = action.nargs != 0 if action is not None else str(value).lower() != "true"
        if not takes_value:
            if str(value).lower() in ("true", "1", "yes"):
                argv.append(option)
            continue
        argv += [option, str(value)]
    if parser is not None:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parser.parse_args(["--model-path", "x", *argv])
            except SystemExit:
                raise EngineError(
                    f"--sglang-* options rejected by sglang: {err.getvalue().strip().splitlines()[-1]}"
                ) from None
    return argv


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return "(no log)"


def _ready(url: str, path: str) -> bool:
    try:
        with urllib.request.urlopen(url + path, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ServerProcess:
    """A server subprocess: its URL, process and log file. stop() ends it (and its children)."""

    url: str
    process: subprocess.Popen
    log_path: str
    command: list[str] = field(default_factory=list)

    def tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def wait_ready(self, timeout_s: float, health_path: str = "/health_generate") -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerLaunchError(
                    f"server `{' '.join(self.command[:4])} ...` exited with code {code} before becoming ready "
                    f"(log {self.log_path}); last lines:\n{self.tail()}"
                )
            if _ready(self.url, health_path):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerLaunchError(
                    f"server at {self.url} not ready after {timeout_s:.0f}s (log {self.log_path}); last lines:\n{self.tail()}"
                )
            time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        # The server runs in its own session: signal the whole group (SGLang forks scheduler processes).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace_s)


def start_process(
    command: list[str], url: str, log_dir: str | None, name: str, env: Mapping[str, str] | None = None
) -> ServerProcess:
    log_dir = log_dir or tempfile.mkdtemp(prefix="slime-servers-")
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    log = open(log_path, "ab")  # noqa: SIM115 -- the server process writes to it; closed when the server stops
    try:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    finally:
        log.close()  # the child holds its own descriptor
    return ServerProcess(url, process, log_path, command)


@dataclass(frozen=True)
class SGLangServerConfig:
    model_path: str
    server_options: Mapping[str, str] = field(default_factory=dict)  # Config.sglang pass-through
    host: str = "127.0.0.1"  # the address the server binds
    advertise: str | None = None  # the address in its URL (default: host; a server on 0.0.0.0: its node's)
    port: int = 0  # 0 = a free port
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 600.0
    log_dir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. the backend's visible-devices variable
    launch_module: str = "sglang.launch_server"  # tests point this at the embedded server
    python: str = sys.executable
    return_routed_experts: bool = False  # the rollout asks for every token's experts (routing replay)


def server_command(config: SGLangServerConfig, port: int, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The server's command line: interpreter, module, then the arguments SGLang's ServerArgs parser reads."""
    passthrough = server_argv(config.server_options, parser) if config.server_options else []
    if config.return_routed_experts and ROUTED_EXPERTS_FLAG not in passthrough:
        passthrough.append(ROUTED_EXPERTS_FLAG)
    return [
        config.python,
        "-m",
        config.launch_module,
        "--model-path",
        config.model_path,
        "--host",
        config.host,
        "--port",
        str(port),
        *passthrough,
    ]


def check_returns_routed_experts(server: SGLangClient) -> None:
    """Refuse a server that would drop return_routed_experts (the trainer would replay nothing): SGLang
    returns routes only when started with --enable-return-routed-experts, and /get_server_info says so."""
    info = server.request("GET", "/get_server_info")
    if not isinstance(info, dict) or info.get("enable_return_routed_experts") is not True:
        raise FlagError(
            f"--use-rollout-routing-replay: the SGLang server at {server.url} runs without "
            f"{ROUTED_EXPERTS_FLAG} (its /get_server_info says so), so it returns no routed experts; start it with that flag"
        )


class SGLangEngine(SGLangClient):
    """Starts one SGLang server and is its client. Use as a context manager or call shutdown()."""

    def __init__(self, config: SGLangServerConfig, parser: argparse.ArgumentParser | None = None):
        self.config = config
        port = config.port or free_port(config.host)
        url = f"http://{config.advertise or config.host}:{port}"
        command = server_command(config, port, parser)
        self.server = start_process(command, url, config.log_dir, f"sglang-{port}", config.env)
        super().__init__(url, timeout_s=config.request_timeout_s)
        try:
            self.server.wait_ready(config.startup_timeout_s)
            if config.return_routed_experts:
                check_returns_routed_experts(self)
        except BaseException:
            self.server.stop()
            raise

    def health(self) -> bool:
        return self.server.process.poll() is None and super().health()

    def shutdown(self) -> None:
        self.server.stop()


def launch_router(
    worker_urls: list[str],
    host: str = "127.0.0.1",
    port: int = 0,
    timeout_s: float = 120.0,
    log_dir: str | None = None,
    extra_args: list[str] | None = None,
) -> ServerProcess:
    """Start sglang-router in front of `worker_urls`; returns once it answers /health."""
    port = port or free_port(host)
    command = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--worker-urls",
        *worker_urls,
        *(extra_args or []),
    ]
    router = start_process(command, f"http://{host}:{port}", log_dir, f"router-{port}")
    router.wait_ready(timeout_s, health_path="/health")
    return router
