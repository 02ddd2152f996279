"""Nightly accuracy on CPU: the quickstart trained to completion must reach the stored held-out accuracy.

The thresholds and their allowed float live beside this file (accuracy_thresholds.json), not in code. The
measured value is also written as a metric record when SLIME_NIGHTLY_RECORDS names a file, so the nightly
report shows its history with the performance metrics.
"""

import json
import os
from pathlib import Path

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=720, suite="nightly-accuracy-cpu", nightly=True)

THRESHOLDS = json.loads((Path(__file__).with_name("accuracy_thresholds.json")).read_text())["quickstart"]


def test_quickstart_reaches_the_stored_heldout_accuracy(tmp_path):
    from slime.quickstart.run import main

    assert main(["--output-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["heldout_accuracy_after_sft"], summary["heldout_accuracy_after_rl"]
    records = os.environ.get("SLIME_NIGHTLY_RECORDS")
    if records:
        from release.perf import current_commit, to_records, write_records

        import datetime
        import platform

        figures = [("accuracy.quickstart.heldout_after_rl", after, "fraction", True),
                   ("accuracy.quickstart.heldout_after_sft", before, "fraction", True)]
        day = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        write_records(to_records(figures, "cpu", current_commit(), day, platform.node()), Path(records))
    assert before <= THRESHOLDS["after_sft_max"] + THRESHOLDS["allowed_float"], f"SFT alone already reached {before:.1%}"
    assert after - before >= THRESHOLDS["min_gain"] - THRESHOLDS["allowed_float"], f"RL raised accuracy only {before:.1%} -> {after:.1%}"
    assert after >= THRESHOLDS["after_rl_min"] - THRESHOLDS["allowed_float"], (
        f"held-out accuracy after RL {after:.1%} (last three: {summary['heldout_accuracy_last_three']}) is below "
        f"{THRESHOLDS['after_rl_min']:.0%} - {THRESHOLDS['allowed_float']:.0%}"
    )
