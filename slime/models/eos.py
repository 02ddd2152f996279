"""Which token ids end a response, for a HuggingFace model folder: one resolution for the engines and SFT.

config.json's `eos_token_id` is used when it is set; many checkpoints leave it null and put it in
generation_config.json (often a list: e.g. end-of-turn and end-of-text), or only in the tokenizer. The first
source that names any id wins; when the sources name different ids the run says so in one line, because an
engine that does not stop where SFT taught the model to stop generates to the length limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EosIds:
    ids: tuple[int, ...]
    source: str  # "config.json" | "generation_config.json" | "tokenizer" | "none"
    warning: str | None = None  # one line when the sources disagree


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value if v is not None)


def _json_field(path: Path, key: str) -> tuple[int, ...]:
    if not path.is_file():
        return ()
    try:
        return _ids(json.loads(path.read_text()).get(key))
    except (ValueError, TypeError, AttributeError):  # unreadable file or odd value: that source names nothing
        return ()


def resolve_eos(folder: str | Path, tokenizer_eos_id: int | None = None) -> EosIds:
    """EOS ids of the model in `folder`; `tokenizer_eos_id` is the loaded tokenizer's (read from the folder's
    tokenizer files when not given)."""
    folder = Path(folder)
    if tokenizer_eos_id is None:
        tokenizer_eos_id = _tokenizer_eos_id(folder)
    sources = [
        ("config.json", _json_field(folder / "config.json", "eos_token_id")),
        ("generation_config.json", _json_field(folder / "generation_config.json", "eos_token_id")),
        ("tokenizer", _ids(tokenizer_eos_id)),
    ]
    named = [(name, ids) for name, ids in sources if ids]
    if not named:
        return EosIds((), "none", f"{folder}: no EOS token in config.json, generation_config.json or the tokenizer")
    source, ids = named[0]
    warning = None
    others = [(name, other) for name, other in named[1:] if not set(other) <= set(ids)]
    if others:
        name, other = others[0]
        warning = (
            f"{folder}: EOS ids disagree: {source} says {list(ids)}, {name} says {list(other)}; "
            f"responses end at {list(ids)} (from {source})"
        )
    return EosIds(tuple(ids), source, warning)


def _tokenizer_eos_id(folder: Path) -> int | None:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder)).eos_token_id
    except Exception:  # no usable tokenizer: the start-up check reports that on its own, naming the folder
        return None
