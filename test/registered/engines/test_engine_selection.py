"""--rollout-engine against the backend's declared engines (Capabilities.rollout_engines): defaults, refusals in
one line before Ray starts, and the engine kind the workers are told to start."""

import pytest

from slime.backends import select_backend
from slime.backends.base import SystemView
from slime.config import ConfigError, parse_config
from slime.rollout.engines.selection import default_rollout_engine
from slime.settings import chosen_rollout_engine
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
    assert cpu.capabilities.rollout_engines == ("embedded", "jax", "sglang_jax")
    assert chosen_rollout_engine(config(), cpu) == "embedded"
    assert chosen_rollout_engine(config("--rollout-engine jax"), cpu) == "jax"
    tpu_dirs = {"/dev": ["accel0"]}
    assert (
        default_rollout_engine(select_backend("tpu", system(TPU_STACK + ("sgl_jax",), tpu_dirs))) == "jax"
    )  # sglang-jax runs when asked for (--rollout-engine sglang_jax)
    assert chosen_rollout_engine(config(), select_backend("tpu", system(TPU_STACK, tpu_dirs))) == "jax"


@pytest.mark.parametrize(
    "modules, flag, message",
    [
        (
            CPU_STACK + ("jax",),
            "sglang",
            "--rollout-engine sglang: the cpu hardware backend runs embedded, jax, sglang_jax engines",
        ),
        (CPU_STACK, "jax", "--rollout-engine jax needs the jax package: pip install jax"),
    ],
)
def test_refusals_are_one_line(modules, flag, message):
    with pytest.raises(ConfigError) as error:
        chosen_rollout_engine(config(f"--rollout-engine {flag}"), select_backend("cpu", system(modules)))
    assert str(error.value) == message


def test_the_flag_only_takes_known_engines():
    with pytest.raises(ConfigError, match="--rollout-engine: invalid choice: 'vllm'"):
        config("--rollout-engine vllm")


# sglang-jax's own lines (sgl-project/sglang-jax, python/sgl_jax/srt/...) the in-process adapter relies on
SGLANG_JAX_WITH_SINGLE_PROCESS = {
    "srt/server_args.py": "class ServerArgs:\n    disable_radix_cache: bool = False\n    enable_single_process: bool = False\n",
    "srt/entrypoints/engine.py": "        self.tokenizer_manager = tokenizer_manager\n        self.scheduler_info = scheduler_info\n",
    "srt/model_executor/model_runner.py": "        self.model_state_leaves, model_state_def = jax.tree_util.tree_flatten(s)\n",
}


def test_sglang_jax_runs_in_process_only_when_its_source_has_what_the_adapter_uses():
    from slime.rollout.engines.selection import sglang_jax_in_process_problem

    assert sglang_jax_in_process_problem(SGLANG_JAX_WITH_SINGLE_PROCESS, "0.0.3") is None
    older = dict(SGLANG_JAX_WITH_SINGLE_PROCESS, **{"srt/server_args.py": "class ServerArgs:\n    tp_size: int = 1\n"})
    assert sglang_jax_in_process_problem(older, "0.0.2") == (
        "sglang-jax 0.0.2: ServerArgs has no enable_single_process (sgl_jax/srt/server_args.py)"
    )
    # a comment or a use elsewhere is no field
    mention = dict(older, **{"srt/server_args.py": "# enable_single_process: bool = False\nx = enable_single_process"})
    assert "no enable_single_process" in sglang_jax_in_process_problem(mention, "0.0.2")
    no_runner = dict(SGLANG_JAX_WITH_SINGLE_PROCESS, **{"srt/model_executor/model_runner.py": None})
    assert sglang_jax_in_process_problem(no_runner, None) == (
        "sglang-jax (version unknown): its model runner has no model_state_leaves to rebind "
        "(sgl_jax/srt/model_executor/model_runner.py)"
    )


def test_without_sglang_jax_here_the_mode_is_the_restart_adapter_with_its_reason():
    pytest.importorskip("jax")
    import importlib.util

    from slime.rollout.engines.selection import sglang_jax_mode

    if importlib.util.find_spec("sgl_jax") is not None:
        pytest.skip("sglang-jax is installed here: the mode follows its source (covered above)")
    in_process, reason = sglang_jax_mode()
    assert not in_process
    assert reason == (
        "sglang-jax restarts its server on every weight update: sglang-jax (version unknown): ServerArgs has no "
        "enable_single_process (sgl_jax/srt/server_args.py) (in-process needs a newer one)"
    )


@pytest.mark.parametrize(
    "colocate, family, kind, engines, sglang_jax_in_process, hosted",
    [
        (True, "jax", "jax", 1, False, True),
        (True, "jax", "sglang_jax", 1, True, True),  # sglang-jax in process lives in the trainer too
        (True, "jax", "sglang_jax", 1, False, False),  # its restarted server cannot
        (True, "jax", "jax", 2, False, False),  # two engines: their own actors
        (False, "jax", "jax", 1, False, False),
        (True, "megatron", "embedded", 1, False, False),
    ],
)
def test_which_engines_live_in_the_trainer_process(colocate, family, kind, engines, sglang_jax_in_process, hosted):
    from slime.rollout.engines.selection import engine_in_trainer_process

    assert engine_in_trainer_process(colocate, family, kind, engines, sglang_jax_in_process) is hosted


def test_the_tpu_accuracy_nightly_flags_pass_the_start_up_check_with_the_engine_in_the_trainer(tmp_path):
    """test/registered/nightly/test_grpo_gsm8k.py on a TPU: the quickstart --colocate with the JAX pair passed
    through. Checked here on CPU against the TPU backend, before anything starts."""
    pytest.importorskip("jax")
    from slime.backends import backend_for_worker
    from slime.backends.capability_check import check_against_capabilities
    from slime.quickstart.run import parse_args, train_flags
    from slime.settings import engine_hosted_by_trainer, run_needs

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    files = {name: tmp_path / f"{name}.jsonl" for name in ("train", "test", "val", "sft")}
    args = parse_args(["--colocate", "--", "--train-backend", "jax", "--rollout-engine", "jax"])
    run = parse_config(train_flags(args, tmp_path, files))
    tpu = backend_for_worker("tpu")
    assert check_against_capabilities(run_needs(run, tpu), tpu) == []
    assert engine_hosted_by_trainer(run, tpu)
