"""`slime quickstart --lora` end to end at a tiny size: SFT of the whole model exported with --save-hf, then GRPO
with LoRA adapters on that folder (adapter-only weight sync to the embedded engine), --save-lora, summary."""

import json

import torch

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=75, suite="base-c-test-cpu")


def test_quickstart_lora_runs_end_to_end(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from slime.models.lora import merge_hf, read_peft
    from slime.quickstart.run import main
    from slime.run_log import read_metrics

    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh local cluster even if another one's address file is around
    argv = ["--lora", "--lora-rank", "4", "--output-dir", str(tmp_path), "--num-rollout", "2", "--rollout-batch-size",
            "4", "--n-samples-per-prompt", "4", "--sft-steps", "2", "--eval-size", "8", "--eval-interval", "1",
            "--hidden-size", "32", "--num-layers", "2", "--", "--save-hf", str(tmp_path / "merged")]  # fmt: skip
    assert main(argv) == 0
    warm_up = [m for m in read_metrics(tmp_path / "sft_run") if m.get("phase") == "sft"]
    assert warm_up and [m["step"] for m in read_metrics(tmp_path / "sft_run") if m.get("phase") == "rl"] == [0]
    rl = [m for m in read_metrics(tmp_path / "run") if m.get("phase") == "rl"]
    assert len(rl) == 2 and not any(m.get("phase") == "sft" for m in read_metrics(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora"]["lora_rank"] == 4
    # the run's export: the warmed-up model plus (alpha / r) B A of the adapter it wrote
    spec, adapters = read_peft(tmp_path / "adapter")
    expected = merge_hf(load_file(str(tmp_path / "sft_model" / "model.safetensors")), adapters, spec.scaling)
    for name, tensor in load_file(str(tmp_path / "merged" / "model.safetensors")).items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sft_steps"] == len(warm_up) and summary["heldout_accuracy_after_rl"] >= 0
