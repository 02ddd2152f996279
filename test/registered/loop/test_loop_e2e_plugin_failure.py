"""End to end through `slime train` in a fresh process: a custom reward function that raises (a reward service
answering 503 for one sample) ends the run with exit code 1, the function's own traceback, and a last line that
names the function, the sample (index, group, prompt) and the rollout."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=40, suite="base-c-test-cpu")

from loop_helpers import base_flags, build_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def test_a_raising_reward_function_is_named_in_the_last_line(tmp_path):
    files = build_task(tmp_path / "task")
    prompt = json.loads(files["train"].read_text().splitlines()[1])["prompt"]  # sample 5: the second prompt's
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)]),  # the workers import loop_plugins
        "RAY_TMPDIR": ray_tmp,
        "OMP_NUM_THREADS": "1",
    }
    argv = base_flags(files, tmp_path / "run", **{"custom-rm-path": "loop_plugins.failing_reward"})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "slime.cli", "train", *argv], capture_output=True, text=True, env=env, timeout=600
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[-1] == (
        "error: --custom-rm-path loop_plugins.failing_reward raised ValueError: reward service returned 503 "
        f"(sample 5 of group 1, prompt {prompt!r}, rollout 0); --reward-errors zero or skip scores such a sample 0 "
        "or drops its group instead"
    )
    # the function's own traceback, right above: from its frame on, none of slime's or Ray's
    traceback = lines[lines.index("Traceback (most recent call last):") : -1]
    assert traceback[1].strip().startswith('File "') and "loop_plugins.py" in traceback[1]
    assert traceback[-2:] == [
        '    raise ValueError("reward service returned 503")',
        "ValueError: reward service returned 503",
    ]
    assert proc.stderr.count("Traceback (most recent call last)") == 1
