"""The MoE dispatch switch: DeepEP (megatron flex dispatcher) only on the NVIDIA backend with deep_ep present,
all-to-all everywhere else. (That its megatron-core settings are real TransformerConfig fields is checked in
test_moe_alltoall_gloo.py, which can afford the megatron import.)"""

import pytest

from slime.backends import SystemView, get_backend_class
from slime.backends.moe_dispatch import choose_moe_dispatch, make_token_dispatcher
from slime.kernels.moe_dispatch import AllToAllTokenDispatcher
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=4, suite="base-a-test-cpu")


def system_with(modules):
    return SystemView(
        has_module=lambda m: m in modules,
        dist_version=lambda d: None,
        path_exists=lambda p: False,
        list_dir=lambda p: [],
        environ={},
    )


def test_cuda_with_deep_ep_uses_the_flex_dispatcher_with_deepep():
    backend = get_backend_class("cuda")(system_with({"deep_ep"}))
    choice = choose_moe_dispatch(backend)
    assert choice.megatron_config() == {"moe_token_dispatcher_type": "flex", "moe_flex_dispatcher_backend": "deepep"}
    assert "deep_ep installed" in choice.reason


def test_cuda_without_deep_ep_falls_back_to_alltoall_and_says_why():
    choice = choose_moe_dispatch(get_backend_class("cuda")(system_with(set())))
    assert choice.megatron_config() == {"moe_token_dispatcher_type": "alltoall"}
    assert choice.reason == "cuda: deep_ep not installed, all-to-all instead"


@pytest.mark.parametrize("name", ["cpu", "rocm", "tpu"])
def test_other_backends_use_alltoall_even_with_deep_ep_installed(name):
    choice = choose_moe_dispatch(get_backend_class(name)(system_with({"deep_ep"})))
    assert choice.megatron_config() == {"moe_token_dispatcher_type": "alltoall"}


def test_cpu_builds_the_alltoall_dispatcher():
    dispatcher = make_token_dispatcher(get_backend_class("cpu")(system_with(set())), num_experts=4)
    assert isinstance(dispatcher, AllToAllTokenDispatcher) and dispatcher.local_experts == 4
