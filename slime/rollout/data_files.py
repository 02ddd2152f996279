"""Reading prompt rows out of data files (JSON Lines, JSON arrays, parquet), each checked and located.

Every problem is a `DataError` whose message starts with `file:line` (`file:row N` for parquet, `file` for
whole-file problems). Row-level problems (undecodable bytes, bad JSON, missing keys, wrong types, chat roles)
are skipped and counted under --skip-bad-rows; whole-file problems (no file, wrong format) never are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slime.errors import DataError, MissingPackage

CHAT_ROLES = ("system", "user", "assistant", "tool")
FORMATS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class PromptRow:
    prompt: str | list[dict[str, str]]
    label: Any
    metadata: dict[str, Any]
    where: str  # file:line, for messages


@dataclass(frozen=True)
class RowKeys:
    input_key: str = "prompt"
    label_key: str | None = "label"
    metadata_key: str | None = None


def row_error(where: str, problem: str) -> DataError:
    file, _, line = where.rpartition(":")
    return DataError(f"{where}: {problem}", file=file, line=int(line) if line.isdigit() else None)


def _check_chat(prompt: list, where: str, input_key: str) -> None:
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and "role" in message and "content" in message):
            raise row_error(where, f"{input_key!r} message {i}: chat messages need 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise row_error(
                where, f"{input_key!r} message {i}: role {message['role']!r} is not one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise row_error(
                where, f"{input_key!r} message {i}: content must be text, got {type(message['content']).__name__}"
            )
    if not prompt:
        raise row_error(where, f"{input_key!r} is an empty list of chat messages")


def check_row(row: Any, where: str, keys: RowKeys) -> PromptRow:
    if not isinstance(row, dict):
        raise row_error(where, f"expected a JSON object, got {type(row).__name__}")
    if keys.input_key not in row:
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise row_error(where, f"missing --input-key field {keys.input_key!r} (fields: {fields})")
    prompt = row[keys.input_key]
    if isinstance(prompt, list):
        _check_chat(prompt, where, keys.input_key)
    elif not isinstance(prompt, str):
        raise row_error(
            where, f"{keys.input_key!r} must be text or a list of chat messages, got {type(prompt).__name__}"
        )
    if keys.label_key is not None and keys.label_key not in row:
        raise row_error(where, f"missing --label-key field {keys.label_key!r}")
    metadata = row.get(keys.metadata_key) if keys.metadata_key else None
    if metadata is not None and not isinstance(metadata, dict):
        raise row_error(where, f"--metadata-key field {keys.metadata_key!r} must be an object")
    label = row.get(keys.label_key) if keys.label_key else None
    return PromptRow(prompt, label, dict(metadata or {}), where)


def _jsonl_items(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed row) per non-blank line; a line that cannot be read yields (where, DataError)."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, row_error(where, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, row_error(where, f"invalid JSON ({exc.msg} at column {exc.colno})")


def _json_array_items(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array, each located at the line where it starts."""
    decoder = json.JSONDecoder()
    try:
        values = decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})", str(path), exc.lineno
        ) from None
    if not isinstance(values, list):
        raise DataError(f"{path}: a .json file must hold an array of rows or one JSON object per line", str(path))
    pos = text.index("[") + 1
    for value in values:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        yield f"{path}:{text.count(chr(10), 0, pos) + 1}", value
        pos = end


def _json_items(path: Path) -> Iterator[tuple[str, Any]]:
    """A .json file is either one array of rows (a common export) or JSON Lines under another name."""
    raw = path.read_bytes()
    if raw.lstrip()[:1] != b"[":
        yield from _jsonl_items(path)
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x})", str(path), line) from None
    yield from _json_array_items(path, text)


def _parquet_items(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingPackage(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.split(f"{path}': ", 1)[-1]  # pyarrow repeats the path the message already starts with
        raise DataError(f"{path}: not a readable parquet file ({first})", str(path)) from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{path}:row {i}", row


def file_items(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a {', '.join(FORMATS)} file", str(path))
    if not path.is_file():
        raise DataError(f"{path}: no such file", str(path))
    if path.suffix == ".parquet":
        return _parquet_items(path)
    if path.suffix == ".jsonl":
        return _jsonl_items(path)
    if path.suffix == ".json":
        return _json_items(path)
    raise DataError(f"{path}: unsupported format {path.suffix!r}; use {', '.join(FORMATS)}", str(path))


def read_rows(
    path: str | Path,
    input_key: str = "prompt",
    label_key: str | None = "label",
    metadata_key: str | None = None,
    skip_bad_rows: bool = False,
) -> tuple[list[PromptRow], list[str]]:
    """Rows of a data file, and the problems of skipped rows (empty unless skip_bad_rows)."""
    path = Path(path)
    keys = RowKeys(input_key, label_key, metadata_key)
    rows: list[PromptRow] = []
    skipped: list[str] = []
    for where, item in file_items(path):
        try:
            if isinstance(item, DataError):
                raise item
            rows.append(check_row(item, where, keys))
        except DataError as exc:
            if not skip_bad_rows:
                raise
            skipped.append(str(exc))
    if not rows:
        hint = f" ({len(skipped)} skipped by --skip-bad-rows; first: {skipped[0]})" if skipped else ""
        raise DataError(f"{path}: no usable rows{hint}", str(path))
    return rows, skipped
