"""HTTP ingest speed: ``/v1/image/group/<g>/add`` with 640x480 JPEGs as data URIs, as a client sends them.

    python bench/ingest.py [--n 128] [--batches 1,32] [--precision fp32,int8] [--sizes 0,192]
                           [--verify on,off]

For each (precision, input size (TUSOU_MODEL_INPUT_SIZE; 0: the model's own), verification) a fresh
server (``python -m tusou serve``, default settings otherwise: thumbnails and automatic tags on) is
started on an empty data folder, one group is created and the images are added in requests of each
batch size; the first request of each round is a warm-up and is not timed. Prints img/s (wall) and the
server's CPU milliseconds per image (user + system, from /proc: the figure to compare between runs on a
busy machine), with the load average beside each row.

Images: 640x480 JPEGs (quality 90) cut from the photos under ~/.cache/tusou-eval/out when present, else
generated scenes (bench/embed_speed.py's synthetic ones).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from embed_speed import DEFAULT_PHOTOS, synthetic_jpegs  # noqa: E402
from scale import Searcher, Server, data_uri  # noqa: E402

from tusou.store.keys import KeyStore  # noqa: E402

GROUP = "ingest"


def jpegs_640x480(n: int, folder: Path | None) -> tuple[list[bytes], str]:
    out: list[bytes] = []
    files = sorted(folder.rglob("*")) if folder else []
    for p in files:
        if p.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
            continue
        try:
            img = Image.open(p).convert("RGB")
        except OSError:
            continue
        w, h = img.size
        if w < 640 or h < 480:
            continue
        # Centre 4:3 box, then 640x480.
        cw, ch = (w, w * 3 // 4) if w * 3 <= h * 4 else (h * 4 // 3, h)
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        buf = io.BytesIO()
        img.resize((640, 480), Image.Resampling.LANCZOS, box=box).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
        if len(out) >= n:
            return out, f"photos from {folder}"
    return synthetic_jpegs(n), "synthetic scenes"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace, jpegs: list[bytes], precision: str, size: int, verify: str) -> list[tuple]:
    data = Path(tempfile.mkdtemp(prefix="tusou-ingest-"))
    keys = KeyStore(data / "keys.db")
    keys.create("bench")
    keys.close()
    env = {
        "TUSOU_MODEL_PRECISION": precision,
        "TUSOU_VERIFY": "true" if verify == "on" else "false",
        "TUSOU_MODEL_DIR": str(args.model_dir),
    }
    if size:
        env["TUSOU_MODEL_INPUT_SIZE"] = str(size)
    port = 19000 + os.getpid() % 1000
    server = Server(data, port, env)
    searcher = Searcher(data)
    searcher.url = server.url
    rows = []
    try:
        while True:
            try:
                if requests.get(server.url + "/healthz", timeout=5).status_code < 500:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {data}/serve.log")
        url, session, auth = searcher.url, searcher.session, searcher.auth
        resp = session.post(url + f"/v1/image/group/{GROUP}/new", json={"data": []}, auth=auth, timeout=60)
        assert resp.status_code == 200, resp.text
        for batch in args.batches:
            bodies = [
                {"data": [{"uri": data_uri(b)} for b in jpegs[start : start + batch]]}
                for start in range(0, len(jpegs), batch)
            ]
            warm, timed = bodies[0], bodies[1:]
            session.post(url + f"/v1/image/group/{GROUP}/add", json=warm, auth=auth, timeout=600)
            c0, t0 = cpu_s(server.proc.pid), time.perf_counter()
            for body in timed:
                resp = session.post(url + f"/v1/image/group/{GROUP}/add", json=body, auth=auth, timeout=600)
                assert resp.status_code == 200, resp.text
                assert all(not e for e in resp.json().get("errors", []) or []), resp.text[:300]
            dt, cpu = time.perf_counter() - t0, cpu_s(server.proc.pid) - c0
            n = sum(len(b["data"]) for b in timed)
            name = f"{precision}@{size}" if size else precision
            rows.append((name, verify, batch, n, n / dt, 1000 * cpu / n, os.getloadavg()[0]))
    finally:
        server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="images per batch size (plus one warm-up request)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--precision", default="fp32,int8")
    ap.add_argument("--sizes", default="0", help="comma-separated TUSOU_MODEL_INPUT_SIZE, 0: the model's own")
    ap.add_argument("--verify", default="on", help="comma-separated: on, off (TUSOU_VERIFY)")
    ap.add_argument("--images", type=Path, default=DEFAULT_PHOTOS if DEFAULT_PHOTOS.is_dir() else None)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "tusou-bench-models")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    jpegs, source = jpegs_640x480(args.n + max(args.batches), args.images)
    print(f"{len(jpegs)} JPEGs 640x480 ({source}), mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB")
    print(f"{'model':<10}{'verify':>7}{'batch':>6}{'images':>7}{'img/s':>8}{'cpu ms/img':>12}{'load':>6}")
    configs = [(p, int(s)) for s in args.sizes.split(",") for p in args.precision.split(",")]
    for precision, size in configs:
        for verify in args.verify.split(","):
            for row in run(args, jpegs, precision, size, verify):
                p, v, b, n, rate, cpu, load = row
                print(f"{p:<10}{v:>7}{b:>6}{n:>7}{rate:>8.1f}{cpu:>12.1f}{load:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
