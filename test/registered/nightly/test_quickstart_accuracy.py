"""Nightly accuracy on CPU: the quickstart trained to completion must reach the stored held-out accuracy.

The thresholds and their allowed float live beside this file (accuracy_thresholds.json), not in code. With
SLIME_NIGHTLY_OUT set (the nightly workflow), the measured accuracies also go through `python -m release perf
--records` like the performance figures: appended to SLIME_NIGHTLY_HISTORY and reported (summary.md and a plot
per metric) under $SLIME_NIGHTLY_OUT/accuracy/.
"""

import json
import os
from pathlib import Path

import pytest

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=2400, suite="nightly-accuracy-cpu", nightly=True)

# The Megatron trainer with the embedded engine (the CPU default), and the all-JAX pair the TPU backend runs.
# The JAX pair keeps the recipe its threshold was measured with (sync, 500 steps, float32).
PAIRS = {
    "megatron_embedded": [],
    "jax_pair": ["--sync", "--num-rollout", "500", "--", "--train-backend", "jax", "--rollout-engine", "jax"],
}
# The quickstart's promise holds for every seed it was measured on; the JAX pair is checked at one seed.
CASES = [("megatron_embedded", 1), ("megatron_embedded", 2), ("megatron_embedded", 3), ("jax_pair", 1)]

ALL_THRESHOLDS = json.loads((Path(__file__).with_name("accuracy_thresholds.json")).read_text())


@pytest.mark.parametrize(("pair", "seed"), CASES)
def test_quickstart_reaches_the_stored_heldout_accuracy(tmp_path, pair, seed):
    from slime.quickstart.run import main

    extra = PAIRS[pair]
    thresholds = ALL_THRESHOLDS.get(f"quickstart_{pair}", ALL_THRESHOLDS["quickstart"])
    assert main(["--output-dir", str(tmp_path), "--seed", str(seed), *extra]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["heldout_accuracy_after_sft"], summary["heldout_accuracy_after_rl"]
    if os.environ.get("SLIME_NIGHTLY_OUT"):
        # the default pair at seed 1 keeps its history's names
        suffix = ("" if pair == "megatron_embedded" else f"_{pair}") + ("" if seed == 1 else f"_seed{seed}")
        report_accuracy(
            Path(os.environ["SLIME_NIGHTLY_OUT"]) / f"accuracy{suffix}", before, after, f"quickstart{suffix}"
        )
    assert before <= thresholds["after_sft_max"] + thresholds["allowed_float"], (
        f"SFT alone already reached {before:.1%}"
    )
    assert after - before >= thresholds["min_gain"] - thresholds["allowed_float"], (
        f"RL raised accuracy only {before:.1%} -> {after:.1%}"
    )
    assert after >= thresholds["after_rl_min"] - thresholds["allowed_float"], (
        f"held-out accuracy after RL {after:.1%} (last three: {summary['heldout_accuracy_last_three']}) is below "
        f"{thresholds['after_rl_min']:.0%} - {thresholds['allowed_float']:.0%}"
    )


def report_accuracy(out: Path, before: float, after: float, name: str) -> None:
    from release import nightly, perf

    figures = [
        (f"accuracy.{name}.heldout_after_rl", after, "fraction", True),
        (f"accuracy.{name}.heldout_after_sft", before, "fraction", True),
    ]
    records = out / "records.jsonl"
    perf.write_records(perf.to_records(figures, "cpu", *perf.night()), records)
    history = os.environ.get("SLIME_NIGHTLY_HISTORY")
    # The thresholds above pass or fail the night; the gate's verdicts here are for the report and the history.
    nightly.perf_command(perf.REPO, "cpu", out, Path(history) if history else None, None, records, 0.0)
