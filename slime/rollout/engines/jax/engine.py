"""The JAX engine: continuous batching over a static KV cache with jitted, shape-bucketed steps (model.py).

The request lifecycle (queue, slots, finishing, abort, pause, staged weight updates) is the shared
ContinuousBatchingEngine (rollout/engines/batching.py), the same as the embedded engine's; this module is the
JAX model under it: one padded prefill of the admitted prompts, then one decode step for every active slot
(sequences prefilled in an iteration decode in it too), both shape-bucketed so compilations stay bounded.

Determinism: each request samples with its own key, fold_in(PRNGKey(seed), index of the token), where seed is
the request's sampling seed (or one the engine draws from its own seed, in submission order). A request's
tokens therefore do not depend on what else is in the batch.

Weights are a `{hf_name: array}` pytree, the same layout as the JAX trainer's, so an update is a dict of new
arrays: validated names and shapes, staged until `finish`, swapped in between two steps.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from slime.models import jax_dense
from slime.models.jax_dense import EMBED, LM_HEAD
from slime.rollout.engines.base import GenerateRequest, ResultCallback, SamplingParams, WeightUpdateError
from slime.rollout.engines.batching import BatchedSequence, ContinuousBatchingEngine
from slime.rollout.engines.embedded.engine import _load_tokenizer
from slime.rollout.engines.embedded.model import DecoderSpec
from slime.rollout.engines.jax.model import RowSampling, StepFunctions, allocate_cache, bucket

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(eq=False)
class _Sequence(BatchedSequence):
    seed: int = 0  # uint32: the request's, or one the engine drew

    @property
    def truncates(self) -> bool:
        p = self.params
        return p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)


def _sampling_rows(rows: list[_Sequence | None]) -> tuple[RowSampling, bool]:
    """Per-row sampling inputs (None rows are greedy fillers) and whether any row truncates."""
    params = [s.params if s is not None else SamplingParams(temperature=0.0) for s in rows]
    sampling = RowSampling(
        temperature=np.array([p.temperature for p in params], np.float32),
        top_k=np.array([p.top_k for p in params], np.int32),
        top_p=np.array([p.top_p for p in params], np.float32),
        min_p=np.array([p.min_p for p in params], np.float32),
        seed=np.array([s.seed if s is not None else 0 for s in rows], np.uint32),
        counter=np.array([len(s.output_ids) if s is not None else 0 for s in rows], np.int32),
    )
    return sampling, any(s is not None and s.truncates for s in rows)


class JaxEngine(ContinuousBatchingEngine):
    """Serve an HF checkpoint (the dense families of slime.models.jax_dense) with jitted JAX steps."""

    engine_name = "slime-jax"
    rid_prefix = "jax"
    decodes_after_prefill = True

    def __init__(
        self,
        hf_checkpoint_dir: str,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        dtype: str = "float32",
        seed: int = 0,
        device=None,
    ):
        """device: the JAX device to serve on (default: the first one); a colocated engine takes one of the
        trainer's."""
        super().__init__(max_batch_size, max_seq_len)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.model_path = hf_checkpoint_dir
        self.model_type = DecoderSpec.from_checkpoint(hf_checkpoint_dir).model_type
        self.eos_token_ids = DecoderSpec.from_checkpoint(hf_checkpoint_dir).eos_token_ids
        self.spec, self.shapes = jax_dense.spec_from_hf(hf_checkpoint_dir)
        self.dtype = DTYPES[dtype]
        params, _ = jax_dense.load_hf_params(hf_checkpoint_dir, self.spec, self.shapes)
        self.device = device if device is not None else jax.local_devices()[0]
        self.params = {
            name: jax.device_put(jnp.asarray(value, self.dtype), self.device) for name, value in params.items()
        }
        self.tokenizer = _load_tokenizer(hf_checkpoint_dir)
        self.steps = StepFunctions(self.spec)
        self._cache: tuple | None = allocate_cache(self.spec, max_batch_size, max_seq_len, self.dtype, self.device)
        self._seeds = random.Random(seed)
        self._start_worker()

    @property
    def traces(self) -> dict[str, int]:
        """Compilations so far per step kind (prefill, decode): bounded by the number of shape buckets."""
        return dict(self.steps.traces)

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def _new_sequence(
        self, request: GenerateRequest, prompt: list[int], callback: ResultCallback, stop_ids: frozenset[int]
    ) -> _Sequence:
        params = request.sampling_params
        seed = self._seeds.getrandbits(32) if params.seed is None else params.seed % (1 << 32)
        return _Sequence(request, prompt, callback, stop_ids, seed=seed)

    # ---- steps ---------------------------------------------------------------------------------------
    def _prefill(self, group: list[_Sequence]) -> tuple[list[int], list[float]]:
        rows = bucket(len(group), self.max_batch_size)
        width = bucket(max(len(s.prompt) for s in group), self.max_seq_len)
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)
        slots = np.full(rows, self.max_batch_size, np.int32)  # padding rows write the scratch row
        for i, s in enumerate(group):
            tokens[i, : len(s.prompt)] = s.prompt
            lengths[i], slots[i] = len(s.prompt), s.slot
        sampling, filtered = _sampling_rows(group + [None] * (rows - len(group)))
        k_cache, v_cache = self._cache
        k_cache, v_cache, ids, log_probs = self.steps.prefill(
            self.params, k_cache, v_cache, tokens, lengths, slots, sampling, filtered=filtered
        )
        self._cache = (k_cache, v_cache)
        return np.asarray(ids)[: len(group)].tolist(), np.asarray(log_probs)[: len(group)].tolist()

    def _decode(self, running: list[_Sequence]) -> tuple[list[int], list[float]]:
        rows = bucket(max(s.slot for s in running) + 1, self.max_batch_size)
        table: list[_Sequence | None] = [None] * rows
        for s in running:
            table[s.slot] = s
        # A free row writes its (ignored) key at the last position, which any sequence overwrites before reading.
        free_position = self.max_seq_len - 1
        positions = np.array([s.next_position if s else free_position for s in table], np.int32)
        tokens = np.array([s.output_ids[-1] if s else 0 for s in table], np.int32)
        attend = bucket(max(s.next_position for s in running) + 1, self.max_seq_len)
        sampling, filtered = _sampling_rows(table)
        k_cache, v_cache = self._cache
        k_cache, v_cache, ids, log_probs = self.steps.decode(
            self.params, k_cache, v_cache, tokens, positions, sampling, attend=attend, filtered=filtered
        )
        self._cache = (k_cache, v_cache)
        rows_of_running = [s.slot for s in running]
        return np.asarray(ids)[rows_of_running].tolist(), np.asarray(log_probs)[rows_of_running].tolist()

    def _after_failed_step(self) -> None:
        if self._cache is not None and any(a.is_deleted() for a in self._cache):  # donated into a failed step
            self._allocate_kv_cache()

    # ---- KV cache and weights ------------------------------------------------------------------------
    def _kv_cache_allocated(self) -> bool:
        return self._cache is not None

    def _free_kv_cache(self) -> None:
        self._cache = None

    def _allocate_kv_cache(self) -> None:
        self._cache = allocate_cache(self.spec, self.max_batch_size, self.max_seq_len, self.dtype, self.device)

    def _check_bucket(self, named: Iterable[tuple[str, object]]) -> list[tuple[str, np.ndarray]]:
        """Host fp32 copies of a bucket, every name and shape checked before anything is kept."""
        checked = []
        for name, tensor in named:
            if name.endswith(IGNORED_SUFFIXES) or (self.spec.tied and name == LM_HEAD):
                continue
            if name not in self.shapes:
                raise WeightUpdateError(f"weight update rejected: unknown tensor name {name!r} for this model")
            value = _host_array(name, tensor)
            if tuple(value.shape) != tuple(self.shapes[name]):
                raise WeightUpdateError(
                    f"weight update rejected: {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(self.shapes[name])}"
                )
            checked.append((name, value))
        return checked

    def _prepare_weights(self, named: list[tuple[str, np.ndarray]]) -> dict[str, jax.Array]:
        return {name: jax.device_put(jnp.asarray(value, self.dtype), self.device) for name, value in named}

    def _install_weights(self, prepared: dict[str, jax.Array]) -> None:
        self.params = {**self.params, **prepared}

    def update_weights_in_place(self, params: Mapping[str, jax.Array], version: int) -> None:
        """A colocated JAX trainer's parameter pytree (same HF names, possibly sharded over the trainer's mesh and
        with vocabulary rows padded) placed onto this engine's device and dtype: device to device, no host copy and
        no renaming. Every name and shape is checked before anything is swapped in."""
        missing = sorted(set(self.shapes) - set(params))
        if missing:
            raise WeightUpdateError(f"weight update rejected: {missing[0]} is missing ({len(missing)} in all)")
        placed = {}
        for name, shape in self.shapes.items():
            value = params[name]
            if name in (EMBED, LM_HEAD) and value.shape[0] > self.spec.vocab_size:
                value = value[: self.spec.vocab_size]  # the trainer's padded rows (a multiple of its TP degree)
            if tuple(value.shape) != tuple(shape):
                raise WeightUpdateError(
                    f"weight update rejected: {name!r} has shape {tuple(value.shape)}, the model expects {tuple(shape)}"
                )
            placed[name] = jax.device_put(value, self.device).astype(self.dtype)
        with self._update_lock:
            self._pending_update.clear()
            with self._model_lock:
                self.params = placed
                self._weight_version = int(version)

    def update_weights_from_disk(self, path: str, version: int) -> None:
        with self._update_lock:
            self._pending_update.clear()
            try:
                spec, shapes = jax_dense.spec_from_hf(path)
                if spec != self.spec:
                    raise WeightUpdateError(
                        f"{path}: its config.json describes a different model than the one being served "
                        f"({self.model_path})"
                    )
                params, _ = jax_dense.load_hf_params(path, spec, shapes)
            except (ValueError, FileNotFoundError) as e:
                raise WeightUpdateError(str(e)) from None
            self._set_weights(list(params.items()), version)

    def named_weights(self) -> dict[str, np.ndarray]:
        """HF name -> the serving array (read-only)."""
        return dict(self.params)


def _host_array(name: str, tensor: object) -> np.ndarray:
    """A float32 numpy copy of a torch tensor, numpy array or JAX array; non-float tensors are rejected."""
    if hasattr(tensor, "detach"):  # torch (bfloat16 has no numpy dtype, so go through float32)
        if not tensor.is_floating_point():
            raise WeightUpdateError(f"weight update rejected: {name!r} has dtype {tensor.dtype}, expected floats")
        return tensor.detach().to("cpu").float().numpy()
    value = np.asarray(tensor)
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
        raise WeightUpdateError(f"weight update rejected: {name!r} has dtype {value.dtype}, expected floats")
    return value.astype(np.float32)
