"""--rollout-engine against the backend's declared engines (Capabilities.rollout_engines): defaults, refusals in
one line before Ray starts, and the engine kind the workers are told to start."""

import pytest

from slime.backends import select_backend
from slime.backends.base import SystemView
from slime.config import ConfigError, parse_config
from slime.rollout.engines.selection import default_rollout_engine, rollout_engine
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=5, suite="base-a-test-cpu")

CPU_STACK = ("torch", "megatron.core", "transformers", "safetensors", "ray")
TPU_STACK = ("jax", "libtpu", "flax", "optax")


def system(modules, dirs=None):
    return SystemView(lambda m: m in modules, lambda d: None, lambda p: False, lambda p: (dirs or {}).get(p, []), {})


def config(extra: str = ""):
    return parse_config(["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rm-type", "math", *extra.split()])


def test_defaults_follow_the_declared_order_and_what_is_installed():
    cpu = select_backend("cpu", system(CPU_STACK + ("jax",)))
    assert cpu.capabilities.rollout_engines == ("embedded", "jax")
    assert rollout_engine(config(), cpu) == "embedded"
    assert rollout_engine(config("--rollout-engine jax"), cpu) == "jax"
    tpu_dirs = {"/dev": ["accel0"]}
    assert default_rollout_engine(select_backend("tpu", system(TPU_STACK + ("sgl_jax",), tpu_dirs))) == "sglang_jax"
    assert rollout_engine(config(), select_backend("tpu", system(TPU_STACK, tpu_dirs))) == "jax"


@pytest.mark.parametrize(
    "modules, flag, message",
    [
        (
            CPU_STACK + ("jax",),
            "sglang",
            "--rollout-engine sglang: the cpu hardware backend runs embedded, jax engines",
        ),
        (CPU_STACK, "jax", "--rollout-engine jax needs the jax package: pip install jax"),
    ],
)
def test_refusals_are_one_line(modules, flag, message):
    with pytest.raises(ConfigError) as error:
        rollout_engine(config(f"--rollout-engine {flag}"), select_backend("cpu", system(modules)))
    assert str(error.value) == message


def test_the_flag_only_takes_known_engines():
    with pytest.raises(ConfigError, match="--rollout-engine: invalid choice: 'vllm'"):
        config("--rollout-engine vllm")
