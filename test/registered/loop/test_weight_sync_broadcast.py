"""Weight sync "broadcast" (SGLang's distributed update) end to end over gloo: the protocol between the
trainer-side sender and the embedded engine's HTTP endpoints (group setup, bucket metadata, broadcast,
version bump, a rejected update, timeouts on either side), then the real loop, with each transport, with an
engine killed and restarted mid-rollout, which must still serve the newest weights."""

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=80, suite="base-c-test-cpu")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from loop_helpers import dumped, rows, run  # noqa: E402

from slime.ray.weight_sync import BroadcastSender, WeightSyncError  # noqa: E402
from slime.rollout.engines.base import GenerateRequest, SamplingParams  # noqa: E402
from slime.rollout.engines.embedded.engine import EmbeddedEngine  # noqa: E402
from slime.rollout.engines.embedded.server import READY_PREFIX  # noqa: E402
from slime.rollout.engines.embedded.weights import read_checkpoint_tensors  # noqa: E402
from slime.rollout.engines.sglang.client import SGLangClient  # noqa: E402

TIMEOUT_S = 3.0  # collectives on both sides; the failures below must surface within a few of these
PROMPTS = [[5, 6, 7], [9, 3]]


class ServedEngine:
    """An embedded engine serving SGLang's API in its own process, as in a run (one weight-group member per
    process: torch registers the group by name)."""

    def __init__(self, model: str, group_timeout_s: float):
        command = [sys.executable, "-m", "slime.rollout.engines.embedded.server", "--model", model,
                   "--max-batch-size", "2", "--max-seq-len", "32", "--weight-group-timeout", str(group_timeout_s)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.startswith(READY_PREFIX), f"the engine did not start: {line!r}"
        self.url = line.removeprefix(READY_PREFIX).strip()
        self.client = SGLangClient(self.url, timeout_s=60)

    @property
    def weight_version(self) -> int:
        return self.client.weight_version

    def greedy(self) -> list:
        """Greedy tokens and log-probs of two prompts: what the served weights compute."""
        requests = [
            GenerateRequest(f"g{i}", p, SamplingParams(temperature=0.0, max_new_tokens=4))
            for i, p in enumerate(PROMPTS)
        ]
        return [(r.output_ids, r.output_log_probs) for r in self.client.generate(requests)]  # fmt: skip

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def served(files):
    engines = [ServedEngine(str(files["model"]), TIMEOUT_S) for _ in range(2)]
    yield engines, [e.url for e in engines]
    for engine in engines:
        engine.stop()


@pytest.fixture
def sender():
    """Trainer rank 0's side; torch holds its group by name in this process until it is closed."""
    sender = BroadcastSender("gloo", "127.0.0.1", TIMEOUT_S)
    yield sender
    sender.disconnect()


@pytest.fixture
def reference(files):
    """The same checkpoint in this process, loaded with whatever weights a test sends, to compare against."""
    engine = EmbeddedEngine(str(files["model"]), max_batch_size=2, max_seq_len=32)
    yield engine
    engine.shutdown()


def new_weights(files, scale: float) -> list[tuple[str, torch.Tensor]]:
    return [(name, (t.float() * scale).clone()) for name, t in read_checkpoint_tensors(str(files["model"])).items()]


def served_by(reference: EmbeddedEngine, named: list) -> list:
    """What `reference` generates for PROMPTS with `named` loaded (the expected output of an engine holding them)."""
    reference.update_weights_from_tensors(named, version=0)
    requests = [
        GenerateRequest(f"g{i}", p, SamplingParams(temperature=0.0, max_new_tokens=4)) for i, p in enumerate(PROMPTS)
    ]
    return [(r.output_ids, r.output_log_probs) for r in reference.generate(requests)]  # fmt: skip


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


def test_buckets_broadcast_to_every_engine_and_publish_the_version_at_the_last(files, served, reference, sender):
    engines, urls = served
    named = new_weights(files, 0.5)
    sender.send(urls, buckets_of(named, 3), version=7)
    expected = served_by(reference, named)
    for engine in engines:
        assert engine.weight_version == 7 and engine.greedy() == expected
    group = sender.group
    named = new_weights(files, 2.0)
    sender.send(urls, buckets_of(named, 2), version=8)  # the group is kept
    assert sender.group is group and [e.weight_version for e in engines] == [8, 8]
    assert engines[1].greedy() == served_by(reference, named)


def test_rejected_update_leaves_old_weights_serving_and_the_next_one_works(files, served, reference, sender):
    engines, urls = served
    good = new_weights(files, 0.5)
    sender.send(urls, [good], version=1)
    before = engines[1].greedy()
    bad = new_weights(files, 3.0)
    bad[-1] = (bad[-1][0], torch.zeros(3, 3))  # wrong shape in the last bucket: the earlier buckets are void too
    with pytest.raises(WeightSyncError, match=r"version 2 failed at .*has shape \(3, 3\)"):
        sender.send(urls, buckets_of(bad, 3), version=2)
    for engine in engines:
        assert engine.weight_version == 1 and engine.client.health()
    assert engines[1].greedy() == before
    named = new_weights(files, 0.25)
    sender.send(urls, buckets_of(named, 2), version=3)  # the group is formed again
    assert [e.weight_version for e in engines] == [3, 3] and engines[0].greedy() == served_by(reference, named)


def test_engine_times_out_on_a_bucket_that_is_never_broadcast(served, sender):
    engines, urls = served
    sender.connect(urls[:1])
    start = time.monotonic()
    status, answer = post(
        urls[0] + "/update_weights_from_distributed",
        {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]], "group_name": sender.group_name},
    )
    assert status == 400 and time.monotonic() - start < 10 * TIMEOUT_S
    assert "weight broadcast failed" in answer["message"] and "must be set up again" in answer["message"]
    assert engines[0].weight_version == 0 and engines[0].client.health()
    status, answer = post(
        urls[0] + "/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}
    )
    assert status == 400 and "not set up" in answer["message"]  # marked: no half-alive group is reused


def test_trainer_times_out_when_an_engine_does_not_receive(files, served, sender):
    engines, urls = served
    sender.connect(urls)
    assert post(urls[1] + "/destroy_weights_update_group", {"group_name": sender.group_name})[0] == 200
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"version 5 failed: weight broadcast failed.*not set up"):
        sender.send(urls, [new_weights(files, 0.5)], version=5)
    assert time.monotonic() - start < 10 * TIMEOUT_S
    assert sender.group is None and engines[1].weight_version == 0 and engines[1].client.health()


def test_an_unreachable_engine_fails_the_update_within_the_timeout(files, served, sender):
    engines, urls = served
    gone = "http://127.0.0.1:9"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"did not form.*http://127.0.0.1:9: .*cannot reach the server"):
        sender.send([urls[0], gone], [new_weights(files, 0.5)], version=4)
    assert time.monotonic() - start < 10 * TIMEOUT_S and sender.group is None
    assert engines[0].weight_version == 0 and engines[0].client.health()


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
