"""The steps `slime.loop` is made of, each a function of the run's actors and the frozen config."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from slime import invariants
from slime.config import Config
from slime.models.lora import LoraSpec
from slime.plugin_failures import PluginFailure, describe_samples, naming_rollout, plugin_call, plugin_name
from slime.plugins import PluginError
from slime.ray.actors import RunActors
from slime.ray.cluster import ClusterError
from slime.rollout.reward_checks import checked_reward
from slime.settings import advantage_settings, engine_spec
from slime.training import checkpoint
from slime.training.batch import TrainBatch
from slime.training.experience import AdvantageSettings, compute_advantages
from slime.types import Sample

WEIGHT_UPDATE_TIMEOUT_S = 900.0


def needs_reference(config: Config) -> bool:
    return config.algorithm.use_kl_loss or bool(config.algorithm.kl_coef) or config.logging.ci_test


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else ()
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


# ---- weights ------------------------------------------------------------------------------------------
def sync_weights(config: Config, run: RunActors, version: int) -> float:
    """Trainer -> engines by the run's transport (slime.ray.weight_sync): HF-named tensor buckets through the
    object store, or sent by the trainer straight to the engines (broadcast / ipc). Returns seconds."""
    import ray

    start = time.perf_counter()
    bucket_bytes = config.train.weight_update_bucket_mb << 20
    if run.engine_in_trainer:  # an engine in the trainer's process takes the parameters directly
        refs = []
    elif run.weight_sync != "object_store":
        from slime.ray.weight_sync import WeightSyncError

        urls = ray.get(run.rollout.engine_urls.remote())
        try:
            run.actor.push_weights(run.weight_sync, urls, version, bucket_bytes, WEIGHT_UPDATE_TIMEOUT_S)
        except WeightSyncError as e:  # raised in a trainer actor: one line, without the remote traceback
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            raise ClusterError(f"weight sync ({run.weight_sync}): {cause}") from None
        ray.get(run.rollout.weights_pushed.remote(version))
        return time.perf_counter() - start
    else:
        refs = run.actor.publish_weights(bucket_bytes)
    try:
        ray.get(run.rollout.update_weights.remote(refs, version), timeout=WEIGHT_UPDATE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(
            f"weight update to version {version} did not finish within {WEIGHT_UPDATE_TIMEOUT_S:g} s"
        ) from None
    return time.perf_counter() - start


# ---- SFT warm-up --------------------------------------------------------------------------------------
def sft_samples(dataset, tokenizer, eos_id: int) -> list[Sample]:
    """Prompt/response rows (the start-up check read --sft-data) tokenized as prompt + response + EOS, trained on
    the response and the EOS. Prompts are rendered as the rollout renders them (chat template, length limit), so
    SFT and RL see the same text; the EOS is the one the engines stop at (slime.models.eos)."""
    samples = []
    for i, (text, prompt, row) in enumerate(dataset.prompts):
        response = tokenizer(str(row.label), add_special_tokens=False)["input_ids"] + [eos_id]
        samples.append(Sample(prompt=text, tokens=prompt + response, response_length=len(response), index=i))
    return samples


def sft_warmup(config: Config, run: RunActors, tokenizer, log, checked) -> int:
    """Supervised steps on --sft-data; with --sft-stop-reward, ends early once the --sft-eval-set reaches it
    (checked every --sft-eval-interval steps, the engines getting the weights first). Returns the steps run."""
    import ray

    t = config.train
    samples = sft_samples(checked.data.sft, tokenizer, checked.model.eos_ids[0])
    order: list[int] = []
    rng = random.Random(config.train.seed)
    for step in range(t.sft_warmup_steps):
        if len(order) < t.sft_batch_size:  # next epoch, reshuffled
            epoch = list(range(len(samples)))
            rng.shuffle(epoch)
            order += epoch
        picked, order = order[: t.sft_batch_size], order[t.sft_batch_size :]
        batch = TrainBatch.from_samples([samples[i] for i in picked], tokenizer.pad_token_id)
        metrics = {f"train/{k}": v for k, v in run.actor.sft(batch, t.sft_lr or t.lr).items()}
        if t.sft_stop_reward is not None and (step + 1) % t.sft_eval_interval == 0:
            sync_weights(config, run, 0)
            scores = ray.get(run.rollout.evaluate.remote([t.sft_eval_set]))
            metrics.update(scores)
            if scores[f"eval/{t.sft_eval_set}/reward_mean"] >= t.sft_stop_reward:
                log.log(step, metrics, phase="sft")
                log.message(f"SFT warm-up reached {t.sft_stop_reward:g} on {t.sft_eval_set} after {step + 1} steps")
                break
        log.log(step, metrics, phase="sft")
    run.actor.reset_optimizer()  # RL starts from the warmed-up weights with a fresh optimizer
    return step + 1


# ---- advantages ------------------------------------------------------------------------------------
def fill_advantages(settings: AdvantageSettings, batch: TrainBatch, group_ids: list[int], advantage_fn=None) -> None:
    """The built-in estimators, or --custom-advantage-function-path, whose output is checked here: one tensor
    per sample with one value per response token, for both advantages and returns."""
    if advantage_fn is None:
        compute_advantages(settings, batch, group_ids)
        return
    with plugin_call(plugin_name("--custom-advantage-function-path", advantage_fn)):
        advantage_fn(settings, batch, group_ids)
    name = getattr(advantage_fn, "__qualname__", repr(advantage_fn))
    for field in ("advantages", "returns"):
        values = getattr(batch, field, None)
        if values is None or len(values) != len(batch.response_lengths):
            raise PluginError(
                f"--custom-advantage-function-path {name}: batch.{field} must hold one tensor per sample "
                f"({len(batch.response_lengths)}), got {'nothing' if values is None else len(values)}"
            )
        for i, (value, n) in enumerate(zip(values, batch.response_lengths)):
            if not isinstance(value, torch.Tensor) or value.shape != (n,):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise PluginError(
                    f"--custom-advantage-function-path {name}: batch.{field}[{i}] must have shape ({n},), got {shape}"
                )
            if not bool(torch.isfinite(value).all()):
                problem = f"set batch.{field}[{i}] to {value.tolist()}: not all finite"
                raise PluginFailure(plugin_name("--custom-advantage-function-path", advantage_fn), problem)


def checked_rewards(config: Config, samples: list[Sample]) -> list[float]:
    """The scalar rewards advantages are computed from; a value that is not finite never gets further. (The reward
    functions' values are checked as they come, slime.rollout.reward_checks: this holds for --rollout-function-path
    too, whose samples carry whatever rewards it set.)"""
    key, rewards = config.rollout.reward_key, []
    for sample in samples:
        value, problem = checked_reward(sample.reward, key)
        value = value[key] if isinstance(value, dict) else value
        if problem is not None:
            problem = f"set a sample's reward to {repr(sample.reward)[:40]}, not one finite number"
            source = config.rollout.rollout_function_path
            plugin = f"--rollout-function-path {source}" if source else "the rollout"
            raise PluginFailure(plugin, problem, describe_samples([sample]))
        rewards.append(value)
    return rewards


# ---- one RL training step -----------------------------------------------------------------------------
def train_on_rollout(
    config: Config,
    run: RunActors,
    samples: list[Sample],
    pad_token_id: int,
    step: int,
    first_step: bool,
    vocab_size: int,
    advantage_fn=None,
    generating=None,
) -> dict[str, float]:
    """Rewards -> (ref / old log-probs, values as needed) -> advantages -> optimizer step(s) on actor and critic.
    `first_step`: the first step of this process (step 0, or the first after a resume).

    The old log-probs get a pass of their own only when something needs them before the update: several optimizer
    steps per rollout (the policy moves between them) or a KL penalty in the reward. With one step per rollout
    the ratio is exactly 1, so the trainer uses its own detached log-probs, and --ci-test checks those very
    values, returned by the step itself (they are computed before the update). So a GRPO step without KL sends
    the batch to the trainer once. `generating` (--async): the object ref of the next rollout, generating
    meanwhile; the trainer takes the engines' cores once it is done (slime.cores.CoreLease)."""
    batch = TrainBatch.from_samples(samples, pad_token_id)
    with naming_rollout(f"rollout {step}"):
        batch.rewards = checked_rewards(config, samples)
    settings = advantage_settings(config)
    metrics: dict[str, float] = {}
    check = config.logging.ci_test
    # --ci-test's KL check needs the reference only at step 0: later (and after a resume) the policy has moved.
    kl_check = check and step == 0
    if config.algorithm.use_kl_loss or settings.kl_coef or kl_check:
        batch.ref_log_probs, _ = run.actor.compute_log_probs(batch, "ref", generating)
    separate_old_pass = (
        config.train_steps_per_rollout > 1 or bool(settings.kl_coef) or (check and not run.actor.keeps_step_log_probs)
    )
    if separate_old_pass:
        batch.old_log_probs, entropies = run.actor.compute_log_probs(batch, "actor", generating)
        if check:
            check_log_probs(config, metrics, batch, entropies, vocab_size, step, first_step)
    if run.critic is not None:
        batch.values = run.critic.compute_values(batch, generating)
    with naming_rollout(f"rollout {step}"):
        fill_advantages(settings, batch, [s.group_index for s in samples], advantage_fn)
    actor_rows, critic_rows = [], []
    keep = check and not separate_old_pass  # then there is exactly one chunk: the step's log-probs are the old ones
    for chunk in batch.chunks(config.train.global_batch_size):
        futures = run.actor.submit_train(chunk, keep, generating)
        critic_futures = run.critic.submit_train(chunk, generating=generating) if run.critic is not None else []
        row, log_probs, entropies = run.actor.finish_train(futures, len(chunk))
        actor_rows.append(row)
        if critic_futures:
            critic_rows.append(run.critic.finish_train(critic_futures, len(chunk))[0])
        if keep:
            batch.old_log_probs = log_probs
            check_log_probs(config, metrics, batch, entropies, vocab_size, step, first_step)
    metrics.update({f"train/{k}": v for k, v in mean_metrics(actor_rows).items()})
    metrics.update({f"critic/{k}": v for k, v in mean_metrics(critic_rows).items()})
    metrics["train/advantage_abs_mean"] = float(
        sum(float(a.abs().sum()) for a in batch.advantages) / max(1, batch.num_loss_tokens())
    )
    return metrics


