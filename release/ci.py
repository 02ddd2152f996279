"""`python -m release ci <step>`: the thin shell around release/gating.py that the workflows run.

Inputs come from environment variables the workflow sets from its contexts (never interpolated into the
script); outputs are `key=value` lines for $GITHUB_OUTPUT. The decisions themselves live in gating.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping

from release.gating import HARDWARE, classify_changes, failed_jobs, finish_verdict, gate, wait_verdict

API = "https://api.github.com"


def _env(name: str, environ: Mapping[str, str]) -> str:
    if name not in environ:
        raise SystemExit(f"error: environment variable {name} is not set (the workflow step must pass it)")
    return environ[name]


def run_jobs(environ: Mapping[str, str]) -> list[dict]:
    """Every job of this workflow run attempt, from the Actions API (paginated)."""
    repo, run_id, attempt = _env("REPOSITORY", environ), _env("RUN_ID", environ), environ.get("RUN_ATTEMPT", "1")
    jobs: list[dict] = []
    page = 1
    while True:
        request = urllib.request.Request(
            f"{API}/repos/{repo}/actions/runs/{run_id}/attempts/{attempt}/jobs?per_page=100&page={page}",
            headers={"Authorization": f"Bearer {_env('GH_TOKEN', environ)}", "Accept": "application/vnd.github+json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            batch = json.load(response)["jobs"]
        jobs += batch
        if len(batch) < 100:
            return jobs
        page += 1


def changes(environ: Mapping[str, str]) -> int:
    if environ.get("EVENT_NAME") != "pull_request":
        print("code=true")
        return 0
    base = _env("BASE_SHA", environ)
    result = subprocess.run(["git", "diff", "--name-only", f"{base}...HEAD"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"cannot diff against {base}: {result.stderr.strip()}; treating every path as changed", file=sys.stderr)
        print("code=true")
        return 0
    change_set = classify_changes(result.stdout.splitlines())
    print(f"{len(change_set.paths)} changed paths; code changed: {change_set.code}", file=sys.stderr)
    print(f"code={'true' if change_set.code else 'false'}")
    return 0


def gate_step(environ: Mapping[str, str]) -> int:
    labels = json.loads(environ.get("LABELS") or "[]") or []
    change_set = classify_changes(["(code)"] if environ.get("CODE_CHANGED", "true") == "true" else [])
    decision = gate(_env("EVENT_NAME", environ), environ.get("IS_DRAFT") == "true", labels, change_set)
    print(decision.reason, file=sys.stderr)
    for hw in HARDWARE:
        print(f"{hw}={'true' if decision.run[hw] else 'false'}")
    print(f"parallel={'true' if decision.parallel else 'false'}")
    print("json=" + json.dumps({"run": dict(decision.run), "parallel": decision.parallel}, sort_keys=True))
    return 0


def health(environ: Mapping[str, str]) -> int:
    bad = failed_jobs(run_jobs(environ), own_name=environ.get("JOB_NAME", ""))
    if bad:
        print(f"error: not starting: {', '.join(bad)} already failed in this run", file=sys.stderr)
        return 1
    print("no job of this run has failed; going ahead")
    return 0


def wait(environ: Mapping[str, str], poll_s: float = 30.0) -> int:
    if environ.get("PARALLEL") == "true":
        print("scheduled run: stages run in parallel, not waiting")
        return 0
    run = json.loads(_env("GATE", environ))["run"]
    expected = {
        prefix: int(entry["count"])
        for prefix, entry in json.loads(_env("EXPECTED", environ)).items()
        if run[entry["hw"]]
    }
    while True:
        verdict, why = wait_verdict(run_jobs(environ), expected)
        print(f"{verdict}: {why}", flush=True)
        if verdict != "pending":
            return 0 if verdict == "success" else 1
        time.sleep(poll_s)


def finish(environ: Mapping[str, str]) -> int:
    ok, message = finish_verdict(json.loads(_env("NEEDS", environ)))
    print(message if ok else f"error: {message}")
    return 0 if ok else 1


STEPS = {"changes": changes, "gate": gate_step, "health": health, "wait": wait, "finish": finish}


def main(step: str, environ: Mapping[str, str] = os.environ) -> int:
    return STEPS[step](environ)
