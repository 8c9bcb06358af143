"""Cross-request batching for the model.

Concurrent requests each bring one or a few images. Feeding them to ONNX Runtime one call per request
makes the calls compete for the same cores (each call already uses every core), so throughput drops
under load. One worker thread owns the model instead: it takes whatever is waiting, up to ``max_batch``
images, runs one call, and hands each request its rows back. A lone request waits no extra time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np


class Batcher:
    def __init__(
        self, fn: Callable[[list[Any]], np.ndarray], max_batch: int = 16, name: str = "embed"
    ) -> None:
        self._fn = fn
        self._max_batch = max(1, max_batch)
        self._queue: queue.Queue[tuple[list[Any], Future[np.ndarray]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __call__(self, items: Sequence[Any]) -> np.ndarray:
        """Run ``fn`` on ``items`` (possibly together with other callers' items); blocks until done."""
        future: Future[np.ndarray] = Future()
        self._queue.put((list(items), future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

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
                    self._queue.put(None)
                    break
                jobs.append(more)
                size += len(more[0])
            self._process(jobs)

    def _process(self, jobs: list[tuple[list[Any], Future[np.ndarray]]]) -> None:
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