def check_log_probs(
    config: Config, metrics: dict, batch: TrainBatch, entropies, vocab_size: int, step: int, first_step: bool
):
    """--ci-test on the policy's log-probs of this rollout (before its update): sane ranges, and on the first step
    agreement with the engines' log-probs (they hold the trainer's weights) and KL ~ 0 to the reference at step 0."""
    metrics.update(invariants.check_ranges(batch.old_log_probs, entropies, batch.loss_masks, vocab_size))
    if first_step:
        metrics.update(invariants.logprob_agreement(batch.old_log_probs, batch.rollout_log_probs, batch.loss_masks))
        kl = _mean_kl(batch) if step == 0 else None
        # the looser bound of the two sides' precisions: a --bf16 trainer against a float32 engine is a bf16 pair
        dtype = (
            "bfloat16"
            if config.train.bf16 and config.rollout.rollout_dtype == "float32"
            else config.rollout.rollout_dtype
        )
        invariants.check_first_step(metrics, kl, dtype, step)


def _mean_kl(batch: TrainBatch) -> float:
    total = sum(
        float(((o - r) * m).sum()) for o, r, m in zip(batch.old_log_probs, batch.ref_log_probs, batch.loss_masks)
    )
    return total / max(1, batch.num_loss_tokens())


# ---- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(config: Config, run: RunActors, next_rollout: int, weight_version: int) -> str:
    import ray

    extra = {
        "next_rollout_id": next_rollout,
        "weight_version": weight_version,
        "rollout": ray.get(run.rollout.state_dict.remote(next_rollout)),
    }
    root = config.checkpoint.save
    if run.critic is not None:  # first: the actor's folder, renamed into place last, marks the checkpoint whole
        run.critic.save(str(Path(root) / "critic"), next_rollout)
    return run.actor.save(root, next_rollout, extra)


