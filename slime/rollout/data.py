"""Prompt datasets: reading rows, turning them into groups of Samples, and a checkpointable position."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slime.types import Sample, SampleStatus


class DataError(ValueError):
    """A malformed dataset; the message starts with file:line."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str | list[dict[str, str]]
    label: Any
    metadata: dict[str, Any]
    where: str  # file:line, for messages


def _check_row(row: Any, where: str, input_key: str, label_key: str | None, metadata_key: str | None) -> PromptRow:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if input_key not in row:
        raise DataError(
            f"{where}: missing --input-key field {input_key!r} (fields: {', '.join(sorted(row)) or 'none'})"
        )
    prompt = row[input_key]
    if isinstance(prompt, list):
        for message in prompt:
            if not (isinstance(message, dict) and "role" in message and "content" in message):
                raise DataError(f"{where}: chat prompt entries need 'role' and 'content'")
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: {input_key!r} must be text or a list of chat messages, got {type(prompt).__name__}")
    if label_key is not None and label_key not in row:
        raise DataError(f"{where}: missing --label-key field {label_key!r}")
    metadata = row.get(metadata_key, {}) if metadata_key else {}
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise DataError(f"{where}: --metadata-key field {metadata_key!r} must be an object")
    return PromptRow(prompt, row.get(label_key) if label_key else None, dict(metadata), where)


