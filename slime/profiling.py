"""--profile N: where the first N RL steps spend their time, per phase and per worker.

Each profiled step adds a row to <output-dir>/profile/phases.json (rewritten after every step, so an interrupted
run keeps what it measured): the step's wall time; the phases (generate, reward, experience, train, sync, eval);
and each worker's busy and idle seconds (trainer ranks from their own clocks, the engines from the rollout's
generation time). Trainer rank 0 also writes a torch profiler trace of each profiled train step beside it
(slime.ray.trainer_group.TrainerWorker._traced_step; open in chrome://tracing or Perfetto).

Under --async the generation reported at step k is the rollout trained at step k, which ran while step k-1
trained; "rollout_wait" is how long the driver waited for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROFILE_FILE = "phases.json"


@dataclass(frozen=True)
class ProfileSettings:
    """What --profile records and where (built from the run config by slime.settings.profile_settings)."""

    steps: int  # --profile: the first N RL steps (0: none)
    folder: Path  # <output-dir>/profile
    async_rollout: bool = False  # --async: generation at step k ran while step k-1 trained
    cores: dict[str, int] | None = None  # the run's core budget (slime.cores.CoreBudget.describe)


class StepProfile:
    """`run`: the started workers (slime.ray.actors.RunActors), whose trainer ranks report their busy seconds."""

    def __init__(self, settings: ProfileSettings, run):
        self.steps = settings.steps
        self.run = run
        self.path = settings.folder / PROFILE_FILE
        self.rows: list[dict] = []
        self.cores = settings.cores
        self.async_rollout = settings.async_rollout
        if self.steps:
            self._trainer_busy()  # forget the start-up (SFT warm-up, first weights): steps only

    def record(self, step: int, metrics: dict[str, float], eval_s: float) -> None:
        if len(self.rows) >= self.steps:
            return
        wall = metrics["perf/step_time"] + eval_s  # the loop's step time stops before the evaluation
        generate = metrics.get("perf/rollout_time", 0.0) - metrics.get("perf/reward_time", 0.0)
        trainers = self._trainer_busy()
        rank0 = trainers[0]["busy"] if trainers else {}
        phases = {
            "generate": generate,
            "reward": metrics.get("perf/reward_time", 0.0),
            "rollout_wait": metrics.get("perf/rollout_wait", 0.0) + metrics.get("perf/async_rollout_wait", 0.0),
            "experience": rank0.get("log_probs", 0.0) + rank0.get("values", 0.0),
            "train": rank0.get("train", 0.0),
            "train_phase": metrics.get("perf/train_time", 0.0),  # as the driver saw it: transfers included
            "sync": metrics.get("perf/weight_sync_time", 0.0),
            "eval": eval_s,
        }
        engine_busy = metrics.get("perf/rollout_time", 0.0)
        workers = [
            *({**t, "idle": max(0.0, wall - sum(t["busy"].values()))} for t in trainers),
            {"worker": "engines", "busy": {"generate": engine_busy}, "idle": max(0.0, wall - engine_busy)},
        ]
        self.rows.append({"step": step, "wall": wall, "phases": phases, "workers": workers})
        self._write()

    def _trainer_busy(self) -> list[dict]:
        rows = []
        for role, group in (("actor", self.run.actor), ("critic", self.run.critic)):
            if group is not None:
                for rank, busy in enumerate(group.busy_report()):
                    rows.append({"worker": f"{role}_rank{rank}", "busy": busy})
        return rows

    def _write(self) -> None:
        keys = self.rows[0]["phases"].keys()
        mean = {k: sum(r["phases"][k] for r in self.rows) / len(self.rows) for k in keys}
        mean["wall"] = sum(r["wall"] for r in self.rows) / len(self.rows)
        report = {"cores": self.cores, "async": self.async_rollout, "mean": mean, "steps": self.rows}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(report, indent=1))
