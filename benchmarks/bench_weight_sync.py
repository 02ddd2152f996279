"""Weight sync, trainer -> embedded engine, in one process, beside a plain copy of the same bytes. JSON out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_weight_sync.py --out bench_weight_sync.json

"push" is what the loop does every step with weight sync "object_store", minus the object store itself: the Megatron trainer exports its weights as
HF-named full tensors in buckets (`hf_weight_buckets`), and the engine takes them inside a begin/end update
(`update_weights_from_tensors`: validate, copy into its fused buffers). "plain copy" copies the same bytes
into preallocated tensors of the same shapes (`dst.copy_(src)` per tensor): the floor any sync has to pay.
The engine's packed decode weights (MKL reorder, x86 hosts) are derived from the weights and rebuilt on the
first decode after an update; that cost is reported apart ("repack"), since the trainer does not wait for it.
"broadcast" is weight sync "broadcast" end to end (sender, gloo group, the engine's HTTP endpoints);
--object-store adds weight sync "object_store" (put by the trainer, get by the engine; starts Ray).
Times are the median of --repeats runs after one warm-up; the goal is push <= 2x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train_step import SIZES, build_checkpoint  # the same Qwen3 sizes as the trainer benchmark


def broadcast_sync(trainer, engine, bucket_mb: int):
    """Weight sync "broadcast" as the loop runs it, minus Ray: the trainer's export through the sender's gloo
    group into the engine's HTTP server (both in this process, the server on its own threads)."""
    from slime.ray.weight_sync import BroadcastSender
    from slime.rollout.engines.embedded.server import serve_http

    handle = serve_http(engine)
    sender = BroadcastSender("gloo", "127.0.0.1", timeout_s=120)

    def run(version: int) -> None:
        sender.send([handle.url], trainer.hf_weight_buckets(bucket_mb << 20), version)

    return run


def object_store_sync(trainer, engine, bucket_mb: int):
    """Weight sync "object_store" as the loop runs it, in one process: packed buckets put in Ray's object store
    by the trainer, fetched and applied by the engine (needs Ray: run in a private network namespace)."""
    import ray

    from slime.ray.weight_sync import PackedBucket

    def run(version: int) -> None:
        refs = [ray.put(PackedBucket.of(bucket)) for bucket in trainer.hf_weight_buckets(bucket_mb << 20)]
        engine.begin_weight_update()
        for i, ref in enumerate(refs):
            engine.update_weights_from_tensors(ray.get(ref).tensors(), version, finish=i == len(refs) - 1)
        engine.end_weight_update()

    return run


def push_sync(trainer, engine, bucket_mb: int):
    """The trainer's HF-named buckets into the engine inside one begin/end update (weight sync minus transport)."""

    def run(version: int) -> None:
        engine.begin_weight_update()
        buckets = list(trainer.hf_weight_buckets(bucket_mb << 20))
        for i, bucket in enumerate(buckets):
            engine.update_weights_from_tensors(bucket, version, finish=i == len(buckets) - 1)
        engine.end_weight_update()

    return run


def plain_copy(sources: list[torch.Tensor]):
    """The same bytes copied into preallocated tensors of the same shapes: the floor any sync pays."""
    targets = [torch.empty_like(t) for t in sources]

    def run(_: int) -> None:
        for dst, src in zip(targets, sources):
            dst.copy_(src)

    return run


def median_seconds(fn, repeats: int) -> float:
    """The median of `repeats` timed calls fn(1..repeats) after one warm-up call fn(0)."""
    fn(0)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="30M", choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--out", default="bench_weight_sync.json")
    p.add_argument("--object-store", action="store_true", help="also time the object-store transport (starts Ray)")
    return p.parse_args()


def measure(args: argparse.Namespace, folder: Path) -> dict:
    """Every timing of the module docstring, on a trainer and an engine built from the checkpoint in `folder`."""
    from slime.backends import select_backend
    from slime.net import free_port
    from slime.rollout.engines.embedded.engine import EmbeddedEngine
    from slime.training.actor import PolicyTrainer
    from slime.training.config import TrainerConfig
    from slime.training.distributed import destroy_distributed, init_distributed

    backend = select_backend("cpu")
    init_distributed(backend, 0, 1, "127.0.0.1", free_port())
    trainer = PolicyTrainer(TrainerConfig(hf_checkpoint=str(folder)), backend)
    engine = EmbeddedEngine(str(folder), max_batch_size=4, max_seq_len=64)
    sources = [t.clone() for _, t in trainer.hf_named_tensors()]
    times = {"bytes": sum(t.numel() * t.element_size() for t in sources)}
    times["push_s"] = median_seconds(push_sync(trainer, engine, args.bucket_mb), args.repeats)
    times["plain_copy_s"] = median_seconds(plain_copy(sources), args.repeats)
    times["repack_s"] = median_seconds(lambda _: engine.model.pack_for_decode(), args.repeats)
    assert engine.weight_version == args.repeats
    times["broadcast_s"] = median_seconds(broadcast_sync(trainer, engine, args.bucket_mb), args.repeats)
    assert engine.weight_version == args.repeats
    times["object_store_s"] = None
    if args.object_store:
        import ray

        ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
        times["object_store_s"] = median_seconds(object_store_sync(trainer, engine, args.bucket_mb), args.repeats)
        ray.shutdown()
    engine.shutdown()
    destroy_distributed()
    return times


def report(args: argparse.Namespace, params: int, times: dict) -> dict:
    """The JSON result, and the lines printed."""
    push_s, plain_s, repack_s = times["push_s"], times["plain_copy_s"], times["repack_s"]
    broadcast_s, object_store_s, nbytes = times["broadcast_s"], times["object_store_s"], times["bytes"]
    result = {
        "benchmark": "weight_sync",
        "model": args.size,
        "parameters": params,
        "bytes": nbytes,
        "push_s": push_s,
        "plain_copy_s": plain_s,
        "push_over_plain": push_s / plain_s,
        "repack_s": repack_s,
        "push_and_repack_over_plain": (push_s + repack_s) / plain_s,
        "push_gb_s": nbytes / push_s / 1e9,
        "broadcast_s": broadcast_s,
        "broadcast_over_push": broadcast_s / push_s,
        "object_store_s": object_store_s,
        "threads": torch.get_num_threads(),
    }
    print(f"broadcast (gloo, HTTP-announced buckets) {broadcast_s * 1000:.1f} ms, {broadcast_s / push_s:.2f}x the push")
    if object_store_s is not None:
        print(
            f"object store (put + get + apply) {object_store_s * 1000:.1f} ms, {object_store_s / push_s:.2f}x the push"
        )
    print(
        f"weight sync {args.size} ({params / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB): push {push_s * 1000:.1f} ms, "
        f"plain copy {plain_s * 1000:.1f} ms, ratio {push_s / plain_s:.2f}x (goal <= 2x); deferred repack {repack_s * 1000:.1f} ms"
    )
    return result


def main() -> int:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        params = build_checkpoint(args.size, Path(tmp))
        times = measure(args, Path(tmp))
    result = report(args, params, times)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
