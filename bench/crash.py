"""Crash safety: concurrent writes, ``kill -9`` at random moments, restart, and check nothing was lost.

    python -m bench.crash [--kills 20] [--workers 4] [--seed 1] [--min-acks 5] [--min-run 0] [--max-run 2]

Runs the real ``python -m tusou serve`` as a subprocess on a scratch data folder (loopback only), drives
``new`` / ``add`` / ``delete`` / ``remove`` from several threads with signed requests, SIGKILLs the server at
a random moment while requests are in flight (once a few writes of the round were acknowledged), restarts it
on the same folder and checks, before the next round starts:

* every acknowledged write is there: an acknowledged image is listed, counted, has its label/desc and is
  found by a search with the very same image (top hit, high score); an acknowledged group exists;
* acknowledged deletes and removals never come back;
* nothing unacknowledged is half there: every listed image is searchable and every search hit is listed,
  a group's ``info`` count equals its listing, a ``new`` is all or nothing (the group exists iff its first
  images do), and nothing appears that was never sent.

Writes whose answer was lost (the kill cut the connection) are "uncertain": either outcome is fine, but it
must be a whole one; after the check the model adopts what the server shows.

Prints kills survived, acknowledged writes checked and lost (must be 0). Exits 1 on any violation.
``tests/test_crash.py`` runs a short version of the same harness.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `tusou` and `tests.imagegen` importable
    sys.path.insert(0, str(ROOT))

from tests import imagegen  # noqa: E402
from tusou.api.auth import sign_qiniu  # noqa: E402

# A copy of an image found by searching with the same bytes scores this or more whatever the calibration
# (identical vectors have cosine 1); the check is about presence, not about score quality.
SAME_IMAGE_MIN_SCORE = 0.9


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """``python -m tusou serve`` on loopback; its stdout and stderr go to ``log`` (read back by tests)."""

    def __init__(self, data: Path, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.data, self.port, self.log = data, port, log
        full_env = dict(os.environ, TUSOU_DATA=str(data), TUSOU_PORT=str(port), TUSOU_HOST="127.0.0.1")
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self._log_file = open(log, "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tusou", "serve"],
            cwd=ROOT,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-2000:]
                raise RuntimeError(f"tusou serve exited ({self.proc.returncode}): {tail}")
            try:
                # Unsigned: a 401 proves the app (not just the socket) is up.
                if requests.get(self.url + "/v1/image/group", timeout=2).status_code == 401:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("tusou serve did not answer")

    def first_key(self) -> tuple[str, str]:
        """The key a first start prints as one JSON line."""
        for line in self.log.read_text().splitlines():
            if line.startswith("{") and "secret_key" in line:
                key = json.loads(line)
                return key["access_key"], key["secret_key"]
        raise RuntimeError("no access key printed on first start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log_file.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


class SignedClient:
    """Signed JSON calls with ``requests`` and tusou's own ``sign_qiniu`` (no SDK needed)."""

    def __init__(self, base: str, access_key: str, secret_key: str, timeout: float = 60) -> None:
        self.base, self.ak, self.sk, self.timeout = base, access_key, secret_key, timeout
        self.session = requests.Session()

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> requests.Response:
        url = self.base + quote(path, safe="/")
        if params:
            url += "?" + urlencode(params)
        raw = b"" if body is None else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        hdrs = sign_qiniu(self.ak, self.sk, method, url, headers=hdrs, body=raw)
        return self.session.request(method, url, data=raw or None, headers=hdrs, timeout=self.timeout)

    def post(self, path: str, body: Any = None) -> requests.Response:
        return self.request("POST", path, body)

    def get(self, path: str, params: dict[str, Any] | None = None) -> requests.Response:
        return self.request("GET", path, params=params)


