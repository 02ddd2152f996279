"""Typed run configuration, built from command-line flags, validated once, then frozen.

Every flag is declared exactly once, as a dataclass field with its help text; the argparse parser is
generated from the sections. Flag names follow the reference slime (`--rollout-batch-size`,
`--n-samples-per-prompt`, ...). Megatron-core settings pass through as `--<field-name>` of
megatron-core's own TransformerConfig / OptimizerConfig dataclasses (validated against them).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from slime.config_async import check_fully_async
from slime.config_lora import LoraConfig, check_lora
from slime.errors import FlagError
from slime.flag_ranges import FINITE, MEGATRON_RANGES, POS, Range, above, at_least, between, describe
from slime.net import is_address

# A user mistake in flags; the message names the flag(s) and the numbers (the name predates slime.errors).
ConfigError = FlagError


def opt(default: Any, help: str, *, flag=None, choices=None, nargs=None, valid: Range | None = None):
    """A flag: its default and help; `valid` is a numeric flag's range (every int and float flag declares one)."""
    extra = {"flag": flag, "choices": choices, "nargs": nargs, "valid": valid}
    meta = {"help": help, **{key: value for key, value in extra.items() if value}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ClusterConfig:
    actor_num_nodes: int = opt(1, "nodes for the actor (trainer)", valid=POS)
    actor_num_gpus_per_node: int = opt(1, "trainer processes per node (devices; CPU: processes)", valid=POS)
    critic_num_gpus_per_node: int = opt(1, "critic processes per node (PPO)", valid=POS)
    rollout_num_gpus: int = opt(1, "devices for rollout engines in total", valid=POS)
    rollout_num_gpus_per_engine: int = opt(1, "devices per rollout engine (its tensor parallel size)", valid=POS)
    colocate: bool = opt(False, "trainer and rollout share devices; each offloads while the other runs")
    hardware: str = opt("auto", "auto or a backend name from `slime env` (auto: the first available, in a fixed order)")
    ray_address: str | None = opt(None, "connect to an existing Ray cluster instead of starting one")
    bind_address: str = opt(
        "auto",
        "address slime's servers (engines, weight-group store, trainer rendezvous) bind and advertise: node (each "
        "node's Ray address), 0.0.0.0 (every interface, advertising the node's), or an IP; auto = node when the "
        "cluster spans hosts, else 127.0.0.1",
    )
    weight_sync: str = opt(
        "auto",
        "trainer -> engine weight transport: object_store, broadcast (process group), ipc (device handles, "
        "--colocate), in_process; auto = the backend's default for the placement",
        choices=("auto", "object_store", "broadcast", "ipc", "in_process"),
    )
    cores_per_node: int | None = opt(
        None,
        "cores the run's workers may use on each node (default: all the process may run on); slime.cores",
        valid=POS,
    )
    async_generation_cores: int | None = opt(
        None,
        "with --async: cores of a node kept for generation, the rest train (default: a third, at least 1)",
        valid=POS,
    )


@dataclass(frozen=True)
class DataConfig:
    prompt_data: str | None = opt(None, "prompt dataset (.jsonl or .parquet)")
    input_key: str = opt("prompt", "field holding the prompt (text or chat messages)")
    label_key: str | None = opt("label", "field holding the label passed to the reward")
    metadata_key: str | None = opt(None, "field holding per-sample metadata (a dict)")
    apply_chat_template: bool = opt(False, "render prompts with the tokenizer's own chat template")
    rollout_max_prompt_len: int | None = opt(
        None, "drop prompts longer than this many tokens (counted, reported)", valid=POS
    )
    rollout_shuffle: bool = opt(False, "shuffle prompts each epoch (seeded by --rollout-seed and the epoch)")
    rollout_seed: int = opt(42, "seed for data shuffling and sampling", valid=at_least(0))
    skip_bad_rows: bool = opt(False, "count and skip malformed rows instead of failing on the first one")
    eval_prompt_data: list[str] = opt([], "NAME PATH [NAME PATH ...]: evaluation sets", nargs="+")
    eval_interval: int | None = opt(
        None, "evaluate every N rollouts (and before the first and after the last)", valid=POS
    )


@dataclass(frozen=True)
class RolloutConfig:
    rollout_batch_size: int = opt(8, "prompts per rollout step", valid=POS)
    n_samples_per_prompt: int = opt(8, "responses per prompt (the group size for GRPO)", valid=POS)
    rollout_max_response_len: int = opt(64, "max new tokens per response", valid=POS)
    rollout_temperature: float = opt(1.0, "sampling temperature", valid=at_least(0))
    rollout_top_p: float = opt(1.0, "nucleus sampling", valid=between(0, 1, low_open=True))
    rollout_top_k: int = opt(-1, "top-k sampling", valid=Range(low=1, special=((-1, "off"),)))
    rollout_stop: list[str] = opt([], "stop strings", nargs="+")
    rollout_stop_token_ids: list[int] = opt([], "stop token ids (beside EOS)", nargs="+", valid=at_least(0))
    rollout_concurrency: int = opt(64, "max requests in flight per engine", valid=POS)
    rollout_engine_batch_size: int = opt(
        64, "in-process engines: sequences decoded together (KV-cache slots)", valid=POS
    )
    rollout_max_context_len: int | None = opt(
        None, "engine context (prompt + response) in tokens (default: the model's, at most 4096)", valid=POS
    )
    rollout_dtype: str = opt(
        "float32", "in-process engine dtype (embedded, jax)", choices=("float32", "bfloat16", "float16")
    )
    rollout_engine: str | None = opt(
        None,
        "rollout engine (default: the hardware backend's first installed one, see `slime env`)",
        choices=("embedded", "sglang", "sglang_jax", "jax"),
    )
    custom_generate_function_path: str | None = opt(
        None, "module.function: async generate(args, sample, sampling) -> Sample"
    )
    rm_type: str | None = opt(None, "built-in reward: math | dapo | deepscaler | f1 | gpqa | remote_rm | arithmetic")
    custom_rm_path: str | None = opt(None, "module.function: async reward(args, sample) -> float (or group variant)")
    group_rm: bool = opt(False, "the custom reward takes a whole group: reward(args, samples) -> list[float]")
    reward_errors: str = opt(
        "fail",
        "a reward that raises or is not a finite number: fail (end the run naming the reward function and the "
        "sample), zero (score 0, counted), skip (drop the sample's group, counted)",
        choices=("fail", "zero", "skip"),
    )
    rm_url: str | None = opt(None, "remote reward model URL (rm_type=remote_rm)")
    reward_key: str | None = opt(None, "key of the reward dict to train on, when rewards are dicts")
    dynamic_sampling_filter_path: str | None = opt(None, "module.function(args, group) -> bool: keep the group?")
    over_sampling_batch_size: int | None = opt(
        None, "prompts to draw per generation wave when filtering (>= rollout batch)", valid=POS
    )
    rollout_function_path: str | None = opt(
        None, "module.function: async rollout(ctx, data_source, rollout_id) -> RolloutResult (replaces the default)"
    )
    partial_rollout: bool = opt(False, "abort stragglers once the batch is full and return them to the buffer")
    n_samples_per_eval_prompt: int = opt(1, "responses per evaluation prompt", valid=POS)
    eval_temperature: float = opt(0.0, "evaluation temperature (0 = greedy)", valid=at_least(0))
    eval_max_response_len: int | None = opt(None, "max new tokens for evaluation (default: rollout's)", valid=POS)


@dataclass(frozen=True)
class AlgorithmConfig:
    advantage_estimator: str = opt(
        "grpo",
        "advantage estimator",
        choices=("grpo", "gspo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"),
    )
    disable_grpo_std_normalization: bool = opt(False, "Dr.GRPO: subtract the group mean, do not divide by the std")
    eps_clip: float = opt(0.2, "PPO clip (lower, and upper unless --eps-clip-high)", valid=above(0))
    eps_clip_high: float | None = opt(None, "upper clip (clip-higher); default = --eps-clip", valid=above(0))
    eps_clip_c: float | None = opt(None, "dual-clip constant c for negative advantages", valid=above(1))
    use_kl_loss: bool = opt(False, "add KL(policy || reference) to the loss")
    kl_loss_coef: float = opt(0.0, "weight of the KL loss", valid=at_least(0))
    kl_loss_type: str = opt("low_var_kl", "KL estimator", choices=("k1", "k2", "k3", "low_var_kl"))
    kl_coef: float = opt(0.0, "KL as reward shaping (per-token penalty) instead of a loss term", valid=at_least(0))
    entropy_coef: float = opt(0.0, "entropy bonus weight (negative: an entropy penalty)", valid=FINITE)
    gamma: float = opt(1.0, "discount (PPO/GAE, REINFORCE++)", valid=between(0, 1))
    lambd: float = opt(1.0, "GAE lambda", valid=between(0, 1))
    value_clip: float = opt(0.2, "PPO value-loss clip", valid=above(0))
    normalize_advantages: bool = opt(False, "whiten advantages over the batch")
    use_tis: bool = opt(False, "truncated importance sampling against the rollout log-probs")
    tis_clip: float = opt(2.0, "upper bound of the TIS weight", valid=above(0))
    calculate_per_token_loss: bool = opt(
        False, "average the loss over all tokens (default: per-sample mean, then mean)"
    )
    custom_advantage_function_path: str | None = opt(
        None, "module.function(settings, batch, group_ids) filling batch.advantages/returns"
    )


@dataclass(frozen=True)
class TrainConfig:
    num_rollout: int = opt(10, "rollout steps to run", valid=POS)
    global_batch_size: int = opt(64, "samples per optimizer step", valid=POS)
    micro_batch_size: int = opt(1, "samples per micro-batch (ignored with --use-dynamic-batch-size)", valid=POS)
    use_dynamic_batch_size: bool = opt(False, "pack micro-batches by --max-tokens-per-gpu")
    max_tokens_per_gpu: int | None = opt(None, "token budget per micro-batch", valid=POS)
    tensor_model_parallel_size: int = opt(1, "tensor parallel size of the trainer", valid=POS)
    make_vocab_size_divisible_by: int = opt(
        1,
        "pad the trainer's vocabulary to a multiple of this times the TP size (as Megatron; never exported)",
        valid=POS,
    )
    use_rollout_routing_replay: bool = opt(
        False,
        "MoE: the trainer's routers reuse the experts the engine chose for every token (slime starts SGLang "
        "with --enable-return-routed-experts; tokens without routes count in routing_replay/missing_tokens)",
    )
    lr: float = opt(1e-6, "peak learning rate", valid=at_least(0))
    min_lr: float = opt(0.0, "final learning rate", valid=at_least(0))
    lr_warmup_iters: int = opt(0, "warmup steps", valid=at_least(0))
    lr_decay_style: str = opt("constant", "decay schedule", choices=("constant", "linear", "cosine"))
    weight_decay: float = opt(0.0, "AdamW weight decay", valid=at_least(0))
    adam_beta1: float = opt(0.9, "Adam beta1", valid=between(0, 1, high_open=True))
    adam_beta2: float = opt(0.999, "Adam beta2", valid=between(0, 1, high_open=True))
    clip_grad: float = opt(1.0, "gradient-norm clip (0: off)", valid=at_least(0))
    bf16: bool = opt(
        False,
        "Megatron trainer: forward and backward in bfloat16 (autocast), weights, gradients and optimizer state in "
        "float32; log-probs and the loss are computed from float32 logits",
    )
    seed: int = opt(1234, "trainer seed", valid=at_least(0))
    async_rollout: bool = opt(
        False, "generate step k+1 while training on step k (off-policy by one step)", flag="--async"
    )
    fully_async: bool = opt(
        False,
        "engines generate without pause into a buffer; each step trains on the first finished groups fresh enough "
        "(--max-staleness) and the new weights reach the engines between two decode steps (TIS on by default)",
    )
    max_staleness: int = opt(
        1,
        "--fully-async: a group whose first token is more than this many weight versions old is generated again",
        valid=at_least(0),
    )
    sft_warmup_steps: int = opt(0, "supervised steps on --sft-data before RL", valid=at_least(0))
    sft_data: str | None = opt(None, "jsonl with prompt/response pairs for the SFT warm-up")
    sft_lr: float | None = opt(None, "SFT learning rate (default --lr)", valid=at_least(0))
    sft_batch_size: int = opt(64, "samples per SFT step", valid=POS)
    sft_stop_reward: float | None = opt(
        None, "end the SFT warm-up early once --sft-eval-set scores this mean reward", valid=FINITE
    )
    sft_eval_set: str | None = opt(None, "the --eval-prompt-data NAME checked every --sft-eval-interval SFT steps")
    sft_eval_interval: int = opt(10, "SFT steps between checks of --sft-stop-reward", valid=POS)
    weight_update_bucket_mb: int = opt(512, "size of the HF-named tensor buckets sent to the engines", valid=POS)
    train_backend: str | None = opt(
        None, "trainer family (default: the hardware backend's first, see `slime env`)", choices=("megatron", "jax")
    )


@dataclass(frozen=True)
class CheckpointConfig:
    hf_checkpoint: str | None = opt(None, "HuggingFace checkpoint folder (config, safetensors, tokenizer)")
    load: str | None = opt(None, "resume from this checkpoint folder (the latest step in it)")
    save: str | None = opt(None, "write checkpoints here")
    save_interval: int | None = opt(None, "save every N rollouts (and at the end)", valid=POS)
    keep_last_n: int | None = opt(None, "keep only the newest N checkpoints", valid=POS)
    save_hf: str | None = opt(None, "at the end, write an HF folder (transformers-loadable) here")


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = opt("runs/latest", "run folder: config.json, metrics.jsonl, tensorboard, plots")
    use_tensorboard: bool = opt(False, "write TensorBoard events")
    use_wandb: bool = opt(False, "log to wandb (must be installed)")
    wandb_project: str | None = opt(None, "wandb project")
    progress: bool = opt(True, "console progress bar", flag="--progress")
    ci_test: bool = opt(
        False, "check invariants (step-0 log-prob agreement, KL ~ 0, sane ranges) and fail on violation"
    )
    dump_rollout_dir: str | None = opt(
        None, "write every rollout's samples as JSONL here", flag="--save-debug-rollout-data"
    )
    profile: int = opt(
        0,
        "profile the first N RL steps: per-phase seconds and each worker's busy/idle time in "
        "<output-dir>/profile/phases.json, a torch profiler trace of trainer rank 0 beside it",
        valid=at_least(0),
    )


SECTIONS: dict[str, type] = {
    "cluster": ClusterConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "algorithm": AlgorithmConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "lora": LoraConfig,
}


@dataclass(frozen=True)
class Config:
    cluster: ClusterConfig
    data: DataConfig
    rollout: RolloutConfig
    algorithm: AlgorithmConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    lora: LoraConfig
    megatron: dict[str, Any] = field(default_factory=dict)  # pass-through TransformerConfig/OptimizerConfig fields
    sglang: dict[str, str] = field(default_factory=dict)  # --sglang-* pass-through to SGLang's server args

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    @property
    def train_steps_per_rollout(self) -> int:
        return self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt // self.train.global_batch_size

    @property
    def data_parallel_size(self) -> int:
        world = self.cluster.actor_num_nodes * self.cluster.actor_num_gpus_per_node
        return world // self.train.tensor_model_parallel_size


# ---- parser generation ------------------------------------------------------------------------------------


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is_list) of a field annotation such as `int | None` or `list[str]`."""
    hint = annotation
    if isinstance(hint, (types.UnionType,)) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _add_section(parser: argparse.ArgumentParser, name: str, cls: type) -> None:
    group = parser.add_argument_group(name)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        base, is_list = _base_type(hints[f.name])
        valid = f.metadata.get("valid")
        text = f.metadata["help"] + (f" [valid: {valid}]" if valid is not None else "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": text, "default": argparse.SUPPRESS}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            kwargs["metavar"] = base.__name__.upper()
            if is_list:
                kwargs["nargs"] = f.metadata.get("nargs", "+")
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(_flag(f), **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a flag is matched only whole (a prefix such as --rollout-engine would otherwise become
    # --rollout-engine-batch-size); an unknown flag goes to the pass-through, which says "did you mean".
    parser = _Parser(
        prog="slime train",
        description="RL training with Megatron-core and a rollout engine",
        epilog="--check: run only the start-up checks (flags, model folder, data files; exit 0 or 2). "
        "--help-errors: what each mistake prints.",
        allow_abbrev=False,
    )
    for name, cls in SECTIONS.items():
        _add_section(parser, name, cls)
    return parser


def _megatron_fields() -> dict[str, type]:
    """Fields of megatron-core's config dataclasses that may be passed through as flags."""
    import warnings

    with warnings.catch_warnings():  # importing megatron announces each optional fused-kernel package it lacks
        warnings.simplefilter("ignore")
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.transformer import TransformerConfig

    known: dict[str, type] = {}
    for cls in (TransformerConfig, OptimizerConfig):
        for f in fields(cls):
            kind = _scalar_kind(f.type)
            if kind is not None:
                known[f.name] = kind
    return known


