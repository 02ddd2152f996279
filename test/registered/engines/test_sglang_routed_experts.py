"""Routing replay cannot switch off silently with SGLang: with routes wanted the launcher adds SGLang's
--enable-return-routed-experts (its own parser reads it as ServerArgs.enable_return_routed_experts, the field
/get_server_info reports), and the start-up check refuses, in one line naming the flag, a server whose
/get_server_info says it runs without it. End to end: the launcher's path started on the embedded server (same
command line) with a Qwen3-MoE whose dense layers sit among the sparse ones answers routes in SGLang's layout."""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sglang_source
import torch

from slime.errors import FlagError
from slime.rollout.engines.base import GenerateRequest, SamplingParams
from slime.rollout.engines.sglang.client import SGLangClient
from slime.rollout.engines.sglang.launcher import (
    ROUTED_EXPERTS_FLAG,
    SGLangEngine,
    SGLangServerConfig,
    check_returns_routed_experts,
    server_command,
)
from slime.testing.ci_register import register_cpu_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_hf import make_tiny_model

register_cpu_ci(est_time=15, suite="base-b-test-cpu")

ROOT, WHY_NOT = sglang_source.installed_root()
needs_sglang = pytest.mark.skipif(ROOT is None, reason=WHY_NOT)


@needs_sglang
def test_routes_wanted_add_the_flag_sglang_parses():
    parser = sglang_source.server_args_parser(ROOT)
    wanted = server_command(SGLangServerConfig("/m", {"log_level": "warning"}, return_routed_experts=True), 1, parser)
    assert parser.parse_args(wanted[3:]).enable_return_routed_experts is True
    plain = server_command(SGLangServerConfig("/m", {"log_level": "warning"}), 1, parser)
    assert parser.parse_args(plain[3:]).enable_return_routed_experts is False
    # given by the user as well (--sglang-enable-return-routed-experts): once
    both = SGLangServerConfig("/m", {"enable_return_routed_experts": "true"}, return_routed_experts=True)
    assert server_command(both, 1, parser).count(ROUTED_EXPERTS_FLAG) == 1
    # /get_server_info answers dataclasses.asdict(ServerArgs): the field the start-up check reads
    assert "enable_return_routed_experts" in sglang_source.dataclass_fields(ROOT, "srt/server_args.py", "ServerArgs")
    assert "GET" in sglang_source.routes(ROOT)["/get_server_info"].methods


class _ServerWithoutTheFlag(BaseHTTPRequestHandler):
    """Answers /get_server_info as an SGLang server started without --enable-return-routed-experts."""

    def do_GET(self) -> None:
        data = json.dumps({"model_path": "/m", "enable_return_routed_experts": False, "version": "0.5.10"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_start_up_check_refuses_a_server_without_the_flag():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ServerWithoutTheFlag)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FlagError) as refused:
            check_returns_routed_experts(SGLangClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=10))
    finally:
        server.shutdown()
    message = str(refused.value)
    assert "\n" not in message and "--enable-return-routed-experts" in message
    assert message.startswith("--use-rollout-routing-replay: the SGLang server at http://127.0.0.1:")


def test_launched_server_answers_routes_of_every_layer(tmp_path):
    folder = tmp_path / "model"
    make_tiny_model("qwen3_moe", folder, seed=5, num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2)
    config = SGLangServerConfig(
        model_path=str(folder),
        launch_module="slime.rollout.engines.embedded.server",
        startup_timeout_s=120,
        log_dir=str(tmp_path),
        env={"OMP_NUM_THREADS": "1"},
        return_routed_experts=True,
    )
    prompt = [5, 6, 7, 8]
    params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    with SGLangEngine(config) as engine:  # the start-up check ran: /get_server_info says routes are on
        assert ROUTED_EXPERTS_FLAG in engine.server.command
        [result] = engine.generate([GenerateRequest("r", prompt, params, return_routed_experts=True)])
    routes = torch.tensor(result.routed_experts).view(len(prompt) + 3 - 1, 4, 2)
    assert not routes[:, [0, 2]].any() and routes[:, [1, 3]].any()
