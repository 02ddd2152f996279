"""slime's weight-sync senders against SGLang's own receiving code (the pinned package, `sglang_runtime.py`): the
broadcast group formed with SGLang's `init_custom_process_group`, buckets received by its ModelRunner methods,
groups destroyed and formed again, an update while SGLang has requests waiting, a peer gone, and host-tensor
payloads read by its MultiprocessingSerializer (each tensor's own bytes only). Each SGLang side is its own process,
as each SGLang server is."""

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=60, suite="base-b-test-cpu")

import base64  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import sglang_runtime  # noqa: E402
import torch  # noqa: E402

from slime.ray.weight_sync import BroadcastSender, PackedBucket, WeightSyncError  # noqa: E402
from slime.rollout.engines.protocol import flatten_bucket, serialize_named_tensors  # noqa: E402
from slime.rollout.engines.sglang.client import SGLangClient  # noqa: E402

pytestmark = pytest.mark.skipif(sglang_runtime.ROOT is None, reason=sglang_runtime.WHY_NOT)
TIMEOUT_S = 3.0  # the trainer side's collectives; SGLang's side waits its own default (30 minutes)
HERE = Path(__file__).parent


class Side:
    """One SGLang receiving side in its own process."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "sglang_runtime.py")], stdout=subprocess.PIPE, text=True, cwd=HERE
        )
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://"), f"the SGLang side did not start (exit {self.process.poll()})"

    def post(self, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, json.dumps(body or {}).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def state(self) -> dict:
        return self.post("/_state")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Gone at once, as a crashed server is."""
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def sides():
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda _: Side(), range(2)))
    yield started
    for side in started:
        side.stop()


@pytest.fixture
def sender(sides):
    sender = BroadcastSender("gloo", "127.0.0.1", TIMEOUT_S)
    yield sender
    sender.disconnect([s.url for s in sides])


def weights(scale: float) -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(0)
    named = [(f"model.layers.{i}.mlp.up_proj.weight", torch.randn(8, 4) * scale) for i in range(4)]
    return named + [
        ("model.norm.weight", torch.ones(4) * scale),
        ("lm_head.weight", torch.randn(16, 4, dtype=torch.bfloat16)),
    ]


def buckets_of(named: list, count: int) -> list[list]:
    size = -(-len(named) // count)
    return [named[i : i + size] for i in range(0, len(named), size)]


def received(state: dict, last: int) -> list[tuple[str, float]]:
    """(name, sum) of the tensors SGLang's model got in its last `last` load_weights calls."""
    return [(name, total) for load in state["loads"][-last:] for name, _, _, total in load]


def matches(got: list[tuple[str, float]], named: list) -> bool:
    """The same tensor names in order, each with the sum of the sent tensor."""
    want = [(name, float(t.double().sum())) for name, t in named]
    return [n for n, _ in got] == [n for n, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want])


def test_a_group_forms_with_sglang_and_every_bucket_reaches_its_model(sides, sender):
    named = weights(0.5)
    sender.send([s.url for s in sides], buckets_of(named, 3), version=7)
    for side in sides:
        state = side.state()
        assert state["crashed"] == "" and state["groups"] == [sender.group_name]
        assert matches(received(state, 3), named) and state["weight_version"] == "7"
        assert not state["paused"] and state["flushes"] >= 1  # flushed after the whole update, then continued
        assert [dtype for load in state["loads"][-3:] for _, _, dtype, _ in load][-1] == "torch.bfloat16"
    group = sender.group
    sender.send([s.url for s in sides], buckets_of(weights(2.0), 2), version=8)  # the group is kept
    assert sender.group is group
    assert all(matches(received(s.state(), 2), weights(2.0)) for s in sides)


