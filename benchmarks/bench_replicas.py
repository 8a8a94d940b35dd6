"""The rollout's generate phase over one generation replica vs two (issue #10).

The work: 64 prompts of the PPO benchmark's tiny Llama (`bench_ppo.make_setup`), 32 new tokens
each, sampled with fixed per-prompt seeds, in rollout micro-batches of 8, generated as
`services/orchestrator/rollouts.py` does: as many micro-batches in flight as the generator has
healthy replicas (`Generator.concurrency()`). Two `aligner serve generation` processes run on
127.0.0.1; "1 replica" uses the first only, "2 replicas" both, through the orchestrator's own
client layer (`clients.GenerationReplicas`). Each replica process has `BENCH_SERVICE_THREADS`
torch threads (default 1).

On this machine's two cores the replicas share the cores the single replica already has, so a
speed-up comes only from overlapping one replica's request handling with the other's compute;
on a cluster each replica is its own GPU. Both layouts produce the same tokens (checked).

Timing: the two layouts take turns, one warm-up each, then `BENCH_REPLICA_ROUNDS` rounds
(default 5); `seconds` are medians.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import bench_ppo
from benchmarks.harness import threads

PROMPTS, MICRO_BATCH, NEW_TOKENS = 64, 8, 32


def _generators(pairs: list[str]):
    from services.generation.client import GenerationClient
    from services.orchestrator.clients import GenerationReplicas

    def connect(pair: str):
        triton_url, control_url = pair.split("+")
        return GenerationClient(triton_url, control_url, retry=None, wait_for_ready=False)

    return GenerationReplicas("generation", resolve=lambda: list(pairs), connect=connect,
                              deadline_base_s=300.0, deadline_per_token_s=0.0)  # fmt: skip


def generate_phase(generator, prompts: list[list[int]], sampling) -> tuple[float, list[list[int]]]:
    """Seconds to generate every micro-batch, the rollout collector's way; and the tokens."""
    chunks = [list(range(i, min(i + MICRO_BATCH, len(prompts)))) for i in range(0, len(prompts), MICRO_BATCH)]
    start = time.perf_counter()
    with ThreadPoolExecutor(generator.concurrency()) as pool:
        results = list(pool.map(lambda c: generator.generate([prompts[i] for i in c], sampling, c, 0), chunks))
    return time.perf_counter() - start, [r.tokens for batch in results for r in batch]


def run() -> list[dict]:
    from common.config import GenerationServiceConfig
    from services.launch.processes import ServiceProcess
    from trainer.engine import SamplingParams

    threads()
    service_threads = int(os.environ.get("BENCH_SERVICE_THREADS", "1"))
    rounds = int(os.environ.get("BENCH_REPLICA_ROUNDS", "5"))
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        root = Path(tmp)
        setup = bench_ppo.make_setup(root)
        prompts = [setup["prompt_ids"][i % len(setup["prompt_ids"])] for i in range(PROMPTS)]
        config = GenerationServiceConfig(checkpoint_path=str(setup["policy"]))
        config.server.torch_threads = service_threads
        config_path = root / "generation.yaml"
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.structured(config), config_path)
        processes = [
            ServiceProcess(name="generation", config_path=config_path, overrides=[], log_path=root / f"gen-{i}.log",
                           ports_file=root / f"gen-{i}.json", torch_threads=service_threads)
            for i in range(2)
        ]  # fmt: skip
        try:
            for process in processes:
                process.start()
            pairs = []
            for process in processes:
                info = process.wait_ready(300)
                pairs.append(f"{info['host']}:{info['triton_grpc_port']}+{info['host']}:{info['port']}")
            layouts = {"1 replica": _generators(pairs[:1]), "2 replicas": _generators(pairs)}
            sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0)
            times: dict[str, list[float]] = {name: [] for name in layouts}
            tokens = {}
            for i in range(1 + rounds):
                order = list(layouts) if i % 2 == 0 else list(reversed(layouts))
                for name in order:
                    seconds, tokens[name] = generate_phase(layouts[name], prompts, sampling)
                    if i > 0:
                        times[name].append(seconds)
            for generator in layouts.values():
                generator.close()
        finally:
            for process in processes:
                process.stop()
    one, two = statistics.median(times["1 replica"]), statistics.median(times["2 replicas"])
    generated = sum(len(t) for t in tokens["1 replica"])
    return [
        {
            "case": f"generate phase, {PROMPTS} prompts x {NEW_TOKENS} new tokens, micro-batches of {MICRO_BATCH}",
            "unit": "s (median)",
            "ours": round(two, 3),
            "1 replica": round(one, 3),
            "ratio": round(one / two, 2),
            "threads": service_threads,
            "notes": f"2 replicas vs 1 on the same 2 cores; same tokens: {tokens['1 replica'] == tokens['2 replicas']}; "
            f"{generated} tokens",
        }
    ]
