"""`slime quickstart --moe` end to end at a tiny size: a Qwen3-MoE built locally, SFT warm-up, GRPO with the
experts split over two trainer processes (megatron's --expert-model-parallel-size 2), evaluation, summary."""

import json

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=75, suite="base-c-test-cpu")


def test_quickstart_moe_runs_end_to_end(tmp_path, monkeypatch):
    from slime.quickstart.run import main
    from slime.run_log import read_metrics

    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh local cluster even if another one's address file is around
    argv = ["--moe", "--output-dir", str(tmp_path), "--num-rollout", "2", "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "4", "--sft-steps", "2", "--eval-size", "8", "--eval-interval", "1",
            "--hidden-size", "32", "--num-layers", "2"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts_per_tok"] == 2
    rl = [m for m in read_metrics(tmp_path / "run") if m.get("phase") == "rl"]
    assert len(rl) == 2 and all(m["train/moe/load_imbalance"] >= 1.0 for m in rl)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["sft_steps"] >= 1
