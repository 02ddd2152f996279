"""The model folder given to --hf-checkpoint, checked before anything starts: config, family, parallel sizes
against the model's shapes, weights (names and shapes, headers only), tokenizer, chat template, EOS."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slime.config import Config
from slime.errors import FlagError, ModelError

# The engine's context when --rollout-max-context-len is not given: the model's, at most this.
DEFAULT_MAX_CONTEXT = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelFacts:
    folder: str
    model_type: str
    vocab_size: int
    context: int  # the rollout engine's context (prompt + response), in tokens
    eos_ids: tuple[int, ...]
    tokenizer: Any
    notes: list[str]  # one-line warnings to print at start


def read_hf_config(folder: Path) -> dict:
    flag = f"--hf-checkpoint {folder}"
    if not folder.exists():
        raise ModelError(f"{flag}: no such folder")
    if not folder.is_dir():
        raise ModelError(f"{flag}: is a file; give the HuggingFace model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{flag}: no config.json there (expected a HuggingFace model folder)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(hf, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return hf


def engine_context(config: Config, hf: dict) -> int:
    """Prompt + response tokens the engine holds: --rollout-max-context-len, else the model's (capped)."""
    model_max = int(hf.get("max_position_embeddings", DEFAULT_MAX_CONTEXT))
    wanted = config.rollout.rollout_max_context_len
    if wanted is None:
        return min(model_max, DEFAULT_MAX_CONTEXT)
    if wanted > model_max:
        raise FlagError(f"--rollout-max-context-len {wanted} exceeds the model's max_position_embeddings {model_max}")
    return wanted


def _check_family(folder: Path, hf: dict, tensor_parallel_size: int):
    """The trainer's bridge for this family, validated at --tensor-model-parallel-size (heads, vocab, MLP)."""
    from slime.models.registry import bridge_class_for, supported_model_types

    model_type = hf.get("model_type")
    if model_type not in supported_model_types():
        raise ModelError(
            f"{folder / 'config.json'}: model_type {model_type!r} is not supported; "
            f"supported families: {', '.join(supported_model_types())}"
        )
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ModelError(f"{folder / 'config.json'}: transformers cannot read it ({_first_line(exc)})") from None
    try:
        return bridge_class_for(hf_config)(hf_config, tensor_parallel_size=tensor_parallel_size)
    except ModelError as exc:  # the bridge's message names the family's setting; say which file it is in
        raise ModelError(f"{folder / 'config.json'}: {exc}") from None


def _check_engine_support(folder: Path, hf: dict, engine_kind: str) -> None:
    if engine_kind == "embedded":
        from slime.rollout.engines.embedded.model import DecoderSpec

        DecoderSpec.from_hf_config(hf, source=str(folder / "config.json"))


def _load_tokenizer(folder: Path, apply_chat_template: bool, vocab_size: int):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"--hf-checkpoint {folder}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types (OSError, ValueError, TypeError) for a bad tokenizer
        raise ModelError(f"--hf-checkpoint {folder}: the tokenizer cannot be loaded ({_first_line(exc)})") from None
    if apply_chat_template and not tokenizer.chat_template:
        raise FlagError(f"--apply-chat-template: the tokenizer in {folder} has no chat template")
    if len(tokenizer) > vocab_size:
        raise ModelError(
            f"--hf-checkpoint {folder}: the tokenizer has {len(tokenizer)} tokens, more than vocab_size {vocab_size}"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ModelError(f"--hf-checkpoint {folder}: the tokenizer has neither a pad nor an EOS token")
    return tokenizer


def check_model(config: Config, engine_kind: str) -> ModelFacts:
    from slime.models.eos import resolve_eos

    folder = Path(config.checkpoint.hf_checkpoint)
    hf = read_hf_config(folder)
    bridge = _check_family(folder, hf, config.train.tensor_model_parallel_size)
    _check_engine_support(folder, hf, engine_kind)
    bridge.check_hf_tensors(folder)
    vocab_size = int(hf["vocab_size"])
    tokenizer = _load_tokenizer(folder, config.data.apply_chat_template, vocab_size)
    eos = resolve_eos(folder, tokenizer.eos_token_id)
    notes = [eos.warning] if eos.warning else []
    context = engine_context(config, hf)
    return ModelFacts(str(folder), hf["model_type"], vocab_size, context, eos.ids, tokenizer, notes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
