"""The training batch: samples turned into per-token tensors, split by data-parallel rank and into
micro-batches by a token budget. Every split is deterministic (same samples -> same micro-batches)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from slime.types import Sample


@dataclass
class TrainBatch:
    """Per-sample lists; response-level tensors have one entry per response token.

    `advantages` / `returns` start from Sample.advantage (broadcast to the response) or zeros; the RL loop
    may replace them with per-token values. old/ref log-probs and values are filled by the trainers.
    """

    tokens: list[list[int]]
    response_lengths: list[int]
    loss_masks: list[Tensor]
    advantages: list[Tensor]
    returns: list[Tensor]
    rollout_log_probs: list[Tensor | None]
    rewards: list[float]
    pad_token_id: int
    old_log_probs: list[Tensor] | None = None
    ref_log_probs: list[Tensor] | None = None
    values: list[Tensor] | None = None
    sample_indices: list[int] = field(default_factory=list)
    # MoE: per sample, the engine's expert ids (flat int32: tokens but the last x num_hidden_layers x top-k, SGLang's
    # layout; training.routing_replay.decode_routes keeps the MoE layers), or None
    routed_experts: list[Tensor | None] | None = None

    @staticmethod
    def from_samples(samples: list[Sample], pad_token_id: int) -> TrainBatch:
        if not samples:
            raise ValueError("TrainBatch.from_samples: no samples")
        tokens, lengths, masks, advantages, rollout, rewards = [], [], [], [], [], []
        for i, s in enumerate(samples):
            n = s.response_length
            if n <= 0 or n >= len(s.tokens):
                raise ValueError(
                    f"sample {s.index if s.index is not None else i}: response_length={n} needs 0 < it < len(tokens)={len(s.tokens)}"
                )
            mask = s.loss_mask if s.loss_mask is not None else [1] * n
            if len(mask) != n:
                raise ValueError(
                    f"sample {s.index if s.index is not None else i}: loss_mask has {len(mask)} entries, response_length={n}"
                )
            if s.rollout_log_probs is not None and len(s.rollout_log_probs) != n:
                raise ValueError(
                    f"sample {s.index if s.index is not None else i}: rollout_log_probs has {len(s.rollout_log_probs)} entries, "
                    f"response_length={n}"
                )
            tokens.append(list(s.tokens))
            lengths.append(n)
            masks.append(torch.tensor(mask, dtype=torch.float32))
            advantages.append(torch.full((n,), float(s.advantage or 0.0)))
            rollout.append(
                None if s.rollout_log_probs is None else torch.tensor(s.rollout_log_probs, dtype=torch.float32)
            )
            rewards.append(s.scalar_reward() if s.reward is not None and not isinstance(s.reward, dict) else 0.0)
        return TrainBatch(
            tokens=tokens,
            response_lengths=lengths,
            loss_masks=masks,
            advantages=advantages,
            returns=[a.clone() for a in advantages],
            rollout_log_probs=rollout,
            rewards=rewards,
            pad_token_id=pad_token_id,
            sample_indices=list(range(len(samples))),
            routed_experts=_routed_experts(samples),
        )

    def __len__(self) -> int:
        return len(self.tokens)

    # Batches cross process boundaries (Ray's object store) every step. Pickled as they are, hundreds of
    # small tensors cost ~0.5 ms each; packed into one flat tensor per field they cost one copy.
    _RESPONSE_FIELDS = ("loss_masks", "advantages", "returns", "old_log_probs", "ref_log_probs", "values")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._RESPONSE_FIELDS:
            values = state[name]
            state[name] = None if values is None else torch.cat([v.float().reshape(-1) for v in values])
        present = [r is not None for r in self.rollout_log_probs]
        state["rollout_log_probs"] = (
            present,
            torch.cat([r.float() for r in self.rollout_log_probs if r is not None] or [torch.zeros(0)]),
        )
        state["tokens"] = torch.tensor([t for row in self.tokens for t in row], dtype=torch.int64)
        state["_token_lengths"] = [len(row) for row in self.tokens]
        return state

    def __setstate__(self, state: dict) -> None:
        lengths = state["response_lengths"]
        for name in self._RESPONSE_FIELDS:
            if state[name] is not None:
                state[name] = list(state[name].split(lengths))
        present, flat = state["rollout_log_probs"]
        pieces = iter(flat.split([n for n, p in zip(lengths, present) if p]))
        state["rollout_log_probs"] = [next(pieces) if p else None for p in present]
        state["tokens"] = [row.tolist() for row in state["tokens"].split(state.pop("_token_lengths"))]
        self.__dict__.update(state)

    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def num_loss_tokens(self) -> int:
        return int(torch.cat(self.loss_masks).sum()) if self.loss_masks else 0

    def rows_with_nonzero(self, field: str) -> list[int]:
        """Rows whose per-token `field` (e.g. "advantages") has a nonzero entry: one reduction, not one per row."""
        values = getattr(self, field)
        return (pad_rows(values, max(v.shape[0] for v in values)) != 0).any(dim=1).nonzero().view(-1).tolist()

    def select(self, indices: list[int]) -> TrainBatch:
        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return TrainBatch(
            tokens=pick(self.tokens),
            response_lengths=pick(self.response_lengths),
            loss_masks=pick(self.loss_masks),
            advantages=pick(self.advantages),
            returns=pick(self.returns),
            rollout_log_probs=pick(self.rollout_log_probs),
            rewards=pick(self.rewards),
            pad_token_id=self.pad_token_id,
            old_log_probs=pick(self.old_log_probs),
            ref_log_probs=pick(self.ref_log_probs),
            values=pick(self.values),
            sample_indices=pick(self.sample_indices),
            routed_experts=pick(self.routed_experts),
        )

    def chunks(self, size: int) -> list[TrainBatch]:
        """Consecutive slices of `size` samples: the optimizer steps of one rollout."""
        if len(self) % size:
            raise ValueError(f"{len(self)} samples cannot be cut into global batches of {size}")
        return [self.select(list(range(start, start + size))) for start in range(0, len(self), size)]

    def split_for_dp(self, dp_rank: int, dp_size: int) -> TrainBatch:
        """This rank's share: samples dp_rank, dp_rank + dp_size, ... (balanced counts, stable order)."""
        if len(self) % dp_size:
            raise ValueError(f"{len(self)} samples cannot be split evenly over {dp_size} data-parallel ranks")
        return self.select(list(range(dp_rank, len(self), dp_size)))

    def micro_batch_indices(self, max_tokens_per_micro_batch: int, max_rows: int | None = None) -> list[list[int]]:
        """Consecutive samples grouped so that (rows x longest row) <= the budget and rows <= max_rows;
        a sample longer than the budget goes alone."""
        groups: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i, seq in enumerate(self.tokens):
            new_longest = max(longest, len(seq))
            full = max_rows is not None and len(current) >= max_rows
            if current and (full or new_longest * (len(current) + 1) > max_tokens_per_micro_batch):
                groups.append(current)
                current, new_longest = [], len(seq)
            current.append(i)
            longest = new_longest
        if current:
            groups.append(current)
        return groups


