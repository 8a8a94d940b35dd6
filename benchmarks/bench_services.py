"""The reward server over gRPC: per-call Score latency, and the dynamic batcher's throughput gain
over batch-1 serving.

Two `aligner serve reward` processes on 127.0.0.1 serve the same tiny reward model (the harness
Llama, 2 layers, hidden 128, with a value head): one with dynamic batching (max_batch_size 64,
max_queue_delay 2000 us, inference_micro_batch_size 32), one with max_batch_size 1 (every request
its own forward pass). Each server gets BENCH_THREADS torch threads.

- latency: one request of one 64-token sequence at a time, median and p90 over the calls.
- throughput: 32 concurrent requests of one 64-token sequence each (asyncio client), the time until
  all 32 are answered; the two servers are timed in turn.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import ARCH, threads

SEQ_LEN, CONCURRENT, LATENCY_CALLS, REPEATS = 64, 32, 40, 15


def _save_reward_model(directory: Path) -> Path:
    from trainer import parallel
    from trainer.checkpoint import save_checkpoint
    from trainer.model import build_model

    parallel.init_parallel()
    model = build_model(ARCH, value_head=True, seed=0)
    return save_checkpoint(directory / "reward", model, step=0, arch=ARCH)


def _start(name: str, workdir: Path, checkpoint: Path, n_threads: int, overrides: list[str]):
    from omegaconf import OmegaConf

    from common.config import ModelServiceConfig
    from services.launch.processes import ServiceProcess

    config = ModelServiceConfig(name="reward", checkpoint_path=str(checkpoint))
    config.server.torch_threads = n_threads
    config_path = workdir / f"{name}.yaml"
    OmegaConf.save(OmegaConf.structured(config), config_path)
    process = ServiceProcess(
        name="reward",
        config_path=config_path,
        overrides=overrides,
        log_path=workdir / f"{name}.log",
        ports_file=workdir / f"{name}.json",
        torch_threads=n_threads,
    )
    process.start()
    return process


def _request(sequences: list[torch.Tensor]):
    from aligner.v1 import reward_pb2

    from common.codec import ragged_to_proto

    return reward_pb2.ScoreRequest(tokens=ragged_to_proto(sequences))


async def _measure(targets: dict[str, str]) -> dict[str, dict[str, float]]:
    from aligner.v1 import reward_pb2_grpc

    from common.grpc_client import make_channel

    g = torch.Generator().manual_seed(0)
    singles = [
        _request([torch.randint(0, ARCH.vocab_size, (SEQ_LEN,), generator=g)]) for _ in range(CONCURRENT)
    ]
    stubs, channels = {}, []
    for name, target in targets.items():
        channel = make_channel(target, retry=None)
        channels.append(channel)
        stubs[name] = reward_pb2_grpc.RewardStub(channel)

    async def burst(stub) -> float:
        start = time.perf_counter()
        replies = await asyncio.gather(*(stub.Score(r) for r in singles))
        assert all(len(reply.rewards.shape) == 1 for reply in replies)
        return time.perf_counter() - start

    results: dict[str, dict[str, float]] = {name: {} for name in stubs}
    for name, stub in stubs.items():  # warm-up, then per-call latency (one request in flight)
        await burst(stub)
        latencies = []
        for i in range(LATENCY_CALLS):
            start = time.perf_counter()
            await stub.Score(singles[i % CONCURRENT])
            latencies.append(time.perf_counter() - start)
        latencies.sort()
        results[name]["latency_ms"] = 1e3 * statistics.median(latencies)
        results[name]["latency_p90_ms"] = 1e3 * latencies[int(0.9 * (len(latencies) - 1))]
    bursts: dict[str, list[float]] = {name: [] for name in stubs}
    for _ in range(REPEATS):  # in turn, so load from other processes hits both alike
        for name, stub in stubs.items():
            bursts[name].append(await burst(stub))
    for name in stubs:
        results[name]["burst_s"] = statistics.median(bursts[name])
    for channel in channels:
        await channel.close()
    return results


def run() -> list[dict]:
    n_threads = threads()
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        workdir = Path(tmp)
        checkpoint = _save_reward_model(workdir)
        batched = _start("batched", workdir, checkpoint, n_threads, [
            "batching.max_batch_size=64", "batching.max_queue_delay_us=2000",
            "batching.inference_micro_batch_size=32",
        ])  # fmt: skip
        single = _start("batch1", workdir, checkpoint, n_threads, ["batching.max_batch_size=1"])
        try:
            targets = {}
            for name, process in (("batched", batched), ("batch1", single)):
                info = process.wait_ready(timeout_s=300)
                targets[name] = f"{info['host']}:{info['port']}"
            results = asyncio.run(_measure(targets))
        finally:
            codes = {"batched": batched.stop(), "batch1": single.stop()}
    b, s = results["batched"], results["batch1"]
    rps_b, rps_s = CONCURRENT / b["burst_s"], CONCURRENT / s["burst_s"]
    return [
        {
            "case": f"Score latency, 1 request x 1 seq of {SEQ_LEN} tokens",
            "unit": "ms (median)",
            "ours": round(b["latency_ms"], 2),
            "batch-1 server": round(s["latency_ms"], 2),
            "ratio": round(s["latency_ms"] / b["latency_ms"], 2),
            "threads": n_threads,
            "notes": f"p90 {b['latency_p90_ms']:.2f} vs {s['latency_p90_ms']:.2f} ms; batched waits up to "
            "max_queue_delay (2 ms) for company",
        },
        {
            "case": f"Score throughput, {CONCURRENT} concurrent 1-seq requests",
            "unit": "requests/s",
            "ours": round(rps_b, 1),
            "batch-1 server": round(rps_s, 1),
            "ratio": round(rps_b / rps_s, 2),
            "threads": n_threads,
            "notes": f"{CONCURRENT} requests done in {1e3 * b['burst_s']:.0f} vs {1e3 * s['burst_s']:.0f} ms; "
            f"servers exited {codes}",
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
