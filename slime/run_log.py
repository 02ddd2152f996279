"""Where a run's metrics go: metrics.jsonl in the run folder (always), the console (a progress bar on a
terminal, one line per rollout otherwise), TensorBoard and wandb when asked for."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slime.errors import MissingPackage

METRICS_FILE = "metrics.jsonl"
# What the console line shows, in order, when present.
CONSOLE_KEYS = (
    ("rollout/reward_mean", "reward"),
    ("rollout/response_length_mean", "len"),
    ("rollout/reward_errors_zeroed", "reward_errors_zeroed"),  # with --reward-errors zero / skip
    ("rollout/reward_errors_skipped_groups", "reward_errors_skipped_groups"),
    ("train/pg_loss", "pg"),
    ("train/kl", "kl"),
    ("train/entropy", "ent"),
    ("train/grad_norm", "gnorm"),
    ("perf/step_time", "s/step"),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class LogSettings:
    """Where a run's metrics go (built from the run config by slime.settings.log_settings)."""

    output_dir: str  # the run folder: metrics.jsonl, tensorboard/
    num_rollout: int = 0  # the progress bar's length
    progress: bool = True  # a progress bar when stderr is a terminal
    use_tensorboard: bool = False
    use_wandb: bool = False
    wandb_project: str | None = None
    run_config: dict = field(default_factory=dict)  # the flags, as wandb records them with the run


class RunLog:
    def __init__(self, settings: LogSettings, start_step: int = 0):
        lg = settings
        self.folder = Path(lg.output_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / METRICS_FILE
        self._keep_rows_before(start_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = None
        if lg.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingPackage(
                    "--use-tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self._tensorboard = SummaryWriter(str(self.folder / "tensorboard"))
        self._wandb = None
        if lg.use_wandb:
            try:
                import wandb
            except ImportError:
                raise MissingPackage("--use-wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project=lg.wandb_project or "slime", config=lg.run_config, dir=str(self.folder))
            self._wandb_defined: set[str] = set()
        self._bar = None
        if lg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=lg.num_rollout, initial=start_step, desc="rollout", unit="step", dynamic_ncols=True)

    def _keep_rows_before(self, step: int) -> None:
        """A resumed run re-logs from its checkpoint step: drop what was logged after the checkpoint (rollout rows
        from its step on; evaluations after it), atomically. A fresh run (step 0) starts the file anew."""

        def before(row: dict) -> bool:
            if step == 0:
                return False
            phase, at = row.get("phase"), row.get("step", -1)
            return phase == "sft" or at < step or (phase == "eval" and at <= step)

        rows = [r for r in read_metrics(self.path) if before(r)]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float], phase: str = "rl") -> None:
        row = {"step": step, "phase": phase, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        prefix = "sft/" if phase == "sft" else ""
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(prefix + key, value, step)
        if self._wandb is not None:
            self._log_wandb(
                step, {prefix + k: v for k, v in metrics.items()}, "sft/step" if phase == "sft" else "rollout_step"
            )
        self._console(step, metrics, phase)

    def _log_wandb(self, step: int, metrics: dict[str, float], step_key: str) -> None:
        """SFT and RL steps each count from 0, so every metric is plotted against its own phase's step key
        rather than wandb's global step (which must only grow: RL step 0 after 100 SFT rows would be dropped)."""
        for key in metrics:
            group = key.split("/", 1)[0] + "/*" if "/" in key else key
            if group not in self._wandb_defined:
                self._wandb.define_metric(group, step_metric=step_key)
                self._wandb_defined.add(group)
        self._wandb.log({step_key: step, **metrics})

    def _console(self, step: int, metrics: dict[str, float], phase: str) -> None:
        shown = {label: metrics[key] for key, label in CONSOLE_KEYS if key in metrics}
        shown.update(
            {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval/") and k.endswith("reward_mean")}
        )
        text = " ".join(f"{label}={_short(value)}" for label, value in shown.items())
        if phase == "sft":
            text = f"sft step {step} loss={_short(metrics.get('train/loss', math.nan))}"
        if self._bar is not None:
            if phase == "rl" and "rollout/reward_mean" in metrics:
                self._bar.update(1)
            self._bar.set_postfix_str(text)
        else:
            print(f"[{phase} {step}] {text}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        (self._bar.write if self._bar is not None else lambda t: print(t, file=sys.stderr, flush=True))(text)

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _short(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