def test_a_group_is_destroyed_on_every_engine_before_it_is_formed_again(sides, sender):
    urls = [s.url for s in sides]
    sender.send(urls, [weights(1.0)], version=1)
    sender.send(urls[:1], [weights(3.0)], version=2)  # the engines changed: destroyed on both, formed with one
    assert sides[0].state()["groups"] == [sender.group_name] and sides[1].state()["groups"] == []
    sender.disconnect()
    assert sides[0].state()["groups"] == [] and sender.group is None
    sender.send(urls, [weights(4.0)], version=3)
    assert [s.state()["weight_version"] for s in sides] == ["3", "3"]
    assert all(matches(received(s.state(), 1), weights(4.0)) for s in sides)


def test_an_update_while_sglang_has_requests_keeps_its_scheduler_alive_and_continues(sides, sender):
    urls = [s.url for s in sides]
    for side in sides:
        side.post("/_add_running", {"rids": ["r1", "r2"]})
    sender.send(urls, buckets_of(weights(0.25), 2), version=5)
    for side in sides:
        state = side.state()
        # the retract pause re-queued the running requests; a flush would have failed SGLang's assert
        assert state["crashed"] == "" and state["waiting"] == ["r1", "r2"] and not state["paused"]
        assert matches(received(state, 2), weights(0.25)) and state["weight_version"] == "5"


def test_flush_cache_in_a_bucket_while_requests_wait_kills_sglang_which_slime_never_sends():
    """The hazard itself, on SGLang's own scheduler code: a bucket with flush_cache=true while requests wait."""
    side = Side()
    try:
        side.post("/_add_running", {"rids": ["r"]})
        side.post("/pause_generation", {"mode": "retract"})
        payload = serialize_named_tensors([("w", torch.ones(2))])
        body = {"serialized_named_tensors": [payload], "flush_cache": True}
        with pytest.raises(urllib.error.HTTPError):
            side.post("/update_weights_from_tensor", body)
        assert "Cache flush failed" in side.state()["crashed"]
    finally:
        side.stop()


def test_a_peer_gone_fails_the_update_within_the_timeout_naming_it(sides):
    extra = Side()
    sender = BroadcastSender("gloo", "127.0.0.1", TIMEOUT_S)
    try:
        sender.connect([sides[0].url, extra.url])
        extra.kill()
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match=rf"version 9 .*{extra.url}"):
            sender.send([sides[0].url, extra.url], [weights(1.0)], version=9)
        assert time.monotonic() - start < 10 * TIMEOUT_S and sender.group is None
    finally:
        extra.stop()
        sender.disconnect([sides[0].url])
    # the survivor was told to continue, and a new group forms with it
    assert not sides[0].state()["paused"] and sides[0].state()["crashed"] == ""
    sender.send([sides[0].url], [weights(1.5)], version=10)
    assert sides[0].state()["weight_version"] == "10"
    sender.disconnect()


def test_a_join_that_times_out_is_one_error_naming_the_group():
    sender = BroadcastSender("gloo", "127.0.0.1", 1.0)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"weight group 'slime_weight_sync' \(gloo, rank 0 of 2 .*did not form"):
        sender.connect(["http://127.0.0.1:9"])  # nothing answers there: rank 1 never joins
    assert time.monotonic() - start < 30 and sender.group is None


def test_object_store_payloads_carry_each_tensor_once_and_sglang_reads_them(sides):
    named = [(f"w{i}", torch.full((1024,), float(i))) for i in range(64)]  # 64 tensors of 4 KiB
    views = PackedBucket.of(named).tensors()  # views into one 256 KiB buffer
    payload = serialize_named_tensors(views)
    tensor_bytes = 64 * 4096
    assert len(base64.b64decode(payload)) <= 1.1 * tensor_bytes
    SGLangClient(sides[0].url).update_weights_from_tensors(views, version=11)
    assert matches(received(sides[0].state(), 1), named)


def test_a_flattened_bucket_is_rebuilt_by_sglangs_tensor_bucket(sides):
    named = weights(0.75)
    payload = base64.b64encode(pickle.dumps(flatten_bucket(named))).decode()
    SGLangClient(sides[1].url).update_weights_from_serialized([payload], 12, load_format="flattened_bucket")
    assert matches(received(sides[1].state(), 1), named)