def load_checkpoint(config: Config, run: RunActors) -> tuple[int, int]:
    """Restore trainers and the data position from --load; returns (next rollout id, weight version)."""
    import ray

    folder = checkpoint.resolve_checkpoint(config.checkpoint.load)
    extra = checkpoint.read_extra(folder)
    if "next_rollout_id" not in extra:
        raise FileNotFoundError(
            f"{folder}: not a checkpoint of `slime train` (no loop state in {checkpoint.EXTRA_FILE})"
        )
    run.actor.load(str(folder))
    if run.critic is not None:
        run.critic.load(str(folder.parent / "critic" / folder.name))  # --load may name the root or a step folder
    ray.get(run.rollout.load_state_dict.remote(extra["rollout"]))
    return int(extra["next_rollout_id"]), int(extra["weight_version"])


def should(interval: int | None, step: int, last: int) -> bool:
    """Every `interval` rollouts (1-based) and at the last one."""
    return interval is not None and ((step + 1) % interval == 0 or step + 1 == last)


def dump_rollout(folder: str, rollout_id: int, samples: list[Sample]) -> None:
    from slime.rollout.data import sample_to_dict

    path = Path(folder) / f"rollout_{rollout_id:06d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(sample_to_dict(s)) + "\n")


def describe_start(config: Config, backend, start: int) -> str:
    c = config.cluster
    spec = engine_spec(config, backend)
    return (
        f"slime: {backend.name} backend, {c.actor_num_nodes * c.actor_num_gpus_per_node} trainer process(es) "
        f"(TP {config.train.tensor_model_parallel_size}), {c.rollout_num_gpus // c.rollout_num_gpus_per_engine} "
        f"{spec.kind} engine(s){' in the trainer process' if spec.hosted_by_trainer else ''}"
        f"{', colocated' if c.colocate else ''}{', async' if config.train.async_rollout else ''}; "
        f"rollouts {start}..{config.train.num_rollout - 1}; run folder {config.logging.output_dir}"
        + (f"\n{spec.restart_reason}" if spec.restart_reason else "")
        + (f"\n{lora.describe()}" if (lora := LoraSpec.from_config(config.lora, engine_kind=spec.kind)) else "")
    )
