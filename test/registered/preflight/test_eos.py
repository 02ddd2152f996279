"""EOS ids when config.json has none: generation_config.json, then the tokenizer; one warning line when the
sources disagree; the embedded engine's model spec uses the same resolution."""

import json

from slime.models.eos import resolve_eos
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=10, suite="base-a-test-cpu")


def _folder(tmp_path, eos, generation_eos=None):
    from slime.quickstart.task import build_tokenizer

    build_tokenizer(tmp_path)  # "<pad>" = 0, "<eos>" = 1
    config = {
        "model_type": "qwen3", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "max_position_embeddings": 32,
        "eos_token_id": eos,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation_eos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return tmp_path


def test_null_eos_comes_from_the_tokenizer_and_reaches_the_engine(tmp_path):
    from slime.rollout.engines.embedded.model import DecoderSpec

    folder = _folder(tmp_path, None)
    eos = resolve_eos(folder)
    assert (eos.ids, eos.source, eos.warning) == ((1,), "tokenizer", None)
    assert DecoderSpec.from_checkpoint(str(folder)).eos_token_ids == (1,)


def test_generation_config_wins_over_the_tokenizer_and_a_disagreement_is_one_line(tmp_path):
    folder = _folder(tmp_path, None, generation_eos=[5, 6])
    eos = resolve_eos(folder)
    assert (eos.ids, eos.source) == ((5, 6), "generation_config.json")
    assert eos.warning == (
        f"{folder}: EOS ids disagree: generation_config.json says [5, 6], tokenizer says [1]; "
        "responses end at [5, 6] (from generation_config.json)"
    )


def test_config_json_is_used_when_set_and_agreeing_sources_say_nothing(tmp_path):
    folder = _folder(tmp_path, 1, generation_eos=[1])
    assert resolve_eos(folder) == type(resolve_eos(folder))((1,), "config.json", None)