@dataclass(frozen=True)
class MicroBatch:
    """Padded model inputs plus response-aligned tensors [rows, longest response]."""

    input_ids: Tensor  # [rows, seq]
    position_ids: Tensor  # [rows, seq]
    response_starts: list[int]  # index in input_ids of each sample's first response token
    response_lengths: list[int]
    response_mask: Tensor  # [rows, longest response], loss mask (0 on padding)
    routed_experts: list[Tensor | None] | None = None  # the engine's expert ids per row (see TrainBatch)

    def pad_responses(self, per_sample: list[Tensor]) -> Tensor:
        return pad_rows(per_sample, self.response_mask.shape[1])


def _routed_experts(samples: list[Sample]) -> list[Tensor | None] | None:
    if all(s.routed_experts is None for s in samples):
        return None
    return [None if s.routed_experts is None else torch.tensor(s.routed_experts, dtype=torch.int32) for s in samples]


def pad_rows(per_sample: list[Tensor], width: int) -> Tensor:
    """Per-sample vectors as one float32 [rows, width] tensor, zero-padded on the right (one op for all rows:
    a step has hundreds of them, and a copy per row costs more than the model's smaller layers)."""
    if not per_sample:
        return torch.zeros(0, width)
    out = torch.nn.utils.rnn.pad_sequence([v.float().reshape(-1) for v in per_sample], batch_first=True)
    return torch.nn.functional.pad(out, (0, width - out.shape[1]))


def unpad_rows(padded: Tensor, lengths: list[int]) -> list[Tensor]:
    """The inverse of pad_rows: row i's first lengths[i] entries, each its own tensor (a copy, not a view of a
    shared buffer: pickled alone, a view would carry the whole buffer)."""
    valid = torch.arange(padded.shape[1]).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return [piece.clone() for piece in padded[valid].split(lengths)]


def collate(batch: TrainBatch, indices: list[int]) -> MicroBatch:
    rows = [batch.tokens[i] for i in indices]
    seq = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [batch.pad_token_id] * (seq - len(r)) for r in rows], dtype=torch.long)
    lengths = [batch.response_lengths[i] for i in indices]
    mask = pad_rows([batch.loss_masks[i] for i in indices], max(lengths))
    return MicroBatch(
        input_ids=input_ids,
        position_ids=torch.arange(seq).unsqueeze(0).expand(len(rows), seq).contiguous(),
        response_starts=[len(r) - n for r, n in zip(rows, lengths)],
        response_lengths=lengths,
        response_mask=mask,
        routed_experts=None if batch.routed_experts is None else [batch.routed_experts[i] for i in indices],
    )
