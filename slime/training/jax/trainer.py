"""The JAX policy trainer: the per-rank API of slime.training.actor.PolicyTrainer, on one device mesh.

One process drives every device of the mesh (JAX's single-controller model), so data parallelism is inside
the mesh: the trainer is handed the whole global batch. Parameters are fp32 under their HF names (see
slime.models.jax_dense), optimizer = optax AdamW behind global-norm clipping with Megatron's LR schedule and
no weight decay on 1-D parameters (norms, biases), like the Megatron trainer's two parameter groups.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from slime.models import jax_dense
from slime.models.lora import SCALING_NAME, write_peft
from slime.training import checkpoint
from slime.training.batch import TrainBatch
from slime.training.buckets import bucketed
from slime.training.config import TrainerConfig
from slime.training.jax import lora, sharding, step
from slime.training.jax.state import load_state, save_state

LOG_PROB_CHUNK = 4096  # vocabulary columns per step of the log-prob kernel
WEIGHT_NAMES = ("actor", "ref", "old")
RL_METRICS = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "ppo_kl", "tis_weight")


class JaxPolicyTrainer:
    def __init__(self, config: TrainerConfig, devices: list):
        self.config = config
        self.mesh = sharding.make_mesh(devices, tensor=config.tensor_parallel_size)
        self.dp = sharding.data_parallel_size(self.mesh)
        self.spec, shapes = jax_dense.spec_from_hf(config.hf_checkpoint, vocab_multiple=self.mesh.shape["tensor"])
        host_params, self.hf_dtypes = jax_dense.load_hf_params(config.hf_checkpoint, self.spec, shapes)
        self.lora = config.lora  # LoRA: `params` are the adapters, `frozen` the base (slime.training.jax.lora)
        host_params, host_frozen = self._split_lora(host_params, shapes)
        self.frozen_shardings = sharding.param_shardings(host_frozen, self.mesh)
        self.frozen = jax.device_put(host_frozen, self.frozen_shardings)
        if self.lora is None:
            self.param_shardings = sharding.param_shardings(host_params, self.mesh)
        else:
            self.param_shardings = lora.adapter_shardings(host_params, shapes, self.mesh)
        self.params = jax.device_put(host_params, self.param_shardings)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.rng = jax.random.key_data(jax.random.key(config.seed))  # no dropout today; kept for checkpoints
        self._snapshots: dict[str, dict[str, np.ndarray]] = {}
        self._host = None  # (params, optimizer state) in host memory while offloaded
        self.reset_optimizer()

    def _split_lora(self, host_params: dict, shapes: dict) -> tuple[dict, dict]:
        """(trainable, frozen): every parameter and nothing, or with LoRA fresh adapters and the base."""
        if self.lora is None:
            return host_params, {}
        return lora.initial_adapters(self.lora, shapes, self.spec.num_layers), host_params

    def model_params(self) -> dict:
        """The live parameters the model runs with, HF-named (LoRA: the adapters merged into the base)."""
        return self._full_params(self.params)

    def _full_params(self, trainable: dict) -> dict:
        """The model's parameters for `trainable` (LoRA: W + s B A merged on the mesh)."""
        if self.lora is None:
            return trainable
        merge = _program(
            ("merge", self.spec, self.mesh, self.lora), lambda: jax.jit(partial(lora.full_params, spec=self.lora))
        )
        return merge(trainable, self.frozen)

    # ---- optimizer ----------------------------------------------------------------------------------
    def _optimizer(self) -> optax.GradientTransformation:
        cfg = self.config
        decay_mask = {name: p.ndim > 1 for name, p in self.params.items()}
        adamw = optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.0, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, mask=decay_mask,
        )  # fmt: skip
        clip = optax.clip_by_global_norm(cfg.clip_grad) if cfg.clip_grad > 0 else optax.identity()
        return optax.chain(clip, adamw)  # state: (clip state, adamw state with its injected hyperparameters)

    def _state_shardings(self, state):
        """Moments follow their parameter's sharding; counters and hyperparameters are replicated."""

        def place(path, _leaf):
            for key in reversed(path):
                if isinstance(key, jax.tree_util.DictKey) and key.key in self.param_shardings:
                    return self.param_shardings[key.key]
            return sharding.replicated(self.mesh)

        return jax.tree_util.tree_map_with_path(place, state)

    def reset_optimizer(self) -> None:
        """Fresh moments, schedule back to its start, step counter 0 (RL after the SFT warm-up)."""
        self.tx = self._optimizer()
        shapes = jax.eval_shape(self.tx.init, self.params)
        self.opt_shardings = self._state_shardings(shapes)
        self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(self.params)
        self._update = _program(
            ("update", self.config, self.spec, self.mesh),
            lambda: jax.jit(
                partial(_apply_update, self.tx),
                out_shardings=(self.param_shardings, self.opt_shardings, None),
                donate_argnums=(0, 1),
            ),
        )
        self.step = 0
        self.schedule_step = 0

    def _optimizer_step(self, grads, lr: float | None) -> tuple[float, float]:
        used_lr = step.scheduled_lr(self.config, self.schedule_step) if lr is None else lr
        self.params, self.opt_state, grad_norm = self._update(self.params, self.opt_state, grads, used_lr)
        if not np.isfinite(float(grad_norm)):
            raise RuntimeError(f"optimizer step {self.step} failed (non-finite gradients)")
        if lr is None:
            self.schedule_step += 1
        self.step += 1
        return float(grad_norm), float(used_lr)

    # ---- batches ------------------------------------------------------------------------------------
    def _micro_batches(self, batch: TrainBatch) -> list[list[int]]:
        """Each micro-batch spans the mesh: dp times the per-device budget of the Megatron trainer."""
        cfg = self.config
        rows = None if cfg.micro_batch_size is None else cfg.micro_batch_size * self.dp
        return batch.micro_batch_indices(cfg.max_tokens_per_micro_batch * self.dp, rows)

    def _device_arrays(self, batch: TrainBatch, indices: list[int]) -> dict:
        arrays = step.micro_arrays(batch, indices, self.dp)
        return jax.device_put(arrays, self.batch_sharding)

    def _function(self, kind: str, settings: step.LossSettings | None = None):
        """The jitted log-prob ("log_probs") or loss-and-gradient ("rl", "sft") program for this model and mesh."""
        if kind == "log_probs":
            temperature = self.config.rollout_temperature
            fn = partial(step.response_log_probs, self.spec, temperature=temperature, chunk_size=LOG_PROB_CHUNK)
            key = (kind, self.spec, self.mesh, temperature, self.lora)
            program = _program(key, lambda: jax.jit(lora.with_frozen(fn, self.lora)))
        else:
            loss = step.rl_loss if kind == "rl" else step.sft_loss
            fn = lora.with_frozen(partial(loss, spec=self.spec, s=settings), self.lora)
            grad_fn = jax.value_and_grad(fn, has_aux=True)  # in the trainable parameters only
            program = _program(
                (kind, self.spec, self.mesh, settings, self.lora),
                lambda: jax.jit(grad_fn, out_shardings=(None, self.param_shardings)),
            )
        return lambda params, *args: program(params, self.frozen, *args)

    # ---- the calls the loop makes -------------------------------------------------------------------
    def compute_log_probs(self, batch: TrainBatch, weights: str = "actor") -> tuple[list, list]:
        """Per-sample log-probs and entropies (torch, fp32) of the response tokens under the named weights."""
        if weights not in WEIGHT_NAMES and not self.has_snapshot(weights):
            raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHT_NAMES)} or a snapshot name")
        log_probs: list = [None] * len(batch)
        entropies: list = [None] * len(batch)
        fn = self._function("log_probs")
        with self.use_weights(weights) as params:
            for indices in self._micro_batches(batch):
                lp, ent = jax.device_get(fn(params, self._device_arrays(batch, indices)))
                for row, i in enumerate(indices):
                    n = batch.response_lengths[i]
                    log_probs[i], entropies[i] = (
                        torch.from_numpy(lp[row, :n].copy()),
                        torch.from_numpy(ent[row, :n].copy()),
                    )
        return log_probs, entropies

    def _denominator(self, batch: TrainBatch) -> float:
        local = batch.num_loss_tokens() if self.config.loss_reduction == "token" else len(batch)
        return max(float(local), 1.0)

    def _accumulate(self, kind: str, batch: TrainBatch, settings: step.LossSettings) -> tuple[dict, dict]:
        fn = self._function(kind, settings)
        denominator = jnp.float32(self._denominator(batch))
        # the Megatron trainer's metric names, each present even when its term is off
        totals = dict.fromkeys(RL_METRICS if kind == "rl" else ("loss",), 0.0)
        grads = None
        for indices in self._micro_batches(batch):
            (_, metrics), micro_grads = fn(self.params, self._device_arrays(batch, indices), denominator)
            grads = micro_grads if grads is None else jax.tree.map(jnp.add, grads, micro_grads)
            for name, value in jax.device_get(metrics).items():
                totals[name] += float(value)
        return grads, totals

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of the RL loss over the whole global batch."""
        cfg = self.config
        if cfg.use_kl_loss and batch.ref_log_probs is None:
            raise ValueError("use_kl_loss is on but batch.ref_log_probs is empty: call compute_log_probs(batch, 'ref')")
        if cfg.use_tis and any(r is None for r in batch.rollout_log_probs):
            raise ValueError("use_tis is on but some samples have no rollout_log_probs")
        settings = step.LossSettings.of(cfg, LOG_PROB_CHUNK, batch.old_log_probs is not None)
        grads, totals = self._accumulate("rl", batch, settings)
        return self._finish(grads, totals, batch, None)

    def sft_step(self, batch: TrainBatch, lr: float | None = None) -> dict[str, float]:
        settings = step.LossSettings.of(self.config, LOG_PROB_CHUNK, False)
        grads, totals = self._accumulate("sft", batch, settings)
        return self._finish(grads, totals, batch, lr)

    def _finish(self, grads, totals: dict, batch: TrainBatch, lr: float | None) -> dict[str, float]:
        grad_norm, used_lr = self._optimizer_step(grads, lr)
        return {**totals, "tokens": float(batch.num_tokens()), "grad_norm": grad_norm, "lr": used_lr,
                "step": float(self.step)}  # fmt: skip

    # ---- weight snapshots ---------------------------------------------------------------------------
    def snapshot(self, name: str) -> None:
        if name == "actor":
            raise ValueError('"actor" names the live weights; choose another snapshot name')
        self._snapshots[name] = jax.device_get(self.params)

    def has_snapshot(self, name: str) -> bool:
        return name in self._snapshots

    @contextlib.contextmanager
    def use_weights(self, name: str = "actor"):
        """The parameters to run with: the live ones, or a snapshot placed on the mesh for the call."""
        if name == "actor":
            yield self.params
            return
        if name not in self._snapshots:
            have = ", ".join(self._snapshots) or "none"
            raise KeyError(f"no weight snapshot {name!r}; call snapshot({name!r}) first (have: {have})")
        yield jax.device_put(self._snapshots[name], self.param_shardings)

    # ---- colocation: parameters and moments to host memory and back ----------------------------------
    def offload(self) -> None:
        self._host = (jax.device_get(self.params), jax.device_get(self.opt_state), jax.device_get(self.frozen))
        self.params = self.opt_state = self.frozen = None

    def onload(self) -> None:
        host_params, host_state, host_frozen = self._host
        self.params = jax.device_put(host_params, self.param_shardings)
        self.opt_state = jax.device_put(host_state, self.opt_shardings)
        self.frozen = jax.device_put(host_frozen, self.frozen_shardings)
        self._host = None

    # ---- weights out --------------------------------------------------------------------------------
    def hf_named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, value in jax_dense.hf_tensors(self._full_params(self.params), self.spec).items():
            yield name, torch.from_numpy(np.array(value))  # a writable copy: torch refuses read-only memory

    def hf_adapter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """LoRA: the PEFT-named A and B of every adapter."""
        for name, value in jax_dense.hf_tensors(self.params, self.spec).items():
            yield name, torch.from_numpy(np.array(value))

    def hf_weight_buckets(self, bucket_bytes: int = 512 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Merged HF weights, or with LoRA synced as adapters their A, B and the scaling (as the Megatron trainer)."""
        if self.lora is not None and self.lora.sync == "adapters":
            scaling = torch.tensor([self.lora.scaling], dtype=torch.float32)
            yield from bucketed([*self.hf_adapter_tensors(), (SCALING_NAME, scaling)], bucket_bytes)
            return
        yield from bucketed(self.hf_named_tensors(), bucket_bytes)

    def save_hf(self, directory: str | os.PathLike) -> Path:
        tensors = jax_dense.hf_tensors(self._full_params(self.params), self.spec, self.hf_dtypes)
        return checkpoint.write_hf_folder(Path(directory), tensors, self.config.hf_checkpoint)

    def save_lora(self, directory: str | os.PathLike) -> Path:
        """--save-lora: the adapters in PEFT's format."""
        return write_peft(directory, self.lora, dict(self.hf_adapter_tensors()), self.config.hf_checkpoint)

    # ---- checkpoints --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, step: int | None = None, extra: dict | None = None) -> Path:
        """Atomically write parameters, optimizer state, snapshots, counters and RNG (and the loop's `extra`)."""
        root = Path(directory)
        step_id = self.step if step is None else step
        tmp = checkpoint.begin_save(root, step_id, True, lambda: None)
        save_state(tmp, self)
        if extra is not None:
            checkpoint.write_extra(tmp, extra)
        meta = {"trainer": "jax", "mesh": dict(self.mesh.shape), "hf_checkpoint": str(self.config.hf_checkpoint)}
        return checkpoint.finish_save(root, tmp, step_id, meta, self.config.keep_last_n, True, lambda: None)

    def load(self, directory: str | os.PathLike) -> int:
        folder = checkpoint.resolve_checkpoint(directory)
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("trainer") != "jax":
            raise ValueError(
                f"{folder}: not a JAX-trainer checkpoint (written by the {meta.get('trainer', 'megatron')} trainer)"
            )
        load_state(folder, self)
        return self.step


# Jitted programs shared by every trainer in the process with the same model, mesh and settings (a trainer
# rebuilt from a checkpoint, a fresh optimizer after the SFT warm-up): compiled once, not once per instance.
_PROGRAMS: dict = {}


def _program(key, build):
    if key not in _PROGRAMS:
        _PROGRAMS[key] = build()
    return _PROGRAMS[key]


def _apply_update(tx, params, opt_state, grads, lr):
    """One AdamW step at learning rate `lr` (set as the injected hyperparameter): (params, state, grad norm)."""
    opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)
