"""What each user mistake prints: the table behind `slime train --help-errors`.

Every row is also a case of the bad-input corpus (test/registered/preflight/test_bad_input_corpus.py), which
builds the mistake, runs `slime train --check` on it and asserts that it prints exactly this line (with the
placeholders filled in) and exits with code 2; so the table cannot drift from what slime really prints.
Placeholders: {dir} is the folder holding the case's files, {model} a good model folder.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mistake:
    case: str  # the corpus case that makes this mistake
    kind: str  # flag | data | model | package
    what: str  # the mistake, in words
    prints: str  # the one line `slime train` prints (after "error: ")


MISTAKES: tuple[Mistake, ...] = (
    # ---- flags ----
    Mistake(
        "flag_prefix",
        "flag",
        "a flag's prefix (no abbreviations)",
        "unknown flag --sft-stop; did you mean --sft-stop-reward?",
    ),
    Mistake(
        "flag_typo", "flag", "a misspelt flag", "unknown flag --rollout-batch-sise; did you mean --rollout-batch-size?"
    ),
    Mistake(
        "flag_batch",
        "flag",
        "batch sizes that do not divide",
        "--rollout-batch-size * --n-samples-per-prompt = 4 * 4 = 16 must be divisible by --global-batch-size 7",
    ),
    Mistake("flag_range", "flag", "a number outside its flag's range (shown by --help)", "--lr must be >= 0, got -1"),
    Mistake(
        "flag_plugin",
        "flag",
        "a plugin path that cannot be imported",
        "--custom-rm-path 'no_such_module.reward': cannot import module 'no_such_module' "
        "(No module named 'no_such_module')",
    ),
    Mistake(
        "flag_plugin_signature",
        "flag",
        "a plugin with the wrong number of arguments",
        "--custom-rm-path 'json.dumps': takes 1 required arguments, expected 2",
    ),
    Mistake(
        "flag_context",
        "flag",
        "an engine context beyond the model's",
        "--rollout-max-context-len 100 exceeds the model's max_position_embeddings 64",
    ),
    Mistake(
        "flag_tp_heads",
        "flag",
        "a tensor-parallel size that does not divide the attention heads",
        "--tensor-model-parallel-size 4 must divide num_attention_heads=4 and num_key_value_heads=2 of the qwen3 model",
    ),
    Mistake(
        "flag_chat_template",
        "flag",
        "--apply-chat-template with a tokenizer that has none",
        "--apply-chat-template: the tokenizer in {model} has no chat template",
    ),
    Mistake(
        "flag_load",
        "flag",
        "--load of a folder without a checkpoint",
        "--load {dir}: no complete checkpoint (expected step_NNNNNNNN/meta.json)",
    ),
    Mistake(
        "flag_output_file", "flag", "--output-dir naming a file", "--output-dir {dir}/out: is a file; give a folder"
    ),
    Mistake("flag_rm_type", "flag", "an unknown reward type", "--rm-type 'bleu' is not one of: {rm_types}"),
    # ---- the model folder ----
    Mistake(
        "model_missing", "model", "a model folder that does not exist", "--hf-checkpoint {dir}/none: no such folder"
    ),
    Mistake(
        "model_no_config",
        "model",
        "a folder without config.json",
        "--hf-checkpoint {dir}: no config.json there (expected a HuggingFace model folder)",
    ),
    Mistake(
        "model_bad_config",
        "model",
        "a config.json that is not JSON",
        "{dir}/config.json:1: invalid JSON (Expecting property name enclosed in double quotes)",
    ),
    Mistake(
        "model_family",
        "model",
        "a model family slime cannot train",
        "{dir}/config.json: model_type 'gpt2' is not supported; supported families: {families}",
    ),
    Mistake(
        "model_no_weights",
        "model",
        "no safetensors weights",
        "{dir}: no *.safetensors files (only safetensors checkpoints are read)",
    ),
    Mistake(
        "model_damaged_weights",
        "model",
        "a damaged safetensors file",
        "{dir}/model.safetensors: not a readable safetensors file (Error while deserializing header: header too large)",
    ),
    Mistake(
        "model_shapes",
        "model",
        "weights whose shapes do not match config.json",
        "{dir}/model.safetensors: tensor model.embed_tokens.weight has shape (16, 32) but config.json implies (16, 48)",
    ),
    Mistake(
        "model_no_tokenizer",
        "model",
        "a model folder without a tokenizer",
        "--hf-checkpoint {dir}: no tokenizer there (none of tokenizer.json, tokenizer_config.json, tokenizer.model, "
        "vocab.json)",
    ),
    Mistake(
        "model_feature",
        "model",
        "a setting of the family slime does not implement",
        "{dir}/config.json: qwen3 config: hidden_act='gelu'; only 'silu' (SwiGLU) is supported",
    ),
    # ---- data files ----
    Mistake("data_missing", "data", "a data file that does not exist", "{dir}/none.jsonl: no such file"),
    Mistake(
        "data_directory",
        "data",
        "a folder given as a data file",
        "{dir}: is a directory; give a .jsonl, .json, .parquet file",
    ),
    Mistake(
        "data_format",
        "data",
        "an unsupported file type",
        "{dir}/d.csv: unsupported format '.csv'; use .jsonl, .json, .parquet",
    ),
    Mistake(
        "data_bad_json",
        "data",
        "a line that is not JSON",
        "{dir}/d.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
    ),
    Mistake("data_not_utf8", "data", "bytes that are not UTF-8", "{dir}/d.jsonl:3: not UTF-8 (byte 0xff at column 13)"),
    Mistake(
        "data_missing_key",
        "data",
        "a row without the prompt field",
        "{dir}/d.jsonl:2: missing --input-key field 'prompt' (fields: label, question)",
    ),
    Mistake(
        "data_missing_label",
        "data",
        "a row without the label field",
        "{dir}/d.jsonl:2: missing --label-key field 'label'",
    ),
    Mistake(
        "data_prompt_type",
        "data",
        "a prompt that is neither text nor chat messages",
        "{dir}/d.jsonl:1: 'prompt' must be text or a list of chat messages, got int",
    ),
    Mistake(
        "data_chat_role",
        "data",
        "a chat role other than system / user / assistant / tool",
        "{dir}/d.jsonl:2: 'prompt' message 0: role 'human' is not one of system, user, assistant, tool",
    ),
    Mistake(
        "data_chat_no_template",
        "data",
        "chat-message prompts without --apply-chat-template",
        "{dir}/d.jsonl:1: chat-message prompts need --apply-chat-template",
    ),
    Mistake(
        "data_fake_parquet",
        "data",
        "a .parquet file that is not parquet",
        "{dir}/d.parquet: not a readable parquet file (Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file.)",
    ),
    Mistake(
        "data_json_array_row",
        "data",
        "a bad row inside a .json array",
        "{dir}/d.json:4: missing --label-key field 'label'",
    ),
    Mistake(
        "data_json_array_syntax",
        "data",
        "a .json array that is not valid JSON",
        "{dir}/d.json:3: invalid JSON (Expecting ',' delimiter at column 3)",
    ),
    Mistake(
        "data_unencodable",
        "data",
        "a character the tokenizer cannot encode",
        "{dir}/d.jsonl:2: the tokenizer cannot encode this prompt (WordLevel error: Missing [UNK] token from the "
        "vocabulary)",
    ),
    Mistake(
        "data_context",
        "data",
        "a prompt that leaves no room for the response in the engine's context",
        "{dir}/d.jsonl:3: prompt of 60 tokens + --rollout-max-response-len 5 exceeds the engine context of 64 tokens "
        "(--rollout-max-context-len); set --rollout-max-prompt-len to drop such prompts",
    ),
    Mistake(
        "data_all_too_long",
        "data",
        "every prompt over --rollout-max-prompt-len",
        "{dir}/d.jsonl: every prompt is longer than --rollout-max-prompt-len 2",
    ),
    Mistake("data_empty", "data", "a data file without rows", "{dir}/d.jsonl: no usable rows"),
    Mistake(
        "data_eval_set",
        "data",
        "a bad row in an evaluation set",
        "{dir}/eval.jsonl:1: invalid JSON (Expecting value at column 1)",
    ),
    Mistake(
        "data_sft_response",
        "data",
        "an SFT row without its response",
        "{dir}/sft.jsonl:1: missing --label-key field 'response'",
    ),
    # ---- packages ----
    Mistake(
        "package_wandb",
        "package",
        "--use-wandb without wandb installed",
        "--use-wandb needs the wandb package: pip install wandb",
    ),
)


def placeholders(folder: str = "<folder>", model: str = "<model folder>") -> dict[str, str]:
    from slime.models.registry import supported_model_types
    from slime.rollout import rm_hub

    return {
        "dir": folder,
        "model": model,
        "families": ", ".join(supported_model_types()),
        "rm_types": ", ".join([*rm_hub.BUILTIN, "remote_rm"]),
    }


def render_table() -> str:
    """Plain text, one mistake per entry, grouped by what the user has to look at."""
    values = placeholders()
    lines = ["What `slime train` prints for each mistake (exit code 2, one line, before anything starts):", ""]
    groups = (("flag", "flags"), ("model", "the model folder"), ("data", "data files"), ("package", "packages"))
    for kind, title in groups:
        lines.append(f"{title}:")
        for m in MISTAKES:
            if m.kind == kind:
                lines.append(f"  {m.what}")
                lines.append(f"      error: {m.prints.format(**values)}")
        lines.append("")
    lines.append("With --skip-bad-rows, row-level data errors are counted and skipped instead (data/skipped_bad_rows).")
    return "\n".join(lines)
