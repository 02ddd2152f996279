"""End to end on Ray, --fully-async: the engines generate without pause while the trainer trains, each step
takes the first finished groups fresh enough, staleness never above --max-staleness, tokens keep the version
they were sampled under, and a resume trains no group twice and loses none from the data order."""

import shutil

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=45, suite="base-c-test-cpu")

from loop_helpers import dumped, rows, run  # noqa: E402

from slime.training.checkpoint import read_extra  # noqa: E402

FULLY_ASYNC = {"fully-async": True, "max-staleness": 1, "rollout-num-gpus": 2, "rollout-temperature": 1.0}


def groups_of(batches) -> list[int]:
    return [g for batch in batches for g in sorted({s["group_index"] for s in batch})]


def test_fully_async_trains_on_fresh_enough_groups(files, tmp_path):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    run(files, out, **FULLY_ASYNC, **{"num-rollout": 5, "save-debug-rollout-data": dumps, "ci-test": True})
    steps, batches = rows(out), dumped(dumps)
    assert len(steps) == 5 and [len(b) for b in batches] == [16] * 5
    for step, (metrics, batch) in enumerate(zip(steps, batches)):
        assert metrics["rollout/staleness_max"] <= 1, metrics
        for s in batch:
            versions = s["token_versions"]
            assert len(versions) == s["response_length"] and versions == sorted(versions)
            assert step - 1 <= versions[0] <= step and versions[-1] <= step  # trained at version `step`
            assert all(len(g) == 4 for g in [[t for t in batch if t["group_index"] == s["group_index"]]])
    trained = groups_of(batches)
    assert len(trained) == len(set(trained)) == 20  # no group trained twice
    assert steps[0]["rollout/staleness_max"] == 0  # nothing was updated before step 0


def test_resume_trains_no_group_twice_and_loses_none(files, tmp_path):
    common = {**FULLY_ASYNC, "num-rollout": 4, "save-interval": 1}
    full, dumps = tmp_path / "full", tmp_path / "dumps"
    run(files, full, save=tmp_path / "ckpt", **common, **{"save-debug-rollout-data": dumps})
    before = groups_of(dumped(dumps)[:2])  # trained before the step-2 checkpoint
    state = read_extra(tmp_path / "ckpt" / "step_00000002")["rollout"]["data"]
    waiting = [g[0]["group_index"] for g in state["buffer"]]  # drawn, not trained: first in line on resume
    assert not set(before) & set(waiting)
    assert sorted(before + waiting) == list(range(state["next_group_index"]))  # every drawn group: trained or kept
    assert all(s["response_length"] == 0 for g in state["buffer"] for s in g)  # kept from their prompt
    resumed_root, part, part_dumps = tmp_path / "resumed_ckpt", tmp_path / "part", tmp_path / "part_dumps"
    shutil.copytree(tmp_path / "ckpt" / "step_00000002", resumed_root / "step_00000002")
    run(files, part, load=resumed_root, save=resumed_root, **common, **{"save-debug-rollout-data": part_dumps})
    after = groups_of(dumped(part_dumps))
    assert [r["step"] for r in rows(part)] == [2, 3]
    assert not set(before) & set(after) and len(after) == len(set(after)) == 8
