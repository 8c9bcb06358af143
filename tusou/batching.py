"""Work shared by tenants, served in turn: cross-request batching for the model and a fair thread pool.

Concurrent requests each bring one or a few images. Feeding them to ONNX Runtime one call per request
makes the calls compete for the same cores, so throughput drops under load. Worker threads own the model
instead (:class:`Batcher`): each takes whatever is waiting, up to ``max_batch`` items, runs one call, and
hands each request its rows back. A lone request waits no extra time.

Both queues here are per tenant (access key) and served round-robin: a worker takes the next job of the
next tenant that has one, so one tenant's thousand images or forty slow downloads delay another tenant by
at most one job per worker, never by the whole backlog. :class:`FairPool` also caps how many jobs of one
tenant run at once (downloads: a tenant whose URLs dribble a byte a second holds only its own share of
the download threads).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


class _Turns(Generic[T]):
    """Per-tenant FIFO queues and the order tenants take turns in. Not thread-safe: callers hold a lock."""

    def __init__(self) -> None:
        self._jobs: dict[str, deque[T]] = {}
        self._order: deque[str] = deque()  # tenants with queued jobs, next turn first

    def put(self, tenant: str, job: T) -> None:
        queue = self._jobs.get(tenant)
        if queue is None:
            queue = self._jobs[tenant] = deque()
            self._order.append(tenant)
        queue.append(job)

    def take(self, eligible: Callable[[str], bool] = lambda _t: True) -> tuple[str, T] | None:
        """The next job of the first eligible tenant in turn; that tenant goes to the back of the line."""
        for _ in range(len(self._order)):
            tenant = self._order[0]
            self._order.rotate(-1)
            if not eligible(tenant):
                continue
            queue = self._jobs[tenant]
            job = queue.popleft()
            if not queue:
                del self._jobs[tenant]
                self._order.remove(tenant)
            return tenant, job
        return None

    def __len__(self) -> int:
        return len(self._order)


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
        self._cond = threading.Condition()
        self._turns: _Turns[_Job] = _Turns()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def __call__(self, items: Sequence[Any], tenant: str = "") -> np.ndarray:
        """Run ``fn`` on ``items`` (possibly together with other callers' items); blocks until done.

        A large call is cut into ``max_batch`` pieces, queued as ``tenant``'s jobs, so that every worker can
        take a share and other tenants' jobs interleave with them.
        """
        items = list(items)
        futures: list[Future[np.ndarray]] = []
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher closed")
            for start in range(0, len(items), self._max_batch):
                future: Future[np.ndarray] = Future()
                self._turns.put(tenant, (items[start : start + self._max_batch], future))
                futures.append(future)
            self._cond.notify(len(futures))
        parts = [future.result() for future in futures]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not len(self._turns) and not self._closed:
                    self._cond.wait()
                if not len(self._turns):
                    return
                jobs: list[_Job] = []
                size = 0
                # Take what is already waiting, tenants in turn; never wait for more (only adds latency).
                while size < self._max_batch:
                    taken = self._turns.take()
                    if taken is None:
                        break
                    jobs.append(taken[1])
                    size += len(taken[1][0])
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


class FairPool:
    """A thread pool shared by tenants: queued jobs are started tenants in turn, and at most ``per_tenant``
    jobs of one tenant run at once (the rest wait in that tenant's own queue, delaying nobody else)."""

    def __init__(self, workers: int, per_tenant: int, name: str) -> None:
        self.per_tenant = max(1, per_tenant)
        self._cond = threading.Condition()
        self._turns: _Turns[tuple[Callable[[], Any], Future[Any]]] = _Turns()
        self._running: dict[str, int] = {}
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, tenant: str, fn: Callable[[], R]) -> Future[R]:
        future: Future[R] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("pool closed")
            self._turns.put(tenant, (fn, future))
            self._cond.notify()
        return future

    def run(self, tenant: str, fn: Callable[[], R]) -> R:
        """``fn()`` on a pool thread, in ``tenant``'s turn; blocks until done."""
        return self.submit(tenant, fn).result()

    def running(self, tenant: str) -> int:
        with self._cond:
            return self._running.get(tenant, 0)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while True:  # whoever still waits hears that nothing will run
                taken = self._turns.take()
                if taken is None:
                    break
                taken[1][1].cancel()
            self._cond.notify_all()

    def _eligible(self, tenant: str) -> bool:
        return self._running.get(tenant, 0) < self.per_tenant

    def _run(self) -> None:
        while True:
            with self._cond:
                taken = self._turns.take(self._eligible)
                while taken is None and not self._closed:
                    self._cond.wait()
                    taken = self._turns.take(self._eligible)
                if taken is None:
                    return
                tenant, (fn, future) = taken
                self._running[tenant] = self._running.get(tenant, 0) + 1
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - the caller gets it from the future
                        future.set_exception(exc)
            finally:
                with self._cond:
                    left = self._running[tenant] - 1
                    if left:
                        self._running[tenant] = left
                    else:
                        del self._running[tenant]
                    # A tenant's job may have been waiting for this slot only: every idle worker looks again.
                    self._cond.notify_all()
