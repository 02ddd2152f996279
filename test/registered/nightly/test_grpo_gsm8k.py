"""Nightly accuracy on one GPU: the quickstart's task and tiny model, built locally as on CPU (no environment
variables, no hub), trained with trainer and engine colocated on the one device (--colocate, steps in turn).
Held-out accuracy must rise by the stored minimum gain (accuracy_thresholds.json, "quickstart_gpu").

On a TPU the pair is the JAX one (--train-backend jax --rollout-engine jax, passed through the quickstart): colocated
on the one chip, the engine runs inside the trainer's process and takes each update device to device, so no chip
is split between processes (Ray schedules TPU chips only whole). Same task, model builder and thresholds.
"""

import json
from pathlib import Path

from slime.testing.ci_register import register_cuda_ci, register_rocm_ci, register_tpu_ci

register_cuda_ci(est_time=1800, suite="nightly-accuracy-1-gpu", nightly=True)
register_rocm_ci(est_time=1800, suite="nightly-accuracy-1-gpu-amd", nightly=True)
register_tpu_ci(est_time=1800, suite="nightly-accuracy-tpu", nightly=True)

# The pair each hardware's nightly runs, as quickstart flags (after `--`: passed to `slime train`).
PAIR_FLAGS = {"tpu": ["--", "--train-backend", "jax", "--rollout-engine", "jax"]}

THRESHOLDS = json.loads((Path(__file__).with_name("accuracy_thresholds.json")).read_text())["quickstart_gpu"]


def test_colocated_quickstart_learns_on_one_device(tmp_path):
    from slime.backends import select_backend
    from slime.quickstart.run import main

    pair = PAIR_FLAGS.get(select_backend("auto").name, [])
    assert main(["--output-dir", str(tmp_path), "--colocate", *pair]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["heldout_accuracy_after_sft"], summary["heldout_accuracy_after_rl"]
    assert after - before >= THRESHOLDS["min_gain"] - THRESHOLDS["allowed_float"], (
        f"RL raised held-out accuracy only {before:.1%} -> {after:.1%}"
    )
    assert after >= THRESHOLDS["after_rl_min"] - THRESHOLDS["allowed_float"], f"held-out accuracy after RL {after:.1%}"