def _scalar_kind(annotation) -> type | None:
    """int / float / bool / str for a field a flag can set: the plain type, Optional[X], Union[X, List[X]] (one
    value from the command line) or a Literal of strings (megatron checks the choice)."""
    import typing

    scalars = {int: int, float: float, bool: bool, str: str, "int": int, "float": float, "bool": bool, "str": str}
    if annotation in scalars:
        return scalars[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal and args and all(isinstance(a, str) for a in args):
        return str
    if origin is typing.Union:
        return next((scalars[a] for a in args if a in scalars), None)
    return None


def _parse_passthrough(rest: list[str], known_flags: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    megatron: dict[str, Any] = {}
    sglang: dict[str, str] = {}
    megatron_known: dict[str, type] | None = None
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}")
        name, _, inline = token[2:].partition("=")
        value: str | None = inline or None
        if value is None and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value = rest[i + 1]
            i += 1
        i += 1
        if name.startswith("sglang-"):
            sglang[name[len("sglang-") :].replace("-", "_")] = "true" if value is None else value
            continue
        if megatron_known is None:
            megatron_known = _megatron_fields()
        key = name.replace("-", "_")
        if key not in megatron_known:
            given = token.split("=")[0]
            candidates = known_flags + ["--" + k.replace("_", "-") for k in megatron_known]
            # a prefix of a flag (abbreviations are not accepted) is most likely meant as that flag
            close = [f for f in candidates if f.startswith(given)][:1] or difflib.get_close_matches(
                given, candidates, n=1
            )
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown flag {token.split('=')[0]}{hint}")
        kind = megatron_known[key]
        if kind is bool:
            megatron[key] = value is None or value.lower() in ("1", "true", "yes")
        else:
            try:
                megatron[key] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"--{name} expects {kind.__name__}, got {value!r}") from None
    return megatron, sglang


