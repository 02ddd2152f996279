"""The embedded engine: an in-process, continuously batching generator over a static KV cache, in torch.

The request lifecycle (queue, slots, finishing, abort, pause, staged weight updates) is the shared
ContinuousBatchingEngine (rollout/engines/batching.py); this module is the torch model under it: a padded
prefill of each distinct admitted prompt (batched within a token budget; the other slots holding the same
prompt get a copy of its cache), one decode step for every active slot, sampling with per-request generators,
routed-expert recording for MoE, and weight copies into the model.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from slime.models.lora import AdapterMerger, split_adapters
from slime.rollout.engines.base import GenerateRequest, ResultCallback, WeightUpdateError
from slime.rollout.engines.batching import BatchedSequence, ContinuousBatchingEngine
from slime.rollout.engines.embedded.model import DecoderSpec, ServingModel
from slime.rollout.engines.embedded.sampling import BatchSampling, sample_tokens
from slime.rollout.engines.embedded.weights import (
    copy_into_model,
    load_checkpoint_into,
    missing_names,
    read_checkpoint_tensors,
    validate_named_tensors,
)

# Upper bound on prompt tokens (padded) in one prefill batch; bounds activation memory for long prompts.
PREFILL_TOKEN_BUDGET = 16384


@dataclass
class _Routes:
    tensor: torch.Tensor | None = None  # [rows, num_hidden_layers, k] of one forward (dense layers: 0)


@dataclass(eq=False)
class _Sequence(BatchedSequence):
    generator: torch.Generator | None = None  # the request's own, when it has a seed and samples
    serial: int = -1  # unique per engine: identifies the sequence in caches (ids of dead objects get reused)
    routed: list[torch.Tensor] = field(default_factory=list)  # [tokens, all layers, k] per forward, when asked

    @property
    def uses_filter(self) -> bool:
        p = self.params
        return (p.top_k > 1) or p.top_p < 1.0 or p.min_p > 0.0


def _distinct_prompts(seqs: list[_Sequence]) -> tuple[list[_Sequence], dict[int, list[_Sequence]]]:
    """The first sequence of each distinct prompt, shortest prompts first, and by id(first) every sequence
    (first included) that has that prompt."""
    first: dict[tuple[int, ...], _Sequence] = {}
    members: dict[int, list[_Sequence]] = {}
    for seq in seqs:
        leader = first.setdefault(tuple(seq.prompt), seq)
        members.setdefault(id(leader), []).append(seq)
    return sorted(first.values(), key=lambda s: len(s.prompt)), members


def _prefill_batches(seqs: list[_Sequence], key=lambda s: len(s.prompt)) -> list[list[_Sequence]]:
    """Consecutive runs of `seqs` (sorted by `key`, the tokens each prefills) whose padded size fits
    PREFILL_TOKEN_BUDGET."""
    batches: list[list[_Sequence]] = []
    for seq in seqs:  # sorted ascending, so the newest prompt is the batch's longest
        if batches and key(seq) * (len(batches[-1]) + 1) <= PREFILL_TOKEN_BUDGET:
            batches[-1].append(seq)
        else:
            batches.append([seq])
    return batches


class CheckpointTokenizer:
    """The checkpoint's tokenizer.json through the `tokenizers` library (what HF fast tokenizers wrap):
    encode adds the special tokens its post-processor defines (e.g. Llama's BOS), as HF's encode does.
    Loading it this way keeps transformers out of the server process, which halves its start time."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _load_tokenizer(path: str) -> CheckpointTokenizer | None:
    """The checkpoint's tokenizer when it ships one (needed for text prompts and stop strings), else None."""
    file = os.path.join(path, "tokenizer.json")
    return CheckpointTokenizer(file) if os.path.isfile(file) else None


class EmbeddedEngine(ContinuousBatchingEngine):
    """Serve an HF checkpoint (Qwen2, Qwen3, Llama) in this process on any torch device."""

    engine_name = "slime-embedded"
    returns_routed_experts = True  # for MoE models; a dense model's answers carry none, as SGLang's
    rid_prefix = "embedded"

    def __init__(
        self,
        hf_checkpoint_dir: str,
        device: str = "cpu",
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        super().__init__(max_batch_size, max_seq_len)
        self.model_path = hf_checkpoint_dir
        self.spec = DecoderSpec.from_checkpoint(hf_checkpoint_dir)
        self.model_type = self.spec.model_type
        self.eos_token_ids = self.spec.eos_token_ids
        self.model = ServingModel(self.spec, max_batch_size, max_seq_len, device, dtype)
        load_checkpoint_into(self.model, hf_checkpoint_dir)
        self.tokenizer = _load_tokenizer(hf_checkpoint_dir)
        # Sampling draws happen on the host (one number per row), whatever the model's device.
        self._generator = torch.Generator().manual_seed(seed)
        self._sampling_cache: tuple[tuple[int, ...], BatchSampling] | None = None
        self._serials = itertools.count()
        self._start_worker()

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def _new_sequence(
        self, request: GenerateRequest, prompt: list[int], callback: ResultCallback, stop_ids: frozenset[int]
    ) -> _Sequence:
        params = request.sampling_params
        generator = None
        if params.seed is not None and not params.is_greedy:
            generator = torch.Generator().manual_seed(params.seed)
        return _Sequence(request, prompt, callback, stop_ids, generator=generator, serial=next(self._serials))

    # ---- sampling ------------------------------------------------------------------------------------
    def _sampling_rows(self, rows: list[_Sequence | None]) -> BatchSampling:
        """Per-row parameters; None rows (free slots inside the decoded range) are greedy dummies.

        Cached while the rows stay the same sequences (most decode steps), to keep per-step host work low.
        """
        key = tuple(s.serial if s is not None else -1 for s in rows)
        if self._sampling_cache is not None and self._sampling_cache[0] == key:
            return self._sampling_cache[1]
        params = self._build_sampling_rows(rows)
        self._sampling_cache = (key, params)
        return params

    def _build_sampling_rows(self, rows: list[_Sequence | None]) -> BatchSampling:
        params = [s.params if s is not None else None for s in rows]
        temperature = [p.temperature if p is not None else 0.0 for p in params]
        top_k = [p.top_k if p is not None else 0 for p in params]
        top_p = [p.top_p if p is not None else 1.0 for p in params]
        min_p = [p.min_p if p is not None else 0.0 for p in params]
        greedy = [p is None or p.is_greedy for p in params]
        device = self.model.device
        return BatchSampling(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            unit_temperature=all(t in (0.0, 1.0) for t in temperature),
            any_filter=any(s is not None and s.uses_filter for s in rows),
        )

    def _uniforms(self, rows: list[_Sequence | None], params: BatchSampling) -> torch.Tensor | None:
        """One U[0,1) per row: from the request's own generator when it has a seed, else the engine's."""
        if params.all_greedy:
            return None
        draws = torch.rand(len(rows), generator=self._generator, dtype=torch.float64).tolist()
        for i, seq in enumerate(rows):
            if seq is not None and seq.generator is not None:
                draws[i] = torch.rand(1, generator=seq.generator, dtype=torch.float64).item()
        return torch.tensor(draws, dtype=torch.float32, device=self.model.device)

    def _sample(self, logits: torch.Tensor, rows: list[_Sequence | None]) -> tuple[list[int], list[float]]:
        params = self._sampling_rows(rows)
        tokens, log_probs = sample_tokens(logits, params, self._uniforms(rows, params))
        return tokens.tolist(), log_probs.tolist()

    # ---- forward passes ------------------------------------------------------------------------------
    def _prefill(self, admitted: list[_Sequence]) -> tuple[list[int], list[float]]:
        """Prefill each distinct prompt once (a GRPO group's samples share theirs), copy its cache into the
        other slots that hold the same prompt, then sample every row from its prompt's logits."""
        sampled: dict[int, tuple[int, float]] = {}  # serial -> (token, log-prob)
        leaders, members = _distinct_prompts(admitted)
        for batch in _prefill_batches(leaders):
            logits, routes = self._prefill_forward(batch)
            rows, row_logits, sources, targets = [], [], [], []
            for i, leader in enumerate(batch):
                copies = members[id(leader)]
                sources += [leader.slot] * (len(copies) - 1)
                targets += [s.slot for s in copies[1:]]
                for seq in copies:
                    if routes is not None:
                        seq.routed.append(routes[i, : len(seq.prompt)])
                rows += copies
                row_logits += [i] * len(copies)
            self.model.copy_prompt_cache(sources, targets, max(len(s.prompt) for s in batch))
            ids, log_probs = self._sample(logits[torch.tensor(row_logits, device=logits.device)], rows)
            sampled.update((s.serial, (token, lp)) for s, token, lp in zip(rows, ids, log_probs))
        return [sampled[s.serial][0] for s in admitted], [sampled[s.serial][1] for s in admitted]

    refills_after_update = True

    def _refill(self, running: list[_Sequence]) -> None:
        """See ContinuousBatchingEngine._refill: each sequence's cache again from position 0, in batches within
        the prefill token budget."""
        device = self.model.device
        for batch in _prefill_batches(sorted(running, key=lambda s: s.next_position), key=lambda s: s.next_position):
            seen = [s.prompt + s.output_ids[:-1] for s in batch]
            width = max(len(t) for t in seen)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for i, t in enumerate(seen):
                tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            lengths = torch.tensor([len(t) for t in seen], device=device)
            self.model.prefill(tokens.to(device), lengths, torch.tensor([s.slot for s in batch], device=device))

    def _prefill_forward(self, group: list[_Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits at each prompt's last token [rows, V], and the routed experts [rows, width, layers, k] when
        asked for."""
        device = self.model.device
        width = max(len(s.prompt) for s in group)
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        for i, s in enumerate(group):
            tokens[i, : len(s.prompt)] = torch.tensor(s.prompt, dtype=torch.long)
        lengths = torch.tensor([len(s.prompt) for s in group], device=device)
        slots = torch.tensor([s.slot for s in group], device=device)
        with self._recording_routes(group) as routed:
            logits = self.model.prefill(tokens.to(device), lengths, slots)
        if routed.tensor is None:
            return logits, None
        return logits, routed.tensor.view(len(group), width, *routed.tensor.shape[1:])

    def _decode(self, running: list[_Sequence]) -> tuple[list[int], list[float]]:
        """One token for every running sequence. Rows address cache slots 0..highest directly while most of
        those slots run; once most have finished (a rollout's tail), only the running slots are computed."""
        highest = max(s.slot for s in running) + 1
        slots = None
        if len(running) * 3 < highest * 2:
            rows: list[_Sequence | None] = sorted(running, key=lambda s: s.slot)
            slots = torch.tensor([s.slot for s in rows], device=self.model.device)
        else:
            rows = [None] * highest
            for s in running:
                rows[s.slot] = s
        tokens = [s.output_ids[-1] if s is not None else 0 for s in rows]
        positions = [s.next_position if s is not None else self.model.scratch_position for s in rows]
        attend_len = max(s.next_position for s in running) + 1
        device = self.model.device
        with self._recording_routes(running) as routed:
            logits = self.model.decode(
                torch.tensor(tokens, device=device), torch.tensor(positions, device=device), attend_len, slots
            )
        row_of = {id(s): i for i, s in enumerate(rows) if s is not None}
        if routed.tensor is not None:
            for s in running:
                s.routed.append(routed.tensor[row_of[id(s)] : row_of[id(s)] + 1])
        ids, log_probs = self._sample(logits, rows)
        return [ids[row_of[id(s)]] for s in running], [log_probs[row_of[id(s)]] for s in running]

    @contextlib.contextmanager
    def _recording_routes(self, seqs: list[_Sequence]):
        """Yields a holder whose tensor, after the forward, is the routed experts [rows, num_hidden_layers, k]
        (rows as the forward laid them out) when a sequence asked for them and the model has MoE layers; else
        None. SGLang's layout: a row for every layer, zeros in the dense ones (its capture buffer starts at zero
        and only MoE layers write to it), so the trainer decodes both engines' routes the same way."""
        holder: _Routes = _Routes()
        if not any(s.request.return_routed_experts for s in seqs) or not self.model.spec.sparse_layers:
            yield holder
            return
        self.model.routed_experts = []
        try:
            yield holder
            holder.tensor = self._all_layers(self.model.routed_experts)
        finally:
            self.model.routed_experts = None

    def _all_layers(self, moe_layer_routes: list[torch.Tensor]) -> torch.Tensor:
        """Per MoE layer [rows, k] -> [rows, num_hidden_layers, k] int32, zeros in the dense layers."""
        sparse = torch.tensor(self.model.spec.sparse_layers)
        rows, k = moe_layer_routes[0].shape
        out = torch.zeros(rows, len(sparse), k, dtype=torch.int32)
        out[:, sparse] = torch.stack(moe_layer_routes, dim=1).to(torch.int32).cpu()
        return out

    def _routed_experts(self, seq: _Sequence) -> list[int] | None:
        if not seq.request.return_routed_experts or not seq.routed:
            return None
        # every token fed to the model: prompt + outputs but the last (SGLang's shape: len(tokens) - 1)
        fed = len(seq.output_ids) + len(seq.prompt) - 1 if seq.output_ids else 0
        return torch.cat(seq.routed)[:fed].flatten().tolist()

    # ---- KV cache and weights ------------------------------------------------------------------------
    def _kv_cache_allocated(self) -> bool:
        return self.model.kv_cache_allocated

    def _free_kv_cache(self) -> None:
        self.model.free_kv_cache()

    def _allocate_kv_cache(self) -> None:
        self.model.allocate_kv_cache()

    def flush_cache(self) -> None:
        """No prefix cache to flush: each request prefills its own slot."""

    def _check_bucket(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        weights, adapters = split_adapters(list(named_tensors))
        try:
            adapters = self._adapters.check(adapters, self.model.hf_views)
        except ValueError as e:
            raise WeightUpdateError(f"weight update rejected: {e}") from None
        return validate_named_tensors(self.model, weights) + adapters

    def _staged_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.model.device, self.model.dtype, copy=True)

    def _install_weights(self, prepared: list[tuple[str, torch.Tensor]]) -> None:
        """Weights are copied in; a LoRA adapter update (--lora-sync adapters) becomes W0 + s B A here."""
        weights, adapters = split_adapters(prepared)
        try:
            merged = self._adapters.merged(adapters, self.model.hf_views)
        except ValueError as e:
            raise WeightUpdateError(f"weight update rejected: {e}") from None
        copy_into_model(self.model, weights + merged)

    @functools.cached_property
    def _adapters(self) -> AdapterMerger:
        return AdapterMerger()

    def update_weights_from_disk(self, path: str, version: int) -> None:
        with self._update_lock:
            self._pending_update.clear()
            try:
                spec = DecoderSpec.from_checkpoint(path)
            except ValueError as e:
                raise WeightUpdateError(str(e)) from None
            if spec != self.spec:
                raise WeightUpdateError(
                    f"{path}: its config.json describes a different model than the one being served ({self.model_path})"
                )
            tensors = read_checkpoint_tensors(path)
            checked = validate_named_tensors(self.model, tensors.items())
            missing = missing_names(self.model, (n for n, _ in checked))
            if missing:
                raise WeightUpdateError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
            self._set_weights(checked, version)

    def named_weights(self) -> dict[str, torch.Tensor]:
        """HF name -> the live tensor (a view into the fused buffers). Read-only by convention."""
        return dict(self.model.hf_views)
