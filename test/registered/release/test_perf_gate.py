"""Nightly gates as pure functions: one noisy night vs a real regression, drift against the trailing mean,
exit codes by failure kind, baseline files, the extractors' figures, and the report."""

import json

import pytest

from release import perf, perf_gate, perf_report
from release.perf_gate import Baseline, judge
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=4, suite="base-a-test-cpu")


def rec(value, date, name="loop.completions_per_s", higher=True):
    return perf.MetricRecord(name, "cpu", value, "completions/s", higher, "c0ffee", date, "box")


def nights(values, name="loop.completions_per_s", higher=True):
    return [rec(v, f"2026-11-{i + 1:02d}", name, higher) for i, v in enumerate(values)]


BASE = Baseline(100.0, 0.1)  # 10% band


def test_within_the_band_is_ok_and_beyond_it_upward_is_improved():
    assert judge(rec(95, "2026-11-20"), BASE, nights([100] * 5)).status == "ok"
    improved = judge(rec(130, "2026-11-20"), BASE, nights([100] * 5))
    assert improved.status == "improved" and "consider raising" in improved.reason and not improved.failed


def test_one_noisy_night_is_reported_not_failed():
    verdict = judge(rec(85, "2026-11-20"), BASE, nights([100, 101, 99, 100]))
    assert verdict.status == "noisy" and not verdict.failed
    assert verdict.reason == "15% worse than the baseline 100, previous night within the band"


def test_two_bad_nights_in_a_row_is_a_regression():
    verdict = judge(rec(85, "2026-11-20"), BASE, nights([100, 100, 86]))
    assert verdict.status == "regression" and verdict.failed and "second night running" in verdict.reason


def test_a_drop_beyond_twice_the_band_fails_at_once():
    verdict = judge(rec(70, "2026-11-20"), BASE, nights([100] * 5))
    assert verdict.status == "regression" and "more than twice the band" in verdict.reason


def test_lower_is_better_metrics_and_drift_against_the_trailing_mean():
    history = nights([1.0, 1.0, 1.0], name="loop.seconds_per_step", higher=False)
    assert judge(rec(1.05, "2026-11-20", "loop.seconds_per_step", False), Baseline(1.0, 0.1), history).status == "ok"
    assert (
        judge(rec(1.3, "2026-11-20", "loop.seconds_per_step", False), Baseline(1.0, 0.1), history).status
        == "regression"
    )
    # inside the baseline band, yet well off the recent nights: reported as drifting
    fast = nights([0.7, 0.7, 0.7, 0.7], name="loop.seconds_per_step", higher=False)
    drift = judge(rec(1.08, "2026-11-20", "loop.seconds_per_step", False), Baseline(1.0, 0.1), fast)
    assert drift.status == "drifting" and drift.trailing_mean == pytest.approx(0.7) and not drift.failed


def test_trailing_mean_uses_the_last_k_nights_before_tonight():
    history = nights([10, 20, 30, 40, 50, 60, 70, 80, 90])
    assert perf_gate.trailing_mean(history, "loop.completions_per_s", nights=3) == pytest.approx(80)
    assert judge(rec(100, "2026-11-05"), BASE, history).trailing_mean == pytest.approx(25)  # only nights before the 5th


def test_no_baseline_is_new():
    assert judge(rec(1, "2026-11-20"), None, []).status == "new"


def test_exit_codes_crash_beats_infra_beats_regression():
    bad = judge(rec(10, "2026-11-20"), BASE, [])
    crash, infra = perf.Failure("a", "crash", "x"), perf.Failure("b", "infra", "y")
    assert perf_gate.exit_code([], []) == perf_gate.EXIT_OK
    assert perf_gate.exit_code([bad], []) == perf_gate.EXIT_REGRESSION
    assert perf_gate.exit_code([bad], [infra]) == perf_gate.EXIT_INFRA
    assert perf_gate.exit_code([bad], [infra, crash]) == perf_gate.EXIT_CRASH


def test_baseline_file_and_its_errors(tmp_path):
    path = tmp_path / "perf-cpu.json"
    path.write_text(json.dumps({"metrics": {"a": {"value": 2, "tolerance": 0.3}, "b": {"value": 5}}}))
    assert perf_gate.load_baselines(path) == {"a": Baseline(2.0, 0.3), "b": Baseline(5.0, perf_gate.DEFAULT_TOLERANCE)}
    path.write_text(json.dumps({"metrics": {"c": {"tolerance": 0.3}}}))
    with pytest.raises(ValueError, match="metric 'c' needs a numeric 'value'"):
        perf_gate.load_baselines(path)


