"""Dynamic batching for the model servers: concurrent requests share forward passes.

    batcher = DynamicBatcher("reward", run_chunk, executor, max_batch_size=64,
                             max_queue_delay_us=2000, micro_batch_size=16)
    await batcher.start()
    rewards = await batcher.submit(sequences)        # from any number of concurrent handlers

Requests wait in a queue. The worker takes the oldest one and then waits for more until the
batch holds `max_batch_size` sequences or the oldest request has waited `max_queue_delay_us`
(Triton's dynamic batcher rule), whichever comes first; a single request larger than
`max_batch_size` runs alone. The merged batch is sorted by length (less padding), run in
`micro_batch_size` chunks by `run_chunk(items) -> results` (one result per item) on the model
thread, and the results are split back into the requests' order. While one batch runs, the next
one fills up.

A request whose caller has gone (client cancelled, deadline passed) before its batch is formed is
dropped. An exception in `run_chunk` fails every request of that batch.

Metrics (`common.metrics`, label = the batcher's name): `aligner_batch_size` per forward chunk,
`aligner_requests_per_batch` per merged batch, `aligner_queue_depth` (sequences waiting),
`aligner_sequences`, `aligner_tokens`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from common import metrics
from common.errors import InvalidArgument, Unavailable
from common.logging import get_logger

log = get_logger(__name__)


@dataclass
class _Request:
    items: Sequence[Any]
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)


def _size(item: Any) -> int:
    try:
        return len(item)
    except TypeError:
        return 1


class DynamicBatcher:
    """Merges concurrent `submit` calls into batches for `run_chunk`. Create, start and use it
    inside one event loop; `run_chunk` runs on `executor` (the process's model thread)."""

    def __init__(
        self,
        name: str,
        run_chunk: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        micro_batch_size: int,
    ):
        for key, value in (
            ("max_batch_size", max_batch_size),
            ("inference_micro_batch_size", micro_batch_size),
        ):
            if value < 1:
                raise InvalidArgument(f"batching.{key}", f"must be >= 1, got {value}")
        if max_queue_delay_us < 0:
            raise InvalidArgument("batching.max_queue_delay_us", f"must be >= 0, got {max_queue_delay_us}")
        self.name = name
        self._run_chunk = run_chunk
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.micro_batch_size = micro_batch_size
        self._queue: deque[_Request] = deque()
        self._queued_items = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False
        self._m_batch = metrics.BATCH_SIZE.labels(name)
        self._m_requests = metrics.REQUESTS_PER_BATCH.labels(name)
        self._m_depth = metrics.QUEUE_DEPTH.labels(name)
        self._m_sequences = metrics.SEQUENCES_PROCESSED.labels(name)
        self._m_tokens = metrics.TOKENS_PROCESSED.labels(name)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._work(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with UNAVAILABLE."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(Unavailable(f"{self.name}: the server is shutting down"))
        self._set_depth(0)

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """Queue `items` (one request) and wait for their results, in order."""
        if self._closed or self._worker is None:
            raise Unavailable(f"{self.name}: the batcher is not running")
        if not items:
            return []
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(items, future))
        self._set_depth(self._queued_items + len(items))
        self._wakeup.set()
        return await future

    # -- worker -----------------------------------------------------------------------------------

    def _set_depth(self, n: int) -> None:
        self._queued_items = n
        self._m_depth.set(n)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Fill the batch until it is full or the oldest request has waited long enough.
            deadline = self._queue[0].arrival + self.max_queue_delay_s
            while self._queued_items < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            items = [item for request in batch for item in request.items]
            self._m_requests.observe(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._run_all, items)
            except asyncio.CancelledError:  # closing: nobody will deliver these results
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(Unavailable(f"{self.name}: the server is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                log.exception("batch failed", batcher=self.name, sequences=len(items))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            start = 0
            for request in batch:
                end = start + len(request.items)
                if not request.future.done():
                    request.future.set_result(results[start:end])
                start = end

    def _take_batch(self) -> list[_Request]:
        """Pop requests (oldest first) up to max_batch_size sequences; the first is always taken.
        Requests whose caller has gone are dropped."""
        batch: list[_Request] = []
        total = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled by its caller
                self._queue.popleft()
                self._set_depth(self._queued_items - len(request.items))
                continue
            if batch and total + len(request.items) > self.max_batch_size:
                break
            self._queue.popleft()
            self._set_depth(self._queued_items - len(request.items))
            batch.append(request)
            total += len(request.items)
        return batch

    def _run_all(self, items: list[Any]) -> list[Any]:
        """On the model thread: sort by length, run the micro-batches, restore the order."""
        order = sorted(range(len(items)), key=lambda i: _size(items[i]))
        results: list[Any] = [None] * len(items)
        for start in range(0, len(order), self.micro_batch_size):
            chunk = order[start : start + self.micro_batch_size]
            outputs = self._run_chunk([items[i] for i in chunk])
            if len(outputs) != len(chunk):
                raise RuntimeError(
                    f"{self.name}: run_chunk returned {len(outputs)} results for {len(chunk)} items"
                )
            for i, output in zip(chunk, outputs, strict=True):
                results[i] = output
            self._m_batch.observe(len(chunk))
            self._m_sequences.inc(len(chunk))
            self._m_tokens.inc(sum(_size(items[i]) for i in chunk))
        return results
