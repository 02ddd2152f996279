"""Prompt datasets: reading rows, turning them into groups of Samples, and a checkpointable position."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slime.errors import DataError
from slime.rollout.data_files import PromptRow, read_rows, row_error
from slime.types import Sample, SampleStatus

__all__ = ["DataError", "PromptRow", "read_rows"]  # re-exported: readers live in slime.rollout.data_files


@dataclass
class DataState:
    epoch: int = 0
    offset: int = 0  # prompts consumed within the epoch
    next_sample_index: int = 0
    next_group_index: int = 0


@dataclass
class PromptDataset:
    """Prompts already rendered and tokenized, with what was left out: prompts over --rollout-max-prompt-len
    (dropped, as documented; the first one's location kept for the message) and, under --skip-bad-rows, the
    problems of the rows skipped."""

    prompts: list[tuple[str, list[int], PromptRow]]
    dropped_too_long: int = 0
    first_dropped: str | None = None
    skipped_bad: list[str] = field(default_factory=list)

    def summary(self, path: str, max_prompt_len: int | None) -> list[str]:
        """The lines a run prints about this file at start (nothing when every row was used)."""
        lines = []
        if self.skipped_bad:
            lines.append(f"{path}: skipped {len(self.skipped_bad)} bad rows (first: {self.skipped_bad[0]})")
        if self.dropped_too_long:
            lines.append(
                f"{path}: dropped {self.dropped_too_long} prompts longer than --rollout-max-prompt-len "
                f"{max_prompt_len} tokens (first: {self.first_dropped})"
            )
        return lines


@dataclass(frozen=True)
class PromptLimits:
    """Token limits a prompt must meet: over max_prompt_len it is dropped; a prompt that leaves no room for
    max_response_len new tokens in the engine's context is an error (it would fail inside the engine)."""

    max_prompt_len: int | None = None
    max_response_len: int = 0
    max_context: int | None = None


def render_text(row: PromptRow, tokenizer: Any, apply_chat_template: bool) -> str:
    if isinstance(row.prompt, list) and not apply_chat_template:
        raise row_error(row.where, "chat-message prompts need --apply-chat-template")
    if not apply_chat_template:
        return row.prompt
    messages = row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template is the model's own Jinja code: any error it raises is the row's
        raise row_error(row.where, f"the chat template failed on this prompt ({_first_line(exc)})") from None


def encode_text(row: PromptRow, text: str, tokenizer: Any) -> list[int]:
    try:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # e.g. a character outside a vocabulary without an unknown token
        raise row_error(row.where, f"the tokenizer cannot encode this prompt ({_first_line(exc)})") from None
    if not ids:
        raise row_error(row.where, "the prompt is empty")
    return ids


def _encode_all(texts: list[str], tokenizer: Any) -> list[list[int]] | None:
    """All texts in one call (a fast tokenizer encodes a batch many times faster than row by row); None when
    some text cannot be encoded, so that the caller finds which, row by row."""
    try:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    except Exception:  # located per row by the caller
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def prepare_prompts(
    rows: list[PromptRow],
    tokenizer: Any,
    apply_chat_template: bool,
    max_prompt_len: int | None,
    limits: PromptLimits | None = None,
    skip_bad_rows: bool = False,
) -> PromptDataset:
    limits = limits or PromptLimits(max_prompt_len=max_prompt_len)
    dataset = PromptDataset([])
    texts: list[str | DataError] = []
    for row in rows:
        try:
            texts.append(render_text(row, tokenizer, apply_chat_template))
        except DataError as exc:
            texts.append(exc)
    batch = _encode_all([t for t in texts if isinstance(t, str)], tokenizer)
    next_encoded = 0
    for row, text in zip(rows, texts, strict=True):
        try:
            if isinstance(text, DataError):
                raise text
            ids = batch[next_encoded] if batch is not None else encode_text(row, text, tokenizer)
            next_encoded += 1
            if not ids:
                raise row_error(row.where, "the prompt is empty")
            if max_prompt_len is not None and len(ids) > max_prompt_len:
                dataset.dropped_too_long += 1
                dataset.first_dropped = dataset.first_dropped or row.where
                continue
            if limits.max_context is not None and len(ids) + limits.max_response_len > limits.max_context:
                raise row_error(
                    row.where,
                    f"prompt of {len(ids)} tokens + --rollout-max-response-len {limits.max_response_len} exceeds "
                    f"the engine context of {limits.max_context} tokens (--rollout-max-context-len); "
                    "set --rollout-max-prompt-len to drop such prompts",
                )
        except DataError as exc:
            if not skip_bad_rows:
                raise
            dataset.skipped_bad.append(str(exc))
            continue
        dataset.prompts.append((text, ids, row))
    if not dataset.prompts:
        where = rows[0].where.rpartition(":")[0] if rows else "data"
        reason = (
            f"every prompt is longer than --rollout-max-prompt-len {max_prompt_len}"
            if dataset.dropped_too_long
            else "no usable rows"
        )
        raise DataError(
            f"{where}: {reason}" + (f" (first skipped: {dataset.skipped_bad[0]})" if dataset.skipped_bad else ""), where
        )
    return dataset


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
    sample.token_versions = None


def sample_to_dict(sample: Sample) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(sample)
    d["status"] = sample.status.value
    return d


def sample_from_dict(d: dict[str, Any]) -> Sample:
    return Sample(**{**d, "status": SampleStatus(d["status"])})


def load_prompt_file(
    path: str,
    tokenizer: Any,
    keys: Any,
    apply_chat_template: bool,
    limits: PromptLimits,
    skip_bad_rows: bool,
) -> PromptDataset:
    """Read, check, render and tokenize one data file (keys: a data_files.RowKeys)."""
    rows, skipped = read_rows(path, keys.input_key, keys.label_key, keys.metadata_key, skip_bad_rows)
    dataset = prepare_prompts(rows, tokenizer, apply_chat_template, limits.max_prompt_len, limits, skip_bad_rows)
    dataset.skipped_bad = skipped + dataset.skipped_bad
    return dataset


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
    prepared: PromptDataset | None = None,
) -> DataSource:
    """A DataSource over `path`; `prepared` is the same file as the start-up check already read it (the
    check reads every file once, and the rollout uses what it read)."""
    from slime.rollout.data_files import RowKeys

    dataset = prepared
    if dataset is None:
        keys = RowKeys(input_key, label_key, metadata_key)
        limits = PromptLimits(max_prompt_len=max_prompt_len)
        dataset = load_prompt_file(path, tokenizer, keys, apply_chat_template, limits, skip_bad_rows)
        for line in dataset.summary(path, max_prompt_len):
            log(line)
    return DataSource(dataset, n_samples_per_prompt, shuffle, seed)