def image_uri(seed: int, size: int = 96) -> str:
    """A small distinct scene as a JPEG data uri (small keeps decoding cheap; the model input is fixed)."""
    out = io.BytesIO()
    imagegen.scene(seed, (size, size * 3 // 4)).save(out, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


# --- the model of what the server acknowledged ------------------------------------------------------------
@dataclass
class GroupModel:
    present: dict[str, int] = field(default_factory=dict)  # acknowledged image id -> image seed
    deleted: set[str] = field(default_factory=set)  # acknowledged deletes: must never come back
    absent: set[str] = field(default_factory=set)  # uncertain writes seen not to have happened: ditto
    maybe_present: dict[str, int] = field(default_factory=dict)  # add/new/delete whose answer was lost
    created: bool = False  # acknowledged `new`
    maybe_created: bool = False  # `new` whose answer was lost
    initial: dict[str, int] = field(default_factory=dict)  # images sent with `new` (all or nothing)
    removed: bool = False
    maybe_removed: bool = False
    checked_deep: set[str] = field(default_factory=set)  # ids already found by search after a restart


@dataclass
class Stats:
    kills: int = 0
    acked_writes: int = 0  # acknowledged add/new images, deletes and removals
    checked: int = 0  # acknowledged facts verified after restarts
    lost: int = 0  # acknowledged facts that were not there
    uncertain: int = 0  # writes whose answer the kill cut
    violations: list[str] = field(default_factory=list)
    requests: int = 0


class Harness:
    def __init__(self, data: Path, workers: int = 4, seed: int = 1, log: Path | None = None,
                 batch_max: int = 3, sample: int = 40, min_acks: int = 5) -> None:
        self.min_acks = min_acks
        self.sample = sample
        self._full = True
        self._sample: set[tuple[str, str]] = set()
        self.data = data
        self.port = free_port()
        self.log = log or data.parent / "serve.log"
        self.workers = workers
        self.rng = random.Random(seed)
        self.batch_max = batch_max
        self.groups: dict[str, GroupModel] = {}
        self.lock = threading.Lock()  # guards groups, stats and the id counter
        self.stats = Stats()
        self._next = 0
        self.server: ServeProcess | None = None
        self.ak = self.sk = ""

    # --- process control -------------------------------------------------------------------------------
    def start(self) -> None:
        # No rate limit: the checks after a restart send hundreds of quick calls with one key.
        self.server = ServeProcess(self.data, self.port, self.log, env={"TUSOU_RATE_LIMIT_PER_S": "0"})
        self.server.wait_ready()
        if not self.ak:
            self.ak, self.sk = self.server.first_key()

    def client(self) -> SignedClient:
        assert self.server is not None
        # A short timeout would turn slow acks into "uncertain"; keep it generous.
        return SignedClient(self.server.url, self.ak, self.sk, timeout=120)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    def fresh_id(self) -> int:
        with self.lock:
            self._next += 1
            return self._next

    # --- one worker ------------------------------------------------------------------------------------
    def _worker(self, wid: int, stop: threading.Event, rng: random.Random) -> None:
        client = self.client()
        mine = [name for name in self.groups if name.startswith(f"w{wid}-")]
        while not stop.is_set():
            with self.lock:
                live = [g for g in mine if self.groups[g].created and not self.groups[g].maybe_removed
                        and not self.groups[g].removed]
            op = rng.random()
            try:
                if not live or op < 0.12:
                    name = f"w{wid}-g{self.fresh_id()}"
                    mine.append(name)
                    self._new(client, name, rng)
                elif op < 0.65:
                    self._add(client, rng.choice(live), rng)
                elif op < 0.93:
                    self._delete(client, rng.choice(live), rng)
                elif len(live) > 1:
                    self._remove(client, rng.choice(live))
            except requests.RequestException:
                return  # the server is gone; the op already marked itself uncertain

    def _post(self, client: SignedClient, path: str, body: Any = None) -> requests.Response:
        """One write; a request the kill cut off counts as uncertain (either outcome, but whole)."""
        try:
            resp = client.post(path, body)
        except requests.RequestException:
            with self.lock:
                self.stats.uncertain += 1
            raise
        self._count_request()
        return resp

    def _entries(self, rng: random.Random, n: int) -> list[tuple[str, int, dict[str, Any]]]:
        out = []
        for _ in range(n):
            seed = self.fresh_id()
            image_id = f"i{seed}"
            body = {"uri": image_uri(seed), "attribute": {"id": image_id, "label": f"l{seed}",
                                                           "desc": {"seed": seed}}}
            out.append((image_id, seed, body))
        return out

    def _count_request(self) -> None:
        with self.lock:
            self.stats.requests += 1

    def _new(self, client: SignedClient, name: str, rng: random.Random) -> None:
        entries = self._entries(rng, rng.randint(0, self.batch_max))
        with self.lock:
            self.groups[name] = GroupModel(maybe_created=True, initial={i: s for i, s, _ in entries})
        resp = self._post(client, f"/v1/image/group/{name}/new", {"data": [e for _, _, e in entries]})
        with self.lock:
            model = self.groups[name]
            self._expect(resp.status_code == 200, f"new {name}: {resp.status_code} {resp.text[:200]}")
            if resp.status_code != 200:
                return
            body = resp.json()
            self._expect(body["images"] == [i for i, _, _ in entries], f"new {name}: {body}")
            model.created, model.maybe_created = True, False
            model.present.update(model.initial)
            self.stats.acked_writes += 1 + len(entries)

    def _add(self, client: SignedClient, name: str, rng: random.Random) -> None:
        entries = self._entries(rng, rng.randint(1, self.batch_max))
        with self.lock:
            self.groups[name].maybe_present.update({i: s for i, s, _ in entries})
        resp = self._post(client, f"/v1/image/group/{name}/add", {"data": [e for _, _, e in entries]})
        with self.lock:
            model = self.groups[name]
            self._expect(resp.status_code == 200, f"add {name}: {resp.status_code} {resp.text[:200]}")
            if resp.status_code != 200:
                return
            body = resp.json()
            self._expect(body["images"] == [i for i, _, _ in entries], f"add {name}: {body}")
            for image_id, seed, _ in entries:
                if body["images"] and image_id in body["images"]:
                    model.maybe_present.pop(image_id, None)
                    model.present[image_id] = seed
                    self.stats.acked_writes += 1

    def _delete(self, client: SignedClient, name: str, rng: random.Random) -> None:
        with self.lock:
            model = self.groups[name]
            if not model.present:
                return
            victims = rng.sample(sorted(model.present), min(len(model.present), rng.randint(1, 2)))
            for v in victims:
                model.maybe_present[v] = model.present.pop(v)
        resp = self._post(client, f"/v1/image/group/{name}/delete", {"images": victims})
        with self.lock:
            self._expect(resp.status_code == 200, f"delete {name}: {resp.status_code} {resp.text[:200]}")
            if resp.status_code == 200:
                for v in victims:
                    model.maybe_present.pop(v, None)
                    model.deleted.add(v)
                    self.stats.acked_writes += 1

    def _remove(self, client: SignedClient, name: str) -> None:
        with self.lock:
            self.groups[name].maybe_removed = True
        resp = self._post(client, f"/v1/image/group/{name}/remove")
        with self.lock:
            self._expect(resp.status_code == 200, f"remove {name}: {resp.status_code} {resp.text[:200]}")
            if resp.status_code == 200:
                model = self.groups[name]
                model.removed, model.maybe_removed = True, False
                self.stats.acked_writes += 1

    def _expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.stats.violations.append(what)

    # --- rounds ----------------------------------------------------------------------------------------
    def round(self, run_s: float, full: bool = True) -> None:
        """Writers run for ``run_s`` seconds, then the server is SIGKILLed under them and restarted."""
        assert self.server is not None
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._worker, args=(w, stop, random.Random(self.rng.random())),
                             daemon=True)
            for w in range(self.workers)
        ]
        before = self.stats.acked_writes
        for t in threads:
            t.start()
        # Some writes must be acknowledged in every round, however slow a loaded machine is, or the round
        # proves nothing; then the kill comes at a random moment after that.
        give_up = time.monotonic() + 60
        while self.stats.acked_writes < before + self.min_acks and time.monotonic() < give_up:
            time.sleep(0.02)
        time.sleep(run_s)
        self.server.kill()  # while requests are in flight: that is the point
        stop.set()
        for t in threads:
            t.join(timeout=150)
        self.stats.kills += 1
        self.start()
        self.verify(full)

    def verify(self, full: bool = True) -> None:
        """Check every group against the model; then adopt what the server shows for uncertain writes.

        Presence in the listing, counts and deletes are checked for every image every time. The search and
        ``image`` checks cost a model call each, so unless ``full`` they run for the images not yet
        searched after a restart plus a random sample of the others (the last round is always full).
        """
        self._full = full
        with self.lock:
            older = sorted((g, i) for g, m in self.groups.items() for i in m.checked_deep & set(m.present))
        self._sample = set(self.rng.sample(older, min(len(older), self.sample)))
        client = self.client()
        listed_groups = client.get("/v1/image/group").json()["result"]
        with self.lock:
            groups = dict(self.groups)
        stray = set(listed_groups) - set(groups)
        self._expect(not stray, f"groups never created: {sorted(stray)}")
        for name, model in groups.items():
            exists = name in listed_groups
            if model.removed:
                self.stats.checked += 1
                if exists:
                    self.stats.lost += 1
                    self._expect(False, f"removed group {name} came back")
                continue
            if model.created and not model.maybe_removed:
                self.stats.checked += 1
                if not exists:
                    self.stats.lost += 1
                    self._expect(False, f"acknowledged group {name} is gone")
                    continue
            if not exists:
                info = client.get(f"/v1/image/group/{name}/info")
                self._expect(info.status_code == 400, f"unlisted {name} answers info {info.status_code}")
                if model.maybe_created:  # the lost `new` did not happen; nothing of it may exist
                    model.maybe_created = False
                    model.removed = True  # never used again
                elif model.maybe_removed:
                    model.maybe_removed, model.removed = False, True
                continue
            self._verify_group(client, name, model)

    def _verify_group(self, client: SignedClient, name: str, model: GroupModel) -> None:
        listed: list[str] = []
        marker = ""
        while True:
            params = {"limit": 1000}
            if marker:
                params["marker"] = marker
            page = client.get(f"/v1/image/group/{name}", params)
            self._expect(page.status_code == 200, f"list {name}: {page.status_code}")
            body = page.json()
            listed += [r["id"] for r in body["result"]]
            marker = body["marker"]
            if not marker:
                break
        listed_set = set(listed)
        self._expect(len(listed) == len(listed_set), f"{name}: duplicate ids listed")
        count = client.get(f"/v1/image/group/{name}/info").json()["count"]
        self._expect(count == len(listed), f"{name}: info count {count} != {len(listed)} listed")

        if model.maybe_created:
            # `new` is one transaction: the group exists, so all of its first images must too.
            missing = set(model.initial) - listed_set
            self._expect(not missing, f"{name}: half a `new`: group exists without {sorted(missing)}")
            model.created, model.maybe_created = True, False
            model.present.update({i: s for i, s in model.initial.items() if i in listed_set})
            for i in model.initial:
                model.maybe_present.pop(i, None)
        model.maybe_removed = False  # it is still there: the lost remove did not happen

        known = set(model.present) | set(model.maybe_present)
        ghosts = listed_set - known
        self._expect(not ghosts, f"{name}: listed ids never sent or already deleted: {sorted(ghosts)[:5]}")
        self.stats.checked += len(model.deleted)
        back = listed_set & (model.deleted | model.absent)
        if back:
            self.stats.lost += len(back)
            self._expect(False, f"{name}: deleted images came back: {sorted(back)}")

        for image_id, seed in sorted(model.present.items()):
            self.stats.checked += 1
            if image_id not in listed_set:
                self.stats.lost += 1
                self._expect(False, f"{name}: acknowledged image {image_id} is not listed")
                continue
            if image_id in model.checked_deep and not self._full and (name, image_id) not in self._sample:
                continue
            model.checked_deep.add(image_id)
            ok = self._findable(client, name, image_id, seed, expect=True)
            if ok:
                info = client.post(f"/v1/image/group/{name}/image", {"id": image_id})
                ok = info.status_code == 200 and info.json() == {"desc": {"seed": seed}, "label": f"l{seed}"}
            if not ok:
                self.stats.lost += 1
                self._expect(False, f"{name}: acknowledged image {image_id} lost or incomplete")
        for image_id, seed in sorted(model.maybe_present.items()):
            there = image_id in listed_set
            # Listed iff searchable: an uncertain image is either fully there or not at all.
            self._findable(client, name, image_id, seed, expect=there)
            if there:
                model.present[image_id] = seed
            else:
                model.absent.add(image_id)  # gone for good; it must never show up later
        model.maybe_present.clear()

    def _findable(self, client: SignedClient, name: str, image_id: str, seed: int, expect: bool) -> bool:
        body = {"data": {"uri": image_uri(seed)}, "params": {"groups": [name], "limit": 5}}
        resp = client.post("/v1/image/groups/search", body)
        if resp.status_code != 200:
            self._expect(False, f"search {name}: {resp.status_code} {resp.text[:200]}")
            return False
        hits = resp.json()["result"]
        ids = [h["id"] for h in hits]
        if expect:
            top = hits[0]["score"] if hits else 0.0
            mine = next((h["score"] for h in hits if h["id"] == image_id), None)
            # Top or tied with it: a near-identical scene may tie, never beat, an exact copy.
            found = mine is not None and mine >= SAME_IMAGE_MIN_SCORE and mine >= top - 1e-4
            self._expect(found, f"{name}: listed {image_id} not found by its own image: {hits[:2]}")
            return found
        self._expect(image_id not in ids, f"{name}: unlisted {image_id} is searchable (half-written)")
        return image_id not in ids


