"""Pytest plugin for the store backends: a real Milvus server for the session, and a per-backend tally.

Loaded by the test modules that need it (``pytest_plugins = ["tests.store_backends"]``).

The server is the ``milvus`` package's standalone build (embedded etcd + rocksmq) on loopback, with its
data in a temporary folder. Its ports are free ones, including etcd's peer port (fixed at 2380 unless an
etcd config file says otherwise), so two test runs on one machine do not collide. If it cannot start,
its tests are skipped with the reason; with ``TUSOU_REQUIRE_MILVUS=1`` (CI) they fail instead.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# proxy.timeTickInterval for the test server: Strong reads wait up to about two ticks (see docs/scale.md).
TEST_TIME_TICK_MS = 20

_tally: Counter[tuple[str, str]] = Counter()
_server_note: list[str] = []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MilvusProcess:
    """A Milvus standalone server in its own folder; ``uri`` once started."""

    def __init__(self, base: Path) -> None:
        from milvus import MilvusServer

        self.base = base.resolve()
        client_port, peer_port = _free_port(), _free_port()
        etcd_config = self.base / "etcd.yaml"
        self.base.mkdir(parents=True, exist_ok=True)
        etcd_config.write_text(
            "name: default\n"
            f"data-dir: {self.base}/data/etcd.data\n"
            f"listen-client-urls: http://127.0.0.1:{client_port}\n"
            f"advertise-client-urls: http://127.0.0.1:{client_port}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer_port}\n"
        )
        # Milvus reads ETCD_CONFIG_PATH (etcd.config.path); the package's template has no such key.
        os.environ["ETCD_CONFIG_PATH"] = str(etcd_config)
        self.server = MilvusServer(etcd_port=client_port, proxy_port=_free_port())
        self.server.set_base_dir(str(self.base))
        self.server.config.set("proxy.timeTickInterval", str(TEST_TIME_TICK_MS))

    def start(self) -> None:
        try:
            self.server.start()
        finally:
            os.environ.pop("ETCD_CONFIG_PATH", None)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.listen_port}"

    def log_tail(self) -> str:
        path = self.base / "logs" / "milvus-stderr.log"
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.server.stop()


def _unavailable(reason: str) -> None:
    _server_note.append(reason)
    print(f"\n[store_backends] Milvus server unavailable: {reason}")
    if os.environ.get("TUSOU_REQUIRE_MILVUS") == "1":
        pytest.fail(f"Milvus server required (TUSOU_REQUIRE_MILVUS=1) but unavailable: {reason}")
    pytest.skip(f"Milvus server unavailable: {reason}")


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusProcess]:
    """A real Milvus 2.3 server on loopback for the whole session."""
    if _server_note:
        _unavailable(_server_note[0])
    try:
        import milvus  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError as exc:
        _unavailable(f"{exc.name} is not installed (pip install milvus==2.3.5 pymilvus setuptools<81)")
    process = MilvusProcess(tmp_path_factory.mktemp("milvus"))
    started = time.monotonic()
    try:
        process.start()
    except Exception as exc:  # noqa: BLE001 (any failure to start is a reason to skip, shown as such)
        process.stop()
        _unavailable(f"{type(exc).__name__}: {exc}\n{process.log_tail()}")
    _server_note.append(f"started in {time.monotonic() - started:.1f} s at {process.uri}")
    yield process
    process.stop()


def _backend_of(item_id: str) -> str | None:
    if "test_milvus_http.py" in item_id:
        return "server"
    match = re.search(r"\[(sqlite|lite|server)\b", item_id)
    return match.group(1) if match else None


def pytest_runtest_logreport(report: Any) -> None:
    backend = _backend_of(report.nodeid)
    if backend is None:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _tally[(backend, report.outcome)] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _tally:
        return
    terminalreporter.section("store backends")
    for backend in ("sqlite", "lite", "server"):
        counts = {outcome: n for (name, outcome), n in _tally.items() if name == backend}
        if counts:
            text = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
            terminalreporter.write_line(f"{backend:>7}: {text}")
    for note in _server_note:
        terminalreporter.write_line(f" milvus server: {note.splitlines()[0]}")