def parse_config(argv: list[str]) -> Config:
    parser = build_parser()
    namespace, rest = parser.parse_known_args(argv)
    values = vars(namespace)
    sections = {
        name: cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values}) for name, cls in SECTIONS.items()
    }
    known_flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
    megatron, sglang = _parse_passthrough(rest, known_flags)
    config = Config(**sections, megatron=megatron, sglang=sglang)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Every numeric flag against its declared range first (one line: flag, value, range), then the cross-field
    checks, each failing with the formula and the numbers; all problems of a kind in one message."""
    problems = check_ranges(config)
    if not problems:
        for step in (_check_batches, _check_parallel, _check_algorithm, _check_inputs, _check_sft):
            problems += step(config)
        problems += check_lora(config)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "; ".join(problems))


def check_ranges(config: Config) -> list[str]:
    """Every flag with a declared range (and the Megatron pass-through ones in MEGATRON_RANGES) inside it."""
    problems = []
    for name in SECTIONS:
        section = getattr(config, name)
        for f in fields(section):
            valid, value = f.metadata.get("valid"), getattr(section, f.name)
            if valid is not None and value is not None:
                problems += [
                    describe(_flag(f), item, valid) for item in (value if isinstance(value, list) else [value])
                ]
    for key, valid in MEGATRON_RANGES.items():
        if key in config.megatron:
            problems.append(describe("--" + key.replace("_", "-"), config.megatron[key], valid))
    return [p for p in problems if p is not None]


def _check_batches(config: Config) -> list[str]:
    r, t = config.rollout, config.train
    samples = r.rollout_batch_size * r.n_samples_per_prompt
    problems = []
    if samples % t.global_batch_size:
        problems.append(
            f"--rollout-batch-size * --n-samples-per-prompt = {r.rollout_batch_size} * {r.n_samples_per_prompt} = "
            f"{samples} must be divisible by --global-batch-size {t.global_batch_size}"
        )
    if t.use_dynamic_batch_size and not t.max_tokens_per_gpu:
        problems.append("--use-dynamic-batch-size needs --max-tokens-per-gpu")
    if r.over_sampling_batch_size is not None and r.over_sampling_batch_size < r.rollout_batch_size:
        problems.append(
            f"--over-sampling-batch-size {r.over_sampling_batch_size} must be >= --rollout-batch-size "
            f"{r.rollout_batch_size}"
        )
    return problems


def _check_parallel(config: Config) -> list[str]:
    t, c = config.train, config.cluster
    problems = []
    world = c.actor_num_nodes * c.actor_num_gpus_per_node
    if world % t.tensor_model_parallel_size:
        problems.append(
            f"trainer processes --actor-num-nodes * --actor-num-gpus-per-node = {world} must be divisible by "
            f"--tensor-model-parallel-size {t.tensor_model_parallel_size}"
        )
    else:
        dp = world // t.tensor_model_parallel_size
        ep = int(config.megatron.get("expert_model_parallel_size", 1))
        if dp % ep:
            problems.append(f"--expert-model-parallel-size {ep} must divide the data-parallel size {dp}")
        if t.global_batch_size % dp:
            problems.append(f"--global-batch-size {t.global_batch_size} must be divisible by data-parallel size {dp}")
        elif not t.use_dynamic_batch_size and (t.global_batch_size // dp) % t.micro_batch_size:
            problems.append(
                f"--global-batch-size / dp = {t.global_batch_size} / {dp} = {t.global_batch_size // dp} must be "
                f"divisible by --micro-batch-size {t.micro_batch_size}"
            )
    if c.rollout_num_gpus % c.rollout_num_gpus_per_engine:
        problems.append(
            f"--rollout-num-gpus {c.rollout_num_gpus} must be divisible by --rollout-num-gpus-per-engine "
            f"{c.rollout_num_gpus_per_engine}"
        )
    if c.bind_address not in ("auto", "node") and not is_address(c.bind_address):
        problems.append(f"--bind-address {c.bind_address!r} is not auto, node or an IPv4 address")
    if c.weight_sync == "ipc" and not c.colocate:
        problems.append("--weight-sync ipc hands device memory to an engine on the same device: it needs --colocate")
    if t.async_rollout and c.colocate:
        problems.append(
            "--async overlaps generation with training on separate devices; --colocate shares them: use one"
        )
    return problems + check_fully_async(config)


def _check_algorithm(config: Config) -> list[str]:
    a, r = config.algorithm, config.rollout
    problems = []
    if a.advantage_estimator in ("grpo", "gspo") and r.n_samples_per_prompt < 2:
        problems.append(f"--advantage-estimator {a.advantage_estimator} needs --n-samples-per-prompt >= 2 (groups)")
    if a.use_kl_loss and a.kl_loss_coef <= 0:
        problems.append("--use-kl-loss needs --kl-loss-coef > 0")
    if a.kl_coef and a.advantage_estimator in ("grpo", "gspo", "reinforce_plus_plus_baseline"):
        problems.append(
            f"--kl-coef (KL as reward shaping) needs --advantage-estimator ppo or reinforce_plus_plus; "
            f"with {a.advantage_estimator} use --use-kl-loss"
        )
    if r.rm_type is None and r.custom_rm_path is None:
        problems.append("no reward: give --rm-type or --custom-rm-path")
    if r.rm_type == "remote_rm" and not r.rm_url:
        problems.append("--rm-type remote_rm needs --rm-url")
    return problems


def _check_inputs(config: Config) -> list[str]:
    d, k = config.data, config.checkpoint
    problems = []
    if not k.hf_checkpoint:
        problems.append("--hf-checkpoint is required")
    if not d.prompt_data:
        problems.append("--prompt-data is required")
    if len(d.eval_prompt_data) % 2:
        problems.append("--eval-prompt-data takes NAME PATH pairs")
    if d.eval_interval is not None and not d.eval_prompt_data:
        problems.append("--eval-interval needs --eval-prompt-data NAME PATH")
    return problems


def _check_sft(config: Config) -> list[str]:
    t, d = config.train, config.data
    problems = []
    if t.sft_warmup_steps and not t.sft_data:
        problems.append("--sft-warmup-steps needs --sft-data")
    if t.sft_warmup_steps and config.data_parallel_size and t.sft_batch_size % config.data_parallel_size:
        problems.append(
            f"--sft-batch-size {t.sft_batch_size} must be divisible by data-parallel size {config.data_parallel_size}"
        )
    if (t.sft_stop_reward is None) != (t.sft_eval_set is None):
        problems.append("--sft-stop-reward and --sft-eval-set go together")
    elif t.sft_eval_set is not None and t.sft_eval_set not in d.eval_prompt_data[0::2]:
        problems.append(f"--sft-eval-set {t.sft_eval_set!r} is not a NAME given to --eval-prompt-data")
    return problems


def eval_sets(config: Config) -> list[tuple[str, str]]:
    items = config.data.eval_prompt_data
    return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
