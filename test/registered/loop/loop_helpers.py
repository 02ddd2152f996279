"""Shared by the end-to-end loop tests: a tiny arithmetic task and model built locally, one Ray cluster per
test file, and a run-in-one-call helper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slime.config import parse_config
from slime.quickstart import task


def build_task(
    root: Path, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, experts: int = 0, head_dim: int | None = None
) -> dict[str, Path]:
    """The quickstart's "ab+c=" task (train / test / sft jsonl) and a tiny Qwen3 (-MoE with experts) at root/model."""
    split = task.problems(seed)
    files = {
        "train": task.write_jsonl(split["train"], root / "train.jsonl"),
        "test": task.write_jsonl(split["test"][:24], root / "test.jsonl"),
        "sft": task.write_jsonl(split["sft"], root / "sft.jsonl", with_response=True),
        "model": root / "model",
    }
    task.build_model(
        files["model"], seed, hidden_size=hidden_size, num_layers=num_layers, experts=experts, head_dim=head_dim
    )
    return files


def base_flags(files: dict[str, Path], out: Path, **overrides) -> list[str]:
    """A small GRPO run: 4 prompts x 4 samples per rollout, one optimizer step each, 3 rollouts."""
    flags = {
        "hf-checkpoint": files["model"],
        "prompt-data": files["train"],
        # a random tiny model never answers right: a reward that varies within groups keeps gradients non-zero
        "custom-rm-path": "loop_plugins.parity_reward",
        "num-rollout": 3,
        "rollout-batch-size": 4,
        "n-samples-per-prompt": 4,
        "global-batch-size": 16,
        "micro-batch-size": 16,
        "rollout-max-response-len": 4,
        "rollout-engine-batch-size": 16,
        "lr": 1e-3,
        "output-dir": out,
        "no-progress": True,
    }
    flags.update(overrides)
    argv: list[str] = []
    for key, value in flags.items():
        if value is False or value is None:
            continue
        argv.append("--" + key)
        if isinstance(value, (list, tuple)):
            argv += [str(v) for v in value]
        elif value is not True:
            argv.append(str(value))
    return argv


def run(files, out: Path, **overrides):
    from slime import loop

    config = parse_config(base_flags(files, out, **overrides))
    return config, loop.train(config)


def run_interrupted_and_resumed(files, tmp_path: Path, **common) -> tuple[Path, Path]:
    """A 3-rollout run saving every step, and a copy of it resumed from its step-2 checkpoint: (full, resumed)
    output folders, for the caller to compare (`common` needs num-rollout 3 and save-interval 1)."""
    import shutil

    full = tmp_path / "full"
    run(files, full, save=tmp_path / "ckpt", **common)
    resumed_root, part = tmp_path / "resumed_ckpt", tmp_path / "part"
    shutil.copytree(tmp_path / "ckpt" / "step_00000002", resumed_root / "step_00000002")
    shutil.copytree(full, part)
    run(files, part, load=resumed_root, save=resumed_root, **common)
    return full, part


def rows(out: Path, phase: str = "rl") -> list[dict]:
    from slime.run_log import read_metrics

    return [r for r in read_metrics(out) if r.get("phase") == phase]


def dumped(folder: Path) -> list[list[dict]]:
    """The samples of each rollout, from --save-debug-rollout-data."""
    return [
        [json.loads(line) for line in path.read_text().splitlines()] for path in sorted(folder.glob("rollout_*.jsonl"))
    ]


def ray_cluster(num_cpus: int = 8):
    """Start Ray for a test module (the runner puts the file in a private network namespace)."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # the workers import this folder's plugins by dotted path (loop_plugins.<name>)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}},
    )
    return ray


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One Ray cluster and one built task per test module (Ray takes seconds to start)."""
    ray = ray_cluster()
    yield build_task(tmp_path_factory.mktemp("task"))
    ray.shutdown()
