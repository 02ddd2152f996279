"""Everything a run is given, checked before anything starts: `slime train` calls `check_run` first, and
`slime train --check` runs it alone (exit 0, or 2 with one line naming the flag, file[:line] or package).

Order: flags that need the environment (packages, plugin paths, backend), the model folder, then every data
file read, checked and tokenized once. The run then uses the data read here (`CheckedRun.data`): the rollout
manager and the SFT warm-up never read a file again.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from slime.config import Config, eval_sets
from slime.errors import FlagError, MissingPackage, ModelError
from slime.preflight.model import ModelFacts, check_model
from slime.rollout.data import PromptDataset, PromptLimits, load_prompt_file
from slime.rollout.data_files import RowKeys


@dataclass
class PreparedData:
    """The data files as checked: what the rollout and the SFT warm-up use."""

    prompts: PromptDataset
    evals: dict[str, PromptDataset] = field(default_factory=dict)
    sft: PromptDataset | None = None

    def metrics(self) -> dict[str, float]:
        every = [self.prompts, *self.evals.values(), *([self.sft] if self.sft else [])]
        return {
            "data/skipped_bad_rows": float(sum(len(d.skipped_bad) for d in every)),
            "data/dropped_too_long": float(sum(d.dropped_too_long for d in every)),
        }


@dataclass
class CheckedRun:
    config: Config
    backend: object  # slime.backends.Backend
    model: ModelFacts
    data: PreparedData
    notes: list[str]  # one-line remarks for the start of the run (skipped rows, dropped prompts, EOS)

    def data_counts(self) -> str:
        """For the run's start line: what the data check kept and left out."""
        m = self.data.metrics()
        return (
            f"; data: {len(self.data.prompts.prompts)} prompts, {int(m['data/skipped_bad_rows'])} bad rows skipped "
            f"(--skip-bad-rows), {int(m['data/dropped_too_long'])} prompts over --rollout-max-prompt-len dropped"
        )

    def describe(self) -> str:
        d = self.data
        counts = [f"{len(d.prompts.prompts)} prompts"]
        counts += [f"{len(s.prompts)} in eval set {name}" for name, s in d.evals.items()]
        if d.sft is not None:
            counts.append(f"{len(d.sft.prompts)} SFT rows")
        m = self.data.metrics()
        return (
            f"check passed: model {self.model.folder} ({self.model.model_type}, vocab {self.model.vocab_size}, "
            f"engine context {self.model.context}), {', '.join(counts)}; "
            f"{int(m['data/skipped_bad_rows'])} bad rows skipped, {int(m['data/dropped_too_long'])} prompts too long"
        )


def check_packages(config: Config) -> None:
    needed = [("--use-wandb", "wandb", config.logging.use_wandb)]
    needed.append(("--use-tensorboard", "tensorboard", config.logging.use_tensorboard))
    for flag, module, wanted in needed:
        if wanted and importlib.util.find_spec(module) is None:
            raise MissingPackage(f"{flag} needs the {module} package: pip install {module}")


def check_plugins(config: Config) -> None:
    from slime.plugins import load_function, load_rollout_plugins

    load_rollout_plugins(config)
    if config.algorithm.custom_advantage_function_path:
        load_function(config.algorithm.custom_advantage_function_path, "--custom-advantage-function-path", 3)


def check_run_paths(config: Config) -> None:
    """Paths that are not data or model files: a checkpoint to resume from, output folders."""
    if config.checkpoint.load:
        from slime.training.checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(config.checkpoint.load)
        except FileNotFoundError as exc:
            raise FlagError(f"--load {exc}") from None
    for flag, path in (("--output-dir", config.logging.output_dir), ("--save", config.checkpoint.save)):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise FlagError(f"{flag} {path}: is a file; give a folder")
    if config.cluster.rollout_num_gpus_per_engine != 1:
        # An engine actor is placed on one bundle (one device), and tensor-parallel SGLang servers would also need
        # --tp-size and one weight payload per rank: not wired yet, so refuse rather than run on one device.
        raise FlagError("--rollout-num-gpus-per-engine must be 1 for now: each engine runs on one device")


def check_engine_options(config: Config, engine_kind: str) -> list[str]:
    """--sglang-* pass-through options against the installed SGLang's own parser; a note when they cannot apply."""
    if not config.sglang:
        return []
    if engine_kind != "sglang":
        return [f"--sglang-* options are ignored: this run's rollout engine is {engine_kind}"]
    from slime.rollout.engines.base import EngineError
    from slime.rollout.engines.sglang.launcher import server_argv

    try:
        server_argv(config.sglang)
    except EngineError as exc:  # its messages name the --sglang-* flag
        raise FlagError(str(exc)) from None
    return []


def prepare_data(config: Config, model: ModelFacts) -> PreparedData:
    d, r = config.data, config.rollout
    keys = RowKeys(d.input_key, d.label_key, d.metadata_key)

    def load(path: str, response_len: int, row_keys: RowKeys = keys, context: int | None = model.context):
        limits = PromptLimits(d.rollout_max_prompt_len, response_len, context)
        return load_prompt_file(path, model.tokenizer, row_keys, d.apply_chat_template, limits, d.skip_bad_rows)

    prepared = PreparedData(load(d.prompt_data, r.rollout_max_response_len))
    eval_len = r.eval_max_response_len or r.rollout_max_response_len
    prepared.evals = {name: load(path, eval_len) for name, path in eval_sets(config)}
    if config.train.sft_warmup_steps:  # the response is the row's "response" field; no engine context applies
        prepared.sft = load(config.train.sft_data, 0, RowKeys(d.input_key, "response", None), None)
    return prepared


def data_notes(config: Config, data: PreparedData) -> list[str]:
    files = [(config.data.prompt_data, data.prompts)]
    files += [(path, data.evals[name]) for name, path in eval_sets(config)]
    if data.sft is not None:
        files.append((config.train.sft_data, data.sft))
    return [line for path, dataset in files for line in dataset.summary(path, config.data.rollout_max_prompt_len)]


def check_run(config: Config, backend=None) -> CheckedRun:
    """Every check that needs no cluster; raises a UserError (one line) on the first problem."""
    from slime.backends import select_backend
    from slime.backends.capability_check import require_capabilities
    from slime.settings import chosen_rollout_engine, chosen_trainer_family, run_needs

    check_packages(config)
    check_run_paths(config)
    check_plugins(config)
    backend = backend or select_backend(config.cluster.hardware)
    require_capabilities(run_needs(config, backend), backend)  # an impossible combination for this hardware
    chosen_trainer_family(config, backend)  # --train-backend
    engine = chosen_rollout_engine(config, backend)  # --rollout-engine, or the backend's installed default
    engine_notes = check_engine_options(config, engine)
    model = check_model(config, engine)
    if config.train.sft_warmup_steps and not model.eos_ids:
        raise ModelError(f"--sft-warmup-steps: the model in {model.folder} names no EOS token to end responses with")
    data = prepare_data(config, model)
    return CheckedRun(config, backend, model, data, engine_notes + model.notes + data_notes(config, data))
