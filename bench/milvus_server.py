"""A throwaway Milvus 2.3 standalone server on free loopback ports, for the benchmarks.

Reuses the test suite's launcher (``tests/store_backends.py``: the ``milvus`` package's build, etcd's
client and peer ports chosen free through an etcd config file) and changes two settings: the time tick,
which bounds how long a Strong read waits (docs/scale.md, *Consistency*), and the segment size
(``dataCoord.segment.maxSize``, MB): Milvus searches each sealed segment apart, so fewer, larger segments
cost fewer per-segment rounds per search (docs/scale.md, *Segment size*).

    with milvus_server(Path("/tmp/x"), time_tick_ms=20, segment_mb=4096) as server:
        server.uri   # http://127.0.0.1:PORT
        server.pid   # the milvus process, for its RSS
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class RunningMilvus:
    uri: str
    pid: int
    base: Path
    start_s: float
    time_tick_ms: int
    segment_mb: int


# Milvus 2.3's default dataCoord.segment.maxSize, MB.
DEFAULT_SEGMENT_MB = 512


@contextmanager
def milvus_server(
    base: Path, time_tick_ms: int = 20, segment_mb: int = DEFAULT_SEGMENT_MB, keep: bool = False
) -> Iterator[RunningMilvus]:
    """Start a server with its data under ``base``; always stopped (and ``base`` removed unless ``keep``)."""
    from tests.store_backends import MilvusProcess  # needs pytest importable (a dev install has it)

    process = MilvusProcess(base)
    process.server.config.set("proxy.timeTickInterval", str(time_tick_ms))
    process.server.config.set("dataCoord.segment.maxSize", str(segment_mb))
    started = time.monotonic()
    try:
        try:
            process.start()
        except Exception as exc:
            raise RuntimeError(f"Milvus server did not start: {exc}\n{process.log_tail()}") from exc
        yield RunningMilvus(
            process.uri,
            process.server.server_proc.pid,
            process.base,
            time.monotonic() - started,
            time_tick_ms,
            segment_mb,
        )
    finally:
        process.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
