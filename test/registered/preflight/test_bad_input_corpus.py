"""The bad-input corpus: every mistake of slime.preflight.error_table built for real (data files, model folders,
flags) and fed to `slime train --check`; each must exit 2 with exactly its table line, no traceback. A sample
goes through `slime train` in a fresh process, which must fail the same way before Ray is imported or any Ray
session folder exists. Good inputs pass the check, and --skip-bad-rows / --rollout-max-prompt-len count what
they leave out."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slime.cli import main as slime_main
from slime.preflight.error_table import MISTAKES, placeholders
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=60, suite="base-b-test-cpu")

ROOT = Path(__file__).resolve().parents[3]
GOOD_ROWS = [{"prompt": f"{i}+1=", "label": i + 1} for i in range(10, 18)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from slime.quickstart import task

    folder = tmp_path_factory.mktemp("model") / "model"
    task.build_model(folder, seed=1, hidden_size=32, num_layers=1)  # qwen3, vocab 16, 4 heads, 2 kv heads, 64 ctx
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def base_flags(d: Path, model: Path) -> list[str]:
    good = write_jsonl(d / "good.jsonl", GOOD_ROWS)
    return [
        "--hf-checkpoint", str(model), "--prompt-data", str(good), "--rm-type", "arithmetic",
        "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--global-batch-size", "16",
        "--rollout-max-response-len", "5", "--output-dir", str(d / "run"),
    ]  # fmt: skip


def copy_model(model: Path, d: Path, skip: tuple[str, ...] = ()) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name not in skip:
            shutil.copy(f, d / f.name)
    return d


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def data(d: Path, name: str, rows: list) -> list[str]:
    return ["--prompt-data", str(write_jsonl(d / name, rows))]


def model_case(d: Path, model: Path, skip=(), **changes) -> list[str]:
    copy_model(model, d, skip)
    if changes:
        edit_config(d, **changes)
    return ["--hf-checkpoint", str(d)]


def _not_utf8(d: Path) -> list[str]:
    path = d / "d.jsonl"
    path.write_bytes(b'{"prompt": "1+1=", "label": 2}\n{"prompt": "2+2=", "label": 4}\n{"prompt": "\xff"}\n')
    return ["--prompt-data", str(path)]


def _json_array(d: Path, text: str) -> list[str]:
    (d / "d.json").write_text(text)
    return ["--prompt-data", str(d / "d.json")]


def _damaged_weights(d: Path, model: Path) -> list[str]:
    copy_model(model, d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    return ["--hf-checkpoint", str(d)]


def _output_file(d: Path) -> list[str]:
    (d / "out").write_text("x")
    return ["--output-dir", str(d / "out")]


# case -> (folder, good model) -> flags added after the base flags (a later flag wins)
CASES = {
    "flag_prefix": lambda d, m: ["--sft-stop", "0.3"],
    "flag_typo": lambda d, m: ["--rollout-batch-sise", "3"],
    "flag_batch": lambda d, m: ["--global-batch-size", "7"],
    "flag_range": lambda d, m: ["--lr", "-1"],
    "flag_plugin": lambda d, m: ["--custom-rm-path", "no_such_module.reward"],
    "flag_plugin_signature": lambda d, m: ["--custom-rm-path", "json.dumps"],
    "flag_context": lambda d, m: ["--rollout-max-context-len", "100"],
    "flag_tp_heads": lambda d, m: ["--tensor-model-parallel-size", "4", "--actor-num-gpus-per-node", "4"],
    "flag_chat_template": lambda d, m: ["--apply-chat-template"],
    "flag_load": lambda d, m: ["--load", str(d)],
    "flag_output_file": lambda d, m: _output_file(d),
    "flag_rm_type": lambda d, m: ["--rm-type", "bleu"],
    "model_missing": lambda d, m: ["--hf-checkpoint", str(d / "none")],
    "model_no_config": lambda d, m: ["--hf-checkpoint", str(d)],
    "model_bad_config": lambda d, m: (
        (copy_model(m, d), (d / "config.json").write_text("{model_type: qwen3}")) and ["--hf-checkpoint", str(d)]
    ),
    "model_family": lambda d, m: model_case(d, m, model_type="gpt2"),
    "model_no_weights": lambda d, m: model_case(d, m, skip=("model.safetensors",)),
    "model_damaged_weights": _damaged_weights,
    "model_shapes": lambda d, m: model_case(d, m, hidden_size=48, head_dim=8),
    "model_no_tokenizer": lambda d, m: model_case(d, m, skip=("tokenizer.json", "tokenizer_config.json")),
    "model_feature": lambda d, m: model_case(d, m, hidden_act="gelu"),
    "data_missing": lambda d, m: ["--prompt-data", str(d / "none.jsonl")],
    "data_directory": lambda d, m: ["--prompt-data", str(d)],
    "data_format": lambda d, m: data(d, "d.csv", ["prompt,label"]),
    "data_bad_json": lambda d, m: data(d, "d.jsonl", [GOOD_ROWS[0], "{oops}"]),
    "data_not_utf8": lambda d, m: _not_utf8(d),
    "data_missing_key": lambda d, m: data(d, "d.jsonl", [GOOD_ROWS[0], {"question": "1+1=", "label": 2}]),
    "data_missing_label": lambda d, m: data(d, "d.jsonl", [GOOD_ROWS[0], {"prompt": "1+1="}]),
    "data_prompt_type": lambda d, m: data(d, "d.jsonl", [{"prompt": 12, "label": 2}]),
    "data_chat_role": lambda d, m: data(
        d, "d.jsonl", [GOOD_ROWS[0], {"prompt": [{"role": "human", "content": "1+1="}], "label": 2}]
    ),
    "data_chat_no_template": lambda d, m: data(
        d, "d.jsonl", [{"prompt": [{"role": "user", "content": "1="}], "label": 1}]
    ),
    "data_fake_parquet": lambda d, m: (
        (d / "d.parquet").write_text(json.dumps(GOOD_ROWS[0])) and ["--prompt-data", str(d / "d.parquet")]
    ),
    "data_json_array_row": lambda d, m: _json_array(
        d, '[\n  {"prompt": "1+1=", "label": 2},\n  {"prompt": "2+2=", "label": 4},\n  {"prompt": "3+3="}\n]\n'
    ),
    "data_json_array_syntax": lambda d, m: _json_array(
        d, '[\n  {"prompt": "1+1=", "label": 2}\n  {"prompt": "2+2="}\n]'
    ),
    "data_unencodable": lambda d, m: data(d, "d.jsonl", [GOOD_ROWS[0], {"prompt": "1a+1=", "label": 2}]),
    "data_context": lambda d, m: data(d, "d.jsonl", [GOOD_ROWS[0], GOOD_ROWS[1], {"prompt": "1" * 60, "label": 1}]),
    "data_all_too_long": lambda d, m: data(d, "d.jsonl", GOOD_ROWS) + ["--rollout-max-prompt-len", "2"],
    "data_empty": lambda d, m: data(d, "d.jsonl", [""]),
    "data_eval_set": lambda d, m: ["--eval-prompt-data", "e", str(write_jsonl(d / "eval.jsonl", ["not json"]))],
    "data_sft_response": lambda d, m: [
        "--sft-warmup-steps",
        "1",
        "--sft-batch-size",
        "1",
        "--sft-data",
        str(write_jsonl(d / "sft.jsonl", GOOD_ROWS)),
    ],  # fmt: skip
    "package_wandb": lambda d, m: ["--use-wandb"],
}
THROUGH_TRAIN = ("flag_prefix", "flag_range", "model_no_tokenizer", "data_not_utf8", "data_context", "data_chat_role")


def test_every_table_row_has_a_case_and_the_corpus_is_broad():
    assert sorted(CASES) == sorted(m.case for m in MISTAKES)
    kinds = [m.kind for m in MISTAKES]
    assert len(MISTAKES) >= 25 and min(kinds.count(k) for k in ("flag", "model", "data")) >= 5


def build(case: str, tmp_path: Path, model: Path) -> tuple[list[str], str]:
    d = tmp_path / "case"
    d.mkdir()
    argv = base_flags(tmp_path, model) + CASES[case](d, model)
    mistake = next(m for m in MISTAKES if m.case == case)
    return argv, "error: " + mistake.prints.format(**placeholders(str(d), str(model)))


@pytest.mark.parametrize("case", [m.case for m in MISTAKES])
def test_check_prints_the_table_line(case, tmp_path, model, capsys):
    if case == "package_wandb" and _installed("wandb"):
        pytest.skip("wandb is installed here: the mistake cannot be made")
    argv, expected = build(case, tmp_path, model)
    code = slime_main(["train", "--check", *argv])
    err = capsys.readouterr().err.strip()
    assert (code, err) == (2, expected)
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


@pytest.mark.parametrize("case", THROUGH_TRAIN)
def test_train_fails_before_ray(case, tmp_path, model):
    argv, expected = build(case, tmp_path, model)
    ray_tmp = tmp_path / "ray_tmp"
    ray_tmp.mkdir()
    probe = (
        "import sys\nfrom slime.cli import main\ncode = main(sys.argv[1:])\n"
        "print('ray imported' if 'ray' in sys.modules else 'ray not imported')\nsys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp)}
    proc = subprocess.run(
        [sys.executable, "-c", probe, "train", *argv], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == expected and "Traceback" not in proc.stderr
    assert proc.stdout.strip() == "ray not imported"
    assert not list(ray_tmp.rglob("session_*"))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_good_inputs_pass_and_leftovers_are_counted(tmp_path, model, capsys):
    argv = base_flags(tmp_path, model)
    rows = [*GOOD_ROWS, "{bad", {"prompt": "1" * 60, "label": 1}, {"prompt": "1" * 30, "label": 1}]
    bad = write_jsonl(tmp_path / "mixed.jsonl", rows)
    code = slime_main(
        [
            "train",
            "--check",
            *argv,
            "--prompt-data",
            str(bad),
            "--skip-bad-rows",
            "--rollout-max-prompt-len",
            "20",
            "--sglang-mem-fraction-static",
            "0.7",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    assert err.pop(0) == "note: --sglang-* options are ignored: this run's rollout engine is embedded"
    assert (
        err[0]
        == f"note: {bad}: skipped 1 bad rows (first: {bad}:9: invalid JSON (Expecting property name enclosed in double quotes at column 2))"
    )
    assert err[1] == f"note: {bad}: dropped 2 prompts longer than --rollout-max-prompt-len 20 tokens (first: {bad}:10)"
    assert err[2].startswith(f"check passed: model {model} (qwen3, vocab 16, engine context 64), 8 prompts")
    assert err[2].endswith("1 bad rows skipped, 2 prompts too long")


def test_skip_bad_rows_covers_row_errors_found_while_tokenizing(tmp_path, model):
    from slime.config import parse_config
    from slime.preflight import check_run

    rows = [*GOOD_ROWS, {"prompt": "1a+1=", "label": 2}, {"prompt": "1" * 60, "label": 1}, b"\xff"]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    config = parse_config(base_flags(tmp_path, model) + ["--prompt-data", str(path), "--skip-bad-rows"])
    checked = check_run(config)
    assert len(checked.data.prompts.prompts) == len(GOOD_ROWS)
    assert checked.data.metrics() == {"data/skipped_bad_rows": 3.0, "data/dropped_too_long": 0.0}
    assert [s.split(": ")[0] for s in checked.data.prompts.skipped_bad] == [f"{path}:11", f"{path}:9", f"{path}:10"]
    assert "3 bad rows skipped (--skip-bad-rows)" in checked.data_counts()


def test_ray_wrapped_user_error_is_found_with_its_own_message():
    from ray.exceptions import RayTaskError

    from slime.errors import DataError, user_error_in

    original = DataError("d.jsonl:3: invalid JSON", "d.jsonl", 3)
    wrapped = RayTaskError("RolloutManager.start", "Traceback ...", original).as_instanceof_cause()
    found = user_error_in(wrapped)
    assert found is original and (found.file, found.line) == ("d.jsonl", 3)
    import pickle

    copy = pickle.loads(pickle.dumps(original))
    assert (str(copy), copy.file, copy.line) == ("d.jsonl:3: invalid JSON", "d.jsonl", 3)


def test_tp2_on_an_odd_vocabulary_passes_the_check(tmp_path, capsys):
    from slime.quickstart import task

    folder = tmp_path / "odd"
    task.build_model(folder, seed=1, hidden_size=32, num_layers=1, vocab_size=17)  # the trainer pads to 18
    argv = base_flags(tmp_path, folder) + ["--tensor-model-parallel-size", "2", "--actor-num-gpus-per-node", "2"]
    assert slime_main(["train", "--check", *argv]) == 0
    assert "vocab 17" in capsys.readouterr().err
