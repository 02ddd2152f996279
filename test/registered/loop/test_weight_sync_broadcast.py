"""Weight sync "broadcast" (SGLang's distributed update) end to end over gloo: the protocol between the
trainer-side sender and the embedded engine's HTTP endpoints (group setup, bucket metadata, broadcast,
version bump, a rejected update, timeouts on either side), then the real loop, with each transport, with an
engine killed and restarted mid-rollout, which must still serve the newest weights."""

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=80, suite="base-c-test-cpu")

import json  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from loop_helpers import dumped, rows, run  # noqa: E402

from slime.ray.weight_sync import BroadcastSender, WeightSyncError  # noqa: E402
from slime.rollout.engines.embedded.engine import EmbeddedEngine  # noqa: E402
from slime.rollout.engines.embedded.server import serve_http  # noqa: E402

TIMEOUT_S = 3.0  # collectives on both sides; the failures below must surface within a few of these


@pytest.fixture
def served(files):
    engines = [EmbeddedEngine(str(files["model"]), max_batch_size=2, max_seq_len=32) for _ in range(2)]
    handles = [serve_http(engine, weight_group_timeout_s=TIMEOUT_S) for engine in engines]
    yield engines, [h.url for h in handles]
    for handle, engine in zip(handles, engines):
        handle.stop()
        engine.shutdown()


def new_weights(engine: EmbeddedEngine, scale: float) -> list[tuple[str, torch.Tensor]]:
    return [(name, (t.float() * scale).clone()) for name, t in engine.named_weights().items()]


def buckets_of(named: list, count: int) -> list[list]:
    size = -(-len(named) // count)
    return [named[i : i + size] for i in range(0, len(named), size)]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_buckets_broadcast_to_every_engine_and_publish_the_version_at_the_last(served):
    engines, urls = served
    sender = BroadcastSender("gloo", "127.0.0.1", TIMEOUT_S)
    named = new_weights(engines[0], 0.5)
    sender.send(urls, buckets_of(named, 3), version=7)
    for engine in engines:
        assert engine.weight_version == 7
        got = engine.named_weights()
        assert all(torch.equal(got[name].float(), t) for name, t in named)
    group = sender.group
    sender.send(urls, buckets_of(new_weights(engines[0], 2.0), 2), version=8)  # the group is kept
    assert sender.group is group and [e.weight_version for e in engines] == [8, 8]


def test_rejected_update_leaves_old_weights_serving_and_the_next_one_works(served):
    engines, urls = served
    sender = BroadcastSender("gloo", "127.0.0.1", TIMEOUT_S)
    good = new_weights(engines[0], 0.5)
    sender.send(urls, [good], version=1)
    before = {n: t.clone() for n, t in engines[1].named_weights().items()}
    bad = [(n, t) for n, t in new_weights(engines[0], 3.0)]
    bad[-1] = (bad[-1][0], torch.zeros(3, 3))  # wrong shape in the last bucket: the earlier buckets are void too
    with pytest.raises(WeightSyncError, match=r"version 2 failed at .*has shape \(3, 3\)"):
        sender.send(urls, buckets_of(bad, 3), version=2)
    for engine in engines:
        assert engine.weight_version == 1 and engine.health()
    assert all(torch.equal(before[n], t) for n, t in engines[1].named_weights().items())
    sender.send(urls, buckets_of(new_weights(engines[0], 0.25), 2), version=3)  # the group is formed again
    assert [e.weight_version for e in engines] == [3, 3]


def test_engine_times_out_on_a_bucket_that_is_never_broadcast(served):
    engines, urls = served
    sender = BroadcastSender("gloo", "127.0.0.1", TIMEOUT_S)
    sender.connect(urls[:1])
    start = time.monotonic()
    status, answer = post(
        urls[0] + "/update_weights_from_distributed",
        {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]], "group_name": sender.group_name},
    )
    assert status == 400 and time.monotonic() - start < 10 * TIMEOUT_S
    assert "weight broadcast failed" in answer["message"] and "must be set up again" in answer["message"]
    assert engines[0].weight_version == 0 and engines[0].health()
    status, answer = post(
        urls[0] + "/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}
    )
    assert status == 400 and "not set up" in answer["message"]  # marked: no half-alive group is reused


def test_trainer_times_out_when_an_engine_does_not_receive(served):
    engines, urls = served
    sender = BroadcastSender("gloo", "127.0.0.1", TIMEOUT_S)
    sender.connect(urls)
    assert post(urls[1] + "/destroy_weights_update_group", {"group_name": sender.group_name})[0] == 200
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"version 5 failed: weight broadcast failed.*not set up"):
        sender.send(urls, [new_weights(engines[0], 0.5)], version=5)
    assert time.monotonic() - start < 10 * TIMEOUT_S
    assert sender.group is None and engines[1].weight_version == 0 and engines[1].health()


def test_an_unreachable_engine_fails_the_update_within_the_timeout(served):
    engines, urls = served
    sender = BroadcastSender("gloo", "127.0.0.1", TIMEOUT_S)
    gone = "http://127.0.0.1:9"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"did not form.*http://127.0.0.1:9: .*cannot reach the server"):
        sender.send([urls[0], gone], [new_weights(engines[0], 0.5)], version=4)
    assert time.monotonic() - start < 10 * TIMEOUT_S and sender.group is None
    assert engines[0].weight_version == 0 and engines[0].health()


@pytest.mark.parametrize("transport", ["broadcast", "object_store"])
def test_loop_restarts_a_killed_engine_with_the_newest_weights(files, tmp_path, transport):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    run(
        files,
        out,
        **{
            "weight-sync": transport,
            "rollout-num-gpus": 2,
            "custom-generate-function-path": "loop_plugins.generate_killing_the_last_engine_in_rollout_1",
            "save-debug-rollout-data": dumps,
            "ci-test": True,
        },
    )
    steps = rows(out)
    assert [r["rollout/engine_restarts"] for r in steps] == [0.0, 1.0, 0.0]
    assert all(r["perf/weight_sync_time"] > 0 for r in steps)
    batches = dumped(dumps)
    assert [len(b) for b in batches] == [16, 16, 16]
    # every rollout after an update was generated by it, on both engines, the restarted one included
    assert [{s["weight_version"] for s in b} for b in batches] == [{0}, {1}, {2}]
