"""The dynamic batcher (services/batching.py) on its own: merging concurrent requests, the size
and delay limits, micro-batch chunks, order of results, dropped callers, failures, metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from common import metrics
from common.errors import Unavailable
from services.batching import DynamicBatcher


class Recorder:
    """run_chunk: squares each item's length-sum; remembers every chunk it saw."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.chunks: list[list] = []
        self.delay_s = delay_s
        self.fail = fail
        self.threads: set[str] = set()

    def __call__(self, items):
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        self.chunks.append(list(items))
        return [sum(item) ** 2 for item in items]


def _histogram_count(hist, label: str) -> float:
    for metric in hist.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("service") == label:
                return sample.value
    return 0.0


async def _with_batcher(name, recorder, coro, **limits):
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    batcher = DynamicBatcher(name, recorder, executor, **limits)
    await batcher.start()
    try:
        return await coro(batcher)
    finally:
        await batcher.close()
        executor.shutdown()


def test_concurrent_requests_are_merged_and_split_back_in_order():
    recorder = Recorder()
    requests = [[[i, j] for j in range(1 + i % 3)] for i in range(10)]  # 1-3 items each

    async def go(batcher):
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    results = asyncio.run(_with_batcher(
        "t-merge", recorder, go, max_batch_size=64, max_queue_delay_us=200_000, micro_batch_size=4
    ))  # fmt: skip
    assert results == [[sum(item) ** 2 for item in r] for r in requests]
    total = sum(len(r) for r in requests)
    # All 10 requests arrived within the delay: one merged batch of 20 items, in chunks of <= 4.
    assert sum(len(c) for c in recorder.chunks) == total
    assert all(len(c) <= 4 for c in recorder.chunks) and len(recorder.chunks) == -(-total // 4)
    assert recorder.threads == {"model_0"}
    assert _histogram_count(metrics.REQUESTS_PER_BATCH, "t-merge") == 1


def test_max_batch_size_caps_a_merged_batch_but_never_splits_a_request():
    recorder = Recorder()
    sizes = [3, 3, 3, 7, 1]

    async def go(batcher):
        return await asyncio.gather(*(batcher.submit([[1]] * n) for n in sizes))

    asyncio.run(
        _with_batcher(
            "t-cap", recorder, go, max_batch_size=5, max_queue_delay_us=200_000, micro_batch_size=100
        )
    )
    # One chunk per merged batch (micro batch 100): 3 | 3 | 3 | 7 (alone, larger than the cap) | 1.
    assert [len(c) for c in recorder.chunks] == [3, 3, 3, 7, 1]


def test_batch_size_one_serves_each_request_alone():
    recorder = Recorder()

    async def go(batcher):
        return await asyncio.gather(*(batcher.submit([[i]]) for i in range(6)))

    results = asyncio.run(
        _with_batcher("t-one", recorder, go, max_batch_size=1, max_queue_delay_us=0, micro_batch_size=8)
    )
    assert results == [[i * i] for i in range(6)]
    assert [len(c) for c in recorder.chunks] == [1] * 6


def test_the_queue_delay_bounds_the_wait_of_a_lone_request():
    recorder = Recorder()

    async def go(batcher):
        start = time.monotonic()
        await batcher.submit([[1]])
        return time.monotonic() - start

    waited = asyncio.run(
        _with_batcher(
            "t-delay", recorder, go, max_batch_size=64, max_queue_delay_us=50_000, micro_batch_size=8
        )
    )
    assert 0.04 <= waited < 1.0


def test_requests_arriving_while_a_batch_runs_form_the_next_batch():
    recorder = Recorder(delay_s=0.2)

    async def go(batcher):
        first = asyncio.create_task(batcher.submit([[1]]))
        await asyncio.sleep(0.05)  # the first batch is running now
        rest = [asyncio.create_task(batcher.submit([[i]])) for i in range(2, 6)]
        return await first, await asyncio.gather(*rest)

    asyncio.run(
        _with_batcher("t-next", recorder, go, max_batch_size=64, max_queue_delay_us=0, micro_batch_size=64)
    )
    assert [len(c) for c in recorder.chunks] == [1, 4]


def test_items_are_sorted_by_length_within_a_batch():
    recorder = Recorder()

    async def go(batcher):
        return await batcher.submit([[1] * 5, [2], [3] * 3])

    result = asyncio.run(
        _with_batcher("t-sort", recorder, go, max_batch_size=64, max_queue_delay_us=0, micro_batch_size=2)
    )
    assert result == [25, 4, 81]
    assert recorder.chunks == [[[2], [3] * 3], [[1] * 5]]


def test_a_cancelled_caller_is_dropped_and_failures_reach_every_caller():
    recorder = Recorder(delay_s=0.2)

    async def go(batcher):
        busy = asyncio.create_task(batcher.submit([[1]]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(batcher.submit([[7, 7]]))
        kept = asyncio.create_task(batcher.submit([[2]]))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await busy, await kept

    assert asyncio.run(
        _with_batcher("t-cancel", recorder, go, max_batch_size=64, max_queue_delay_us=0, micro_batch_size=8)
    ) == ([1], [4])
    assert [[7, 7]] not in recorder.chunks

    async def failing(batcher):
        return await asyncio.gather(batcher.submit([[1]]), batcher.submit([[2]]), return_exceptions=True)

    errors = asyncio.run(
        _with_batcher(
            "t-fail",
            Recorder(fail=True),
            failing,
            max_batch_size=64,
            max_queue_delay_us=100_000,
            micro_batch_size=8,
        )
    )
    assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in errors)


def test_closing_fails_queued_requests_and_refuses_new_ones():
    recorder = Recorder(delay_s=0.3)

    async def go():
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = DynamicBatcher(
            "t-close", recorder, executor, max_batch_size=1, max_queue_delay_us=0, micro_batch_size=1
        )
        await batcher.start()
        running = asyncio.create_task(batcher.submit([[1]]))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(batcher.submit([[2]]))
        await asyncio.sleep(0.01)
        await batcher.close()
        results = await asyncio.gather(running, queued, return_exceptions=True)
        with pytest.raises(Unavailable):
            await batcher.submit([[3]])
        executor.shutdown()
        return results

    running, queued = asyncio.run(go())
    assert isinstance(running, Unavailable) and isinstance(queued, Unavailable)
    assert metrics.QUEUE_DEPTH.labels("t-close")._value.get() == 0  # noqa: SLF001
