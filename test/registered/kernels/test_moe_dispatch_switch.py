"""The MoE dispatch switch: megatron's flex dispatcher over DeepEP only on the NVIDIA backend with deep_ep present,
all-to-all everywhere else; the fields are real megatron-core TransformerConfig fields."""

import dataclasses

import pytest

from slime.backends import SystemView, get_backend_class
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=6, suite="base-a-test-cpu")


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
    assert backend.moe_dispatch_config() == {
        "moe_token_dispatcher_type": "flex",
        "moe_flex_dispatcher_backend": "deepep",
    }
    assert backend.describe()["moe_dispatcher"] == "flex"


def test_cuda_without_deep_ep_or_on_one_rank_falls_back_to_alltoall():
    backend = get_backend_class("cuda")(system_with(set()))
    assert backend.moe_dispatch_config() == {"moe_token_dispatcher_type": "alltoall"}
    one_rank = get_backend_class("cuda")(system_with({"deep_ep"})).moe_dispatch_config(expert_comm_ranks=1)
    assert one_rank == {"moe_token_dispatcher_type": "alltoall"}  # megatron's flex dispatcher needs TP x EP > 1


@pytest.mark.parametrize("name", ["cpu", "rocm", "tpu"])
def test_other_backends_use_alltoall_even_with_deep_ep_installed(name):
    backend = get_backend_class(name)(system_with({"deep_ep"}))
    assert backend.moe_dispatch_config() == {"moe_token_dispatcher_type": "alltoall"}
    assert backend.moe_dispatch_config()["moe_token_dispatcher_type"] == backend.capabilities.moe_dispatchers[0]


def test_the_fields_are_megatron_transformer_config_fields():
    from megatron.core.transformer import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    backend = get_backend_class("cuda")(system_with({"deep_ep"}))
    assert set(backend.moe_dispatch_config()) <= names