def read_rows(
    path: str | Path,
    input_key: str = "prompt",
    label_key: str | None = "label",
    metadata_key: str | None = None,
    skip_bad_rows: bool = False,
) -> tuple[list[PromptRow], list[str]]:
    """Rows of a .jsonl or .parquet file, and the problems of skipped rows (empty unless skip_bad_rows)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows: list[PromptRow] = []
    skipped: list[str] = []

    def take(raw: Any, where: str) -> None:
        try:
            rows.append(_check_row(raw, where, input_key, label_key, metadata_key))
        except DataError as exc:
            if not skip_bad_rows:
                raise
            skipped.append(str(exc))

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, raw in enumerate(pq.read_table(path).to_pylist(), 1):
            take(raw, f"{path}:row {i}")
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    if not skip_bad_rows:
                        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                    skipped.append(f"{where}: invalid JSON")
                    continue
                take(raw, where)
    else:
        raise DataError(f"{path}: unsupported format {path.suffix!r}; use .jsonl or .parquet")
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return rows, skipped


@dataclass
class DataState:
    epoch: int = 0
    offset: int = 0  # prompts consumed within the epoch
    next_sample_index: int = 0
    next_group_index: int = 0


@dataclass
class PromptDataset:
    """Prompts already rendered and tokenized, with the rows that were dropped for length."""

    prompts: list[tuple[str, list[int], PromptRow]]
    dropped_too_long: int = 0
    skipped_bad: list[str] = field(default_factory=list)


def prepare_prompts(
    rows: list[PromptRow],
    tokenizer: Any,
    apply_chat_template: bool,
    max_prompt_len: int | None,
) -> PromptDataset:
    prompts = []
    dropped = 0
    for row in rows:
        if apply_chat_template:
            messages = row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        elif isinstance(row.prompt, list):
            raise DataError(f"{row.where}: chat-message prompts need --apply-chat-template")
        else:
            text = row.prompt
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            dropped += 1
            continue
        prompts.append((text, list(ids), row))
    if not prompts:
        raise DataError(f"every prompt is longer than --rollout-max-prompt-len {max_prompt_len}")
    return PromptDataset(prompts, dropped)


class DataSource:
    """Yields groups of `n_samples_per_prompt` Samples, epoch after epoch; its position is checkpointable.

    Groups handed back (aborted partial rollouts) are served again first, before new prompts.
    """

    def __init__(self, dataset: PromptDataset, n_samples_per_prompt: int, shuffle: bool, seed: int):
        self.dataset = dataset
        self.n = n_samples_per_prompt
        self.shuffle = shuffle
        self.seed = seed
        self.state = DataState()
        self.buffer: list[list[Sample]] = []
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next_prompt(self) -> tuple[str, list[int], PromptRow]:
        if self.state.offset >= len(self._order):
            self.state.epoch += 1
            self.state.offset = 0
            self._order = self._epoch_order(self.state.epoch)
        item = self.dataset.prompts[self._order[self.state.offset]]
        self.state.offset += 1
        return item

    def get_groups(self, num_groups: int) -> list[list[Sample]]:
        groups: list[list[Sample]] = []
        while self.buffer and len(groups) < num_groups:
            groups.append(self.buffer.pop(0))
        while len(groups) < num_groups:
            text, ids, row = self._next_prompt()
            group_index = self.state.next_group_index
            self.state.next_group_index += 1
            group = []
            for _ in range(self.n):
                group.append(
                    Sample(
                        prompt=text,
                        tokens=list(ids),
                        label=row.label,
                        metadata=dict(row.metadata),
                        group_index=group_index,
                        index=self.state.next_sample_index,
                    )
                )
                self.state.next_sample_index += 1
            groups.append(group)
        return groups

    def all_groups(self) -> list[list[Sample]]:
        """Every prompt once, in file order, as fresh groups (evaluation sets); the position is untouched."""
        groups = []
        for g, (text, ids, row) in enumerate(self.dataset.prompts):
            groups.append([
                Sample(prompt=text, tokens=list(ids), label=row.label, metadata=dict(row.metadata), group_index=g, index=g * self.n + j)
                for j in range(self.n)
            ])  # fmt: skip
        return groups

    def add_back(self, groups: list[list[Sample]], keep_partial: bool = False) -> None:
        """Return unfinished groups; they are served first next time. With keep_partial (partial rollout) what
        was generated stays: aborted samples continue from their partial response, finished ones are kept as
        they are; otherwise every sample starts again from its prompt."""
        for group in groups:
            for sample in group:
                if not keep_partial:
                    reset_to_prompt(sample)
                elif sample.status is SampleStatus.ABORTED:
                    sample.status = SampleStatus.PENDING
                sample.reward = None
            self.buffer.append(group)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.state.epoch,
            "offset": self.state.offset,
            "next_sample_index": self.state.next_sample_index,
            "next_group_index": self.state.next_group_index,
            "buffer": [[sample_to_dict(s) for s in g] for g in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = DataState(state["epoch"], state["offset"], state["next_sample_index"], state["next_group_index"])
        self._order = self._epoch_order(self.state.epoch)
        self.buffer = [[sample_from_dict(s) for s in g] for g in state.get("buffer", [])]


def reset_to_prompt(sample: Sample) -> None:
    del sample.tokens[sample.prompt_length :]
    sample.response = ""
    sample.response_length = 0
    sample.loss_mask = None
    sample.rollout_log_probs = None
    sample.reward = None
    sample.status = SampleStatus.PENDING
    sample.weight_version = None


def sample_to_dict(sample: Sample) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(sample)
    d["status"] = sample.status.value
    return d


def sample_from_dict(d: dict[str, Any]) -> Sample:
    return Sample(**{**d, "status": SampleStatus(d["status"])})


def load_data_source(
    path: str,
    tokenizer: Any,
    *,
    input_key: str,
    label_key: str | None,
    metadata_key: str | None,
    apply_chat_template: bool,
    max_prompt_len: int | None,
    n_samples_per_prompt: int,
    shuffle: bool,
    seed: int,
    skip_bad_rows: bool,
    log: Callable[[str], None] = print,
) -> DataSource:
    rows, skipped = read_rows(path, input_key, label_key, metadata_key, skip_bad_rows)
    dataset = prepare_prompts(rows, tokenizer, apply_chat_template, max_prompt_len)
    dataset.skipped_bad = skipped
    if skipped:
        log(f"{path}: skipped {len(skipped)} malformed rows (first: {skipped[0]})")
    if dataset.dropped_too_long:
        log(f"{path}: dropped {dataset.dropped_too_long} prompts longer than {max_prompt_len} tokens")
    return DataSource(dataset, n_samples_per_prompt, shuffle, seed)
