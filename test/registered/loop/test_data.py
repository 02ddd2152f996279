"""Prompt data: formats, keys, file:line errors, skipping, length filter, groups, shuffle and resumable position."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slime.rollout.data import DataError, load_data_source, prepare_prompts, read_rows
from slime.testing.ci_register import register_cpu_ci
from slime.types import SampleStatus

register_cpu_ci(est_time=5, suite="base-a-test-cpu")


class CharTokenizer:
    """A real-enough tokenizer for data tests: one id per character, and a chat template."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def source(path, **kw):
    defaults = dict(
        input_key="q",
        label_key="a",
        metadata_key=None,
        apply_chat_template=False,
        max_prompt_len=None,
        n_samples_per_prompt=3,
        shuffle=False,
        seed=1,
        skip_bad_rows=False,
        log=lambda m: None,
    )
    defaults.update(kw)
    return load_data_source(str(path), CharTokenizer(), **defaults)


def test_jsonl_and_parquet_give_same_rows(tmp_path):
    rows = [{"q": "1+1=", "a": 2, "meta": {"k": 1}}, {"q": "2+2=", "a": 4, "meta": None}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a, _ = read_rows(tmp_path / "d.jsonl", "q", "a", "meta")
    b, _ = read_rows(tmp_path / "d.parquet", "q", "a", "meta")
    assert (
        [(r.prompt, r.label, r.metadata) for r in a]
        == [(r.prompt, r.label, r.metadata) for r in b]
        == [("1+1=", 2, {"k": 1}), ("2+2=", 4, {})]
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"d.jsonl:2: invalid JSON"),
        (json.dumps({"x": 1}), r"d.jsonl:2: missing --input-key field 'q' \(fields: x\)"),
        (json.dumps({"q": 5, "a": 1}), r"d.jsonl:2: 'q' must be text"),
        (json.dumps({"q": "x"}), r"d.jsonl:2: missing --label-key field 'a'"),
        (json.dumps([1]), r"d.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "ok", "a": 1}, bad])
    with pytest.raises(DataError, match=message):
        read_rows(path, "q", "a")
    rows, skipped = read_rows(path, "q", "a", skip_bad_rows=True)
    assert len(rows) == 1 and len(skipped) == 1


def test_unsupported_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "x.jsonl")
    (tmp_path / "x.csv").write_text("q,a\n")
    with pytest.raises(DataError, match=r"unsupported format '.csv'"):
        read_rows(tmp_path / "x.csv")


def test_chat_template_and_length_filter(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"q": [{"role": "user", "content": "hi"}], "a": 1}, {"q": "x" * 50, "a": 2}]
    )
    rows, _ = read_rows(path, "q", "a")
    dataset = prepare_prompts(rows, CharTokenizer(), apply_chat_template=True, max_prompt_len=30)
    assert [text for text, _, _ in dataset.prompts] == ["<user>hi<assistant>"]
    assert dataset.dropped_too_long == 1
    with pytest.raises(DataError, match="need --apply-chat-template"):
        prepare_prompts(rows[:1], CharTokenizer(), apply_chat_template=False, max_prompt_len=None)


def test_groups_indices_epochs_and_resume(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": f"p{i}", "a": i} for i in range(5)])
    src = source(path, shuffle=True)
    first = src.get_groups(2)
    assert [len(g) for g in first] == [3, 3]
    assert [s.index for g in first for s in g] == list(range(6))
    assert all(s.label == g[0].label and s.group_index == g[0].group_index for g in first for s in g)
    state = json.loads(json.dumps(src.state_dict()))
    rest_a = [g[0].label for g in src.get_groups(8)]  # crosses into epoch 1
    resumed = source(path, shuffle=True)
    resumed.load_state_dict(state)
    rest_b = [g[0].label for g in resumed.get_groups(8)]
    assert rest_a == rest_b
    epoch0 = [g[0].label for g in first] + rest_a[:3]
    assert sorted(epoch0) == [0, 1, 2, 3, 4]  # each prompt once per epoch
    assert sorted(rest_a[3:8]) == [0, 1, 2, 3, 4]
    unshuffled = source(path, shuffle=False)
    assert [g[0].label for g in unshuffled.get_groups(5)] == [0, 1, 2, 3, 4]


def test_add_back_serves_aborted_groups_first_and_survives_checkpoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": f"p{i}", "a": i} for i in range(4)])
    src = source(path)
    group = src.get_groups(1)[0]
    for s in group:
        s.append_response([1, 2], [-0.1, -0.2], trainable=True)
        s.status = SampleStatus.ABORTED
    src.add_back([group])
    assert all(s.response_length == 0 and s.tokens == [ord(c) for c in "p0"] for s in group)
    state = json.loads(json.dumps(src.state_dict()))
    again = source(path)
    again.load_state_dict(state)
    served = again.get_groups(2)
    assert [g[0].label for g in served] == [0, 1]
    assert [s.index for s in served[0]] == [0, 1, 2] and served[0][0].status is SampleStatus.PENDING
