"""Which weight-sync transport a run gets: the backend's capabilities, the placement, and --weight-sync,
refused in one line before anything starts; the object store's packed bucket."""

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=6, suite="base-a-test-cpu")

import pytest  # noqa: E402

from slime.backends import get_backend_class  # noqa: E402
from slime.config import ConfigError, parse_config  # noqa: E402
from slime.ray.weight_sync import PackedBucket, with_last  # noqa: E402
from slime.settings import chosen_weight_sync  # noqa: E402

BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rm-type", "math"]


def choose(hardware: str, *flags: str) -> str:
    return chosen_weight_sync(parse_config([*BASE, *flags]), get_backend_class(hardware)())


@pytest.mark.parametrize(
    "hardware, flags, transport",
    [
        ("cpu", (), "object_store"),
        ("cpu", ("--weight-sync", "broadcast"), "broadcast"),
        ("cpu", ("--colocate",), "object_store"),
        ("cuda", (), "broadcast"),
        ("cuda", ("--colocate",), "ipc"),
        ("rocm", ("--colocate",), "ipc"),
        ("cuda", ("--colocate", "--weight-sync", "object_store"), "object_store"),
        ("tpu", (), "object_store"),
    ],
)
def test_default_and_override(hardware, flags, transport):
    assert choose(hardware, *flags) == transport


def test_a_transport_the_backend_lacks_is_one_line():
    with pytest.raises(
        ConfigError, match=r"^--weight-sync ipc: the cpu backend offers object_store, broadcast, in_process$"
    ):
        choose("cpu", "--colocate", "--weight-sync", "ipc")
    with pytest.raises(
        ConfigError, match=r"^--weight-sync broadcast: the tpu backend offers object_store, in_process$"
    ):
        choose("tpu", "--weight-sync", "broadcast")


def test_ipc_needs_colocate():
    with pytest.raises(ConfigError, match="--weight-sync ipc .* needs --colocate"):
        parse_config([*BASE, "--weight-sync", "ipc"])


def test_the_last_bucket_is_marked():
    assert list(with_last([[1], [2], [3]])) == [([1], False), ([2], False), ([3], True)]
    assert list(with_last([])) == []


def test_ipc_payload_round_trips_a_flattened_bucket():
    """The ipc serializer's pickler on host tensors (its device-UUID rewrite needs a GPU: test_weight_sync_gpu.py)."""
    import torch

    from slime.backends.cuda.ipc import serialize_ipc_named_tensors
    from slime.rollout.engines.protocol import FLATTENED_BUCKET, deserialize_payload, flatten_bucket

    named = [("w", torch.randn(2, 3)), ("b", torch.arange(4, dtype=torch.bfloat16)), ("s", torch.tensor(1.5))]
    back = deserialize_payload(serialize_ipc_named_tensors(flatten_bucket(named)), FLATTENED_BUCKET)
    assert [n for n, _ in back] == ["w", "b", "s"]
    assert all(x.dtype == y.dtype and torch.equal(x, y) for (_, x), (_, y) in zip(back, named))


def test_packed_bucket_round_trips_every_dtype_and_travels_out_of_band():
    """Mixed dtypes and odd sizes come back equal, as views of one array; pickled as Ray pickles (protocol 5,
    out-of-band buffers) the bytes are one buffer outside the pickle, and the views read a read-only copy."""
    import pickle

    import torch

    g = torch.Generator().manual_seed(0)
    named = [
        ("a.weight", torch.randn(3, 5, generator=g)),
        ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),  # 14 bytes: the next entry is realigned
        ("c.scale", torch.tensor(2.5, dtype=torch.float64)),
        ("d.ids", torch.arange(3, dtype=torch.int64)),
        ("e.view", torch.randn(4, 6, generator=g)[:, 1:3]),  # a non-contiguous view of a larger tensor
    ]
    packed = PackedBucket.of(named)
    assert all(start % PackedBucket.ALIGN == 0 for *_, start in packed.entries)
    buffers = []
    wire = pickle.dumps(packed, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and len(wire) < 2000  # the bytes did not go into the pickle
    received = pickle.loads(wire, buffers=[memoryview(bytes(buffers[0].raw()))])  # read-only, as from the store
    for (name, tensor), (got_name, got) in zip(named, received.tensors()):
        assert got_name == name and got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor)