def run(kills: int, workers: int, seed: int, min_run: float, max_run: float, data: Path | None = None,
        batch_max: int = 3, echo: bool = True, min_acks: int = 5) -> Stats:
    with tempfile.TemporaryDirectory(prefix="tusou-crash-") as tmp:
        folder = data or Path(tmp) / "data"
        harness = Harness(folder, workers=workers, seed=seed, log=Path(tmp) / "serve.log",
                          batch_max=batch_max, min_acks=min_acks)
        harness.start()
        shown = 0
        try:
            for n in range(kills):
                harness.round(harness.rng.uniform(min_run, max_run), full=n == kills - 1)
                if echo:
                    s = harness.stats
                    for v in s.violations[shown:]:
                        print("  violation:", v[:300], flush=True)
                    shown = len(s.violations)
                    print(f"kill {n + 1}/{kills}: acked writes {s.acked_writes}, checked {s.checked}, "
                          f"lost {s.lost}, uncertain {s.uncertain}, violations {len(s.violations)}",
                          flush=True)
        finally:
            harness.close()
        return harness.stats


def main() -> None:
    # SIGTERM (an impatient user, a CI timeout) must still stop the server subprocess in the finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-run", type=float, default=0.0,
                        help="Least seconds of writes before a kill, after the round's first acks.")
    parser.add_argument("--max-run", type=float, default=2.0, help="Most seconds of the same.")
    parser.add_argument("--min-acks", type=int, default=5, help="Acknowledged writes a round needs first.")
    parser.add_argument("--batch-max", type=int, default=3, help="Most images in one new/add request.")
    args = parser.parse_args()
    started = time.monotonic()
    stats = run(args.kills, args.workers, args.seed, args.min_run, args.max_run, batch_max=args.batch_max,
                min_acks=args.min_acks)
    print()
    print(f"kills survived:            {stats.kills}")
    print(f"write requests answered:   {stats.requests}")
    print(f"acknowledged writes:       {stats.acked_writes}")
    print(f"uncertain (answer cut):    {stats.uncertain}")
    print(f"acknowledged facts checked:{stats.checked:>6}")
    print(f"acknowledged writes lost:  {stats.lost}")
    print(f"invariant violations:      {len(stats.violations)}")
    for v in stats.violations[:20]:
        print("  -", v)
    print(f"time: {time.monotonic() - started:.0f} s")
    sys.exit(1 if stats.lost or stats.violations else 0)


if __name__ == "__main__":
    main()
