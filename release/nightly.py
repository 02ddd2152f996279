"""`python -m release perf`: the nightly performance job in one command, the same locally and in the workflow.

run the benchmarks (release/perf.py) -> judge each metric against its baseline and the trailing history
(release/perf_gate.py) -> append tonight to the history -> write summary.md and plots (release/perf_report.py)
-> exit with the gate's code.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from release import perf, perf_gate, perf_report


def perf_command(
    repo: Path,
    hardware: str,
    out: Path,
    history_path: Path | None,
    only: list[str] | None,
    records_path: Path | None,
    timeout_s: float,
) -> int:
    if records_path is not None:
        run = perf.PerfRun(records=perf.read_records(records_path))
        failures_file = records_path.parent / "failures.json"
        if failures_file.is_file():
            run.failures = [perf.Failure(**f) for f in json.loads(failures_file.read_text())]
    else:
        run = perf.run_all(hardware, out, only, timeout_s)
        perf.write_records(run.records, out / "records.jsonl")
        (out / "failures.json").write_text(json.dumps([asdict(f) for f in run.failures], indent=1) + "\n")
    history = perf.read_records(history_path) if history_path else []
    baselines_file = perf_gate.baselines_path(repo, hardware)
    baselines = perf_gate.load_baselines(baselines_file)
    if not baselines:  # said on every night until someone commits them: without them only history can gate
        print(
            f"warning: no baselines at {baselines_file.relative_to(repo) if baselines_file.is_relative_to(repo) else baselines_file}: "
            f"every {hardware} metric is new tonight; commit tonight's records.jsonl values there to gate regressions"
        )
    verdicts = [perf_gate.judge(r, baselines.get(r.name), history) for r in run.records]
    if history_path is not None:
        kept = [r for r in history if not any(r.name == t.name and r.date == t.date for t in run.records)]
        perf.write_records(kept + run.records, history_path)
    summary = perf_report.write_report(out / "report", hardware, verdicts, run.failures, history + run.records)
    for v in verdicts:
        print(f"{v.status:>10}  {v.name} = {v.value:.4g}" + (f"  ({v.reason})" if v.reason else ""))
    code = perf_gate.exit_code(verdicts, run.failures)
    print(f"report: {summary}; gate exit code {code}")
    return code
