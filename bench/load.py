"""Load: 200 concurrent clients mixing add, search, list and info against one real server subprocess.

    python -m bench.load [--clients 200] [--duration 30] [--mix add=10,search=20,list=35,info=35]

Starts ``python -m tusou serve`` on a scratch data folder (loopback only), gives every client its own access
key and group (one image each, so searches and listings have something to do), then lets all clients loop
for ``--duration`` seconds, each sending one signed request at a time (asyncio + httpx, one connection per
client). Prints:

* clients held: the most connections the server held open at once (psutil on the server process) and the
  most requests in flight at once on the client side;
* errors (must be 0): any answer other than 200, and any transport error or timeout;
* the server's peak RSS (sampled every 5 ms);
* p50 / p99 / max latency per endpoint; and whether cheap calls (info, list) are starved by the embedding
  work: one more client, the probe, sends an info or a list every 0.2 s during the load, and its p99 is
  held against ``--cheap-p99-ms``. (The 200 load clients loop with no pause, so their own latencies are
  mostly queueing: clients / throughput.)

Exit status 1 on any error or when a cheap call's p99 is over its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.crash import ServeProcess, SignedClient, free_port  # noqa: E402
from tests import imagegen  # noqa: E402
from tusou.api.auth import sign_qiniu  # noqa: E402
from tusou.store.keys import KeyStore  # noqa: E402


class RssSampler:
    """Peak RSS and peak open TCP connections of a process, sampled in a thread."""

    def __init__(self, pid: int, port: int | None = None, every_s: float = 0.005) -> None:
        self.proc = psutil.Process(pid)
        self.port = port
        self.every_s = every_s
        self.peak = self.proc.memory_info().rss
        self.peak_connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                # Counting sockets is slower than reading RSS: every 20th sample is enough.
                if self.port is not None and n % 20 == 0:
                    held = sum(
                        1 for c in self.proc.net_connections(kind="tcp")
                        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
                    )
                    self.peak_connections = max(self.peak_connections, held)
            except psutil.Error:
                return
            n += 1
            time.sleep(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tiny_jpeg_uri(seed: int) -> str:
    out = io.BytesIO()
    imagegen.scene(seed, (64, 48)).save(out, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    clients_served: set[int] = field(default_factory=set)

    record_after: float = 0.0  # monotonic time: requests started earlier are warm-up, not recorded

    def record(self, op: str, seconds: float) -> None:
        if time.monotonic() - seconds >= self.record_after:
            self.latencies.setdefault(op, []).append(seconds)

    def error(self, op: str, what: str) -> None:
        self.errors[op] = self.errors.get(op, 0) + 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{op}: {what[:200]}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def client_loop(
    n: int, base: str, ak: str, sk: str, group: str, images: list[str], mix: list[tuple[str, float]],
    deadline: float, results: Results, seed: int,
) -> None:
    rng = random.Random(seed)
    ops, weights = zip(*mix, strict=True)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as http:
        while time.monotonic() < deadline:
            op = rng.choices(ops, weights)[0]
            if op == "add":
                method, path, body = "POST", f"/v1/image/group/{group}/add", {
                    "data": [{"uri": rng.choice(images), "attribute": {"label": "load"}}]}
            elif op == "search":
                method, path, body = "POST", "/v1/image/groups/search", {
                    "data": {"uri": rng.choice(images)}, "params": {"groups": [group], "limit": 5}}
            elif op == "list":
                method, path, body = "GET", f"/v1/image/group/{group}?" + urlencode({"limit": 50}), None
            else:
                method, path, body = "GET", f"/v1/image/group/{group}/info", None
            raw = b"" if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            headers = sign_qiniu(ak, sk, method, base + path, headers=headers, body=raw)
            results.in_flight += 1
            results.peak_in_flight = max(results.peak_in_flight, results.in_flight)
            started = time.monotonic()
            try:
                resp = await http.request(method, path, content=raw or None, headers=headers)
            except httpx.HTTPError as exc:
                results.error(op, f"{type(exc).__name__}: {exc}")
                continue
            finally:
                results.in_flight -= 1
            results.record(op, time.monotonic() - started)
            if resp.status_code != 200:
                results.error(op, f"{resp.status_code} {resp.text}")
            else:
                results.clients_served.add(n)


async def probe_loop(base: str, ak: str, sk: str, group: str, deadline: float, results: Results,
                     every_s: float) -> None:
    """One interactive client: an info or a list every ``every_s``, timed apart from the load.

    Closed-loop clients with no think time measure queueing (latency = clients / throughput) for every
    call alike; this probe asks the question that matters to a user: while the server is busy embedding,
    does a cheap call still come back quickly?
    """
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        n = 0
        while time.monotonic() < deadline:
            op = "info" if n % 2 == 0 else "list"
            n += 1
            path = f"/v1/image/group/{group}/info" if op == "info" else f"/v1/image/group/{group}?limit=50"
            headers = sign_qiniu(ak, sk, "GET", base + path)
            started = time.monotonic()
            try:
                resp = await http.get(path, headers=headers)
            except httpx.HTTPError as exc:
                results.error("probe-" + op, f"{type(exc).__name__}: {exc}")
                continue
            results.record("probe-" + op, time.monotonic() - started)
            if resp.status_code != 200:
                results.error("probe-" + op, f"{resp.status_code} {resp.text}")
            await asyncio.sleep(max(0.0, every_s - (time.monotonic() - started)))


def parse_mix(text: str) -> list[tuple[str, float]]:
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in ("add", "search", "list", "info"):
            raise SystemExit(f"unknown op {name!r} in --mix")
        mix.append((name, float(weight)))
    return mix


def setup(data: Path, server: ServeProcess, clients: int, images: list[str]) -> list[tuple[str, str, str]]:
    """One key and one group (with one image) per client (the last one for the probe)."""
    store = KeyStore(data / "keys.db")
    try:
        keys = [store.create(f"load-{i}") for i in range(clients + 1)]
    finally:
        store.close()
    out = []
    for i, key in enumerate(keys):
        group = f"load{i}"
        client = SignedClient(server.url, key.access_key, key.secret_key)
        resp = client.post(f"/v1/image/group/{group}/new", {"data": [{"uri": images[i % len(images)]}]})
        if resp.status_code != 200:
            raise RuntimeError(f"setup failed: {resp.status_code} {resp.text}")
        out.append((key.access_key, key.secret_key, group))
    return out


def run(clients: int = 200, duration: float = 30.0, mix: str = "add=10,search=20,list=35,info=35",
        seed: int = 1, env: dict[str, str] | None = None, echo: bool = True, warmup: float = 3.0
        ) -> dict[str, Any]:
    images = [tiny_jpeg_uri(s) for s in range(40)]
    with tempfile.TemporaryDirectory(prefix="tusou-load-") as tmp:
        data = Path(tmp) / "data"
        server = ServeProcess(data, free_port(), Path(tmp) / "serve.log", env=env)
        try:
            server.wait_ready()
            if echo:
                print(f"setting up {clients} keys and groups ...", flush=True)
            *tenants, probe = setup(data, server, clients, images)
            results = Results()
            with RssSampler(server.proc.pid, server.port) as sampler:
                baseline = sampler.peak
                started = time.monotonic()
                # The first seconds are the 200 clients' simultaneous first requests: a start-up burst,
                # not the steady state the latencies should describe. Errors are counted throughout.
                results.record_after = started + warmup
                deadline = started + warmup + duration

                async def main() -> None:
                    await asyncio.gather(
                        probe_loop(server.url, *probe, deadline, results, 0.2),
                        *(
                            client_loop(i, server.url, ak, sk, group, images, parse_mix(mix), deadline,
                                        results, seed * 1000 + i)
                            for i, (ak, sk, group) in enumerate(tenants)
                        ),
                    )

                asyncio.run(main())
                elapsed = time.monotonic() - results.record_after
            alive = server.proc.poll() is None
        finally:
            server.stop()
    per_op = {
        op: {
            "count": len(v),
            "p50_ms": percentile(v, 50) * 1000,
            "p99_ms": percentile(v, 99) * 1000,
            "max_ms": max(v) * 1000,
            "mean_ms": statistics.fmean(v) * 1000,
        }
        for op, v in sorted(results.latencies.items())
    }
    return {
        "clients": clients,
        "clients_served": len(results.clients_served),
        "peak_in_flight": results.peak_in_flight,
        "peak_server_connections": sampler.peak_connections,
        "errors": sum(results.errors.values()),
        "errors_by_op": results.errors,
        "error_samples": results.error_samples,
        "rss_baseline_mib": baseline / 2**20,
        "rss_peak_mib": sampler.peak / 2**20,
        "elapsed_s": elapsed,
        "requests": sum(len(v) for v in results.latencies.values()),
        "per_op": per_op,
        "server_alive": alive,
    }


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--mix", default="add=10,search=20,list=35,info=35")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="Seconds of load before latencies are recorded (added to --duration).")
    parser.add_argument("--cheap-p99-ms", type=float, default=1000.0,
                        help="Bound on the probe's info/list p99: above it cheap calls count as starved.")
    args = parser.parse_args()
    out = run(args.clients, args.duration, args.mix, args.seed, warmup=args.warmup)
    print()
    print(f"clients:                {out['clients']} (each served at least once: {out['clients_served']})")
    print(f"clients held:           {out['peak_server_connections']} connections open at the server at once, "
          f"{out['peak_in_flight']} requests in flight at once")
    print(f"requests recorded:      {out['requests']} in {out['elapsed_s']:.1f} s "
          f"({out['requests'] / out['elapsed_s']:.0f}/s)")
    print(f"errors:                 {out['errors']} {out['errors_by_op'] or ''}")
    for sample in out["error_samples"]:
        print("   ", sample)
    print(f"server RSS:             {out['rss_baseline_mib']:.0f} MiB after setup, "
          f"peak {out['rss_peak_mib']:.0f} MiB")
    print(f"{'endpoint':<10}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for op, s in out["per_op"].items():
        print(f"{op:<10}{s['count']:>8}{s['p50_ms']:>10.0f}{s['p99_ms']:>10.0f}{s['max_ms']:>10.0f}")
    cheap = {op: out["per_op"][op]["p99_ms"] for op in ("probe-info", "probe-list") if op in out["per_op"]}
    starved = {op: p99 for op, p99 in cheap.items() if p99 > args.cheap_p99_ms}
    verdict = "STARVED" if starved else "ok"
    print(f"probe p99 (cheap calls from one more client, one every 0.2 s, during the load): "
          f"{', '.join(f'{k} {v:.0f} ms' for k, v in cheap.items())} "
          f"(bound {args.cheap_p99_ms:.0f} ms): {verdict}")
    ok = (out["errors"] == 0 and not starved and out["server_alive"]
          and out["clients_served"] == out["clients"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