def test_committed_baselines_name_real_metrics():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    for hw in perf.ALL_HARDWARE:
        if hw != "cpu" and not perf_gate.baselines_path(repo, hw).is_file():
            continue  # measured on that hardware first: until then its figures are "new" and never fail
        baselines = perf_gate.load_baselines(perf_gate.baselines_path(repo, hw))
        assert baselines, f"no baselines for {hw}"
        for name, baseline in baselines.items():
            assert name.split(".")[0] in {b.name for b in perf.BENCHMARKS}, name
            assert 0 < baseline.tolerance <= 1


def test_extractors_read_the_benchmarks_json():
    loop = perf._loop({"completions_per_s": 40.0, "seconds_per_step": 1.6})
    assert loop == [("loop.completions_per_s", 40.0, "completions/s", True), ("loop.seconds_per_step", 1.6, "s", False)]
    sync = perf._weight_sync({"model": "30M", "push_s": 0.03, "push_over_plain": 1.4})
    assert [n for n, *_ in sync] == ["weight_sync.30M.push_s", "weight_sync.30M.push_over_plain_copy"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        perf.benchmarks_for("cpu", ["nope"])
    assert "loop" not in {b.name for b in perf.benchmarks_for("cuda")}  # the CPU-only loop benchmark


def test_the_tpu_night_runs_the_jax_pair_and_nothing_that_needs_megatron_or_torch_devices():
    tpu = {b.name: b for b in perf.benchmarks_for("tpu")}
    assert sorted(tpu) == ["jax_engine_decode", "jax_train_step", "loop_jax_pair", "suite_collection"]
    assert all("--jax-only" in tpu[name].args for name in ("jax_engine_decode", "jax_train_step"))
    assert tpu["jax_engine_decode"].args[tpu["jax_engine_decode"].args.index("--sizes") + 1] == "qwen3-5m,qwen3-30m"
    loop = tpu["loop_jax_pair"].args
    assert loop[loop.index("--train-backend") + 1] == "jax" and loop[loop.index("--rollout-engine") + 1] == "jax"
    assert "--colocate" in loop and tpu["loop_jax_pair"].loopback  # one chip: the engine in the trainer's process
    for hardware in ("cpu", "cuda", "rocm"):  # the JAX benchmarks' CPU figures are committed results, not nightly
        assert not {"jax_engine_decode", "jax_train_step", "loop_jax_pair"} & {
            b.name for b in perf.benchmarks_for(hardware)
        }


def test_jax_extractors_read_what_the_jax_benchmarks_write():
    from pathlib import Path

    results = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
    decode = perf._jax_engine_decode(json.loads((results / "jax_engine_decode_cpu.json").read_text()))
    assert [name for name, *_ in decode] == ["jax_engine_decode.qwen3-5m.tok_s", "jax_engine_decode.qwen3-30m.tok_s"]
    assert all(value > 0 and higher for _, value, _, higher in decode)
    train = perf._jax_train_step(json.loads((results / "jax_train_step_cpu.json").read_text()))
    assert {name for name, *_ in train} == {f"jax_train_step.{s}.{k}_s" for s in ("5M", "30M") for k in ("rl", "sft")}
    loop = perf._loop_jax_pair(json.loads((results / "loop_jax_pair_cpu.json").read_text()))
    assert [name for name, *_ in loop] == ["loop_jax_pair.completions_per_s", "loop_jax_pair.seconds_per_step"]


def test_records_round_trip_and_bad_lines_name_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    perf.write_records(nights([1, 2]), path)
    assert perf.read_records(path) == nights([1, 2])
    path.write_text(path.read_text() + '{"name": "x"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:3: not a metric record"):
        perf.read_records(path)


def test_report_lists_regressions_first_and_draws_the_history(tmp_path):
    history = nights([100, 100, 100])
    tonight = rec(60, "2026-11-20")
    verdicts = [judge(rec(99, "2026-11-20", "other.metric"), Baseline(100, 0.1), []), judge(tonight, BASE, history)]
    summary = perf_report.write_report(
        tmp_path, "cpu", verdicts, [perf.Failure("loop", "infra", "timed out")], history + [tonight]
    )
    text = summary.read_text()
    assert text.index("loop.completions_per_s") < text.index("other.metric")
    assert "REGRESSION" in text and "- **loop** (infra): timed out" in text
    assert (tmp_path / "plots" / "loop.completions_per_s.png").stat().st_size > 1000
