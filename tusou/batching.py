"""Cross-request batching for the model.

Concurrent requests each bring one or a few images. Feeding them to ONNX Runtime one call per request
makes the calls compete for the same cores, so throughput drops under load. Worker threads own the model
instead: each takes whatever is waiting, up to ``max_batch`` items, runs one call, and hands each request
its rows back. A large request is cut into ``max_batch`` pieces so that every worker can take a share.
A lone request waits no extra time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

_Job = tuple[list[Any], "Future[np.ndarray]"]


class Batcher:
    def __init__(
        self,
        fn: Callable[[list[Any]], np.ndarray],
        max_batch: int = 16,
        name: str = "embed",
        workers: int = 1,
    ) -> None:
        self._fn = fn
        self._max_batch = max(1, max_batch)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def __call__(self, items: Sequence[Any]) -> np.ndarray:
        """Run ``fn`` on ``items`` (possibly together with other callers' items); blocks until done."""
        items = list(items)
        futures: list[Future[np.ndarray]] = []
        for start in range(0, len(items), self._max_batch):
            future: Future[np.ndarray] = Future()
            self._queue.put((items[start : start + self._max_batch], future))
            futures.append(future)
        parts = [future.result() for future in futures]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            size = len(job[0])
            # Take what is already waiting; never wait for more (that would only add latency).
            while size < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # leave the stop signal for this worker's next turn
                    break
                jobs.append(more)
                size += len(more[0])
            self._process(jobs)

    def _process(self, jobs: list[_Job]) -> None:
        items = [item for batch, _ in jobs for item in batch]
        try:
            result = self._fn(items)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of the failure
            for _, future in jobs:
                future.set_exception(exc)
            return
        start = 0
        for batch, future in jobs:
            future.set_result(result[start : start + len(batch)])
            start += len(batch)
