"""The README's quick start, run as written against a fresh `tusou serve` with the key of its first start."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def expected_lines(code: str) -> list[str]:
    """What each `print(...)  # shown` line of the block says it prints, in order."""
    return [m.group(1) for m in re.finditer(r"^\s*print\(.*\)\s+# (.+)$", code, flags=re.MULTILINE)]


def matches(shown: str, printed: str) -> bool:
    # "[a, b, ...]" in a comment stands for a list that goes on.
    if shown.endswith("...]"):
        return printed.startswith(shown[: -len("...]")])
    return printed == shown


def test_setup_commands_are_the_documented_ones() -> None:
    """The two set-up commands stay as the README gives them (CI runs the second one)."""
    blocks = code_blocks(section("Set up"), "sh")
    assert blocks == [
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/tusou serve --data ./tusou-data\n",
        "python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest\n",
    ]


def test_quick_start_runs_as_written(tmp_path: Path) -> None:
    quick = section("Quick start")
    [code] = code_blocks(quick, "python")
    assert "import qiniu" not in code and "from qiniu" not in code and "from tusou.client import" in code
    shown = expected_lines(code)
    assert len(shown) >= 5

    port = free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, TUSOU_PORT=str(port), PYTHONUNBUFFERED="1")
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "tusou", "serve", "--data", str(tmp_path / "data")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        [key] = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]

        run = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,  # the block reads tests/data/photos, as a user in a clone of the repository would
            env=dict(
                os.environ,
                TUSOU_SERVER=url,
                TUSOU_ACCESS_KEY=key["access_key"],
                TUSOU_SECRET_KEY=key["secret_key"],
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        printed = run.stdout.splitlines()
        assert len(printed) == len(shown), (printed, shown)
        for want, got in zip(shown, printed, strict=True):
            assert matches(want, got), (want, got)
        # The block cleans up after itself: the fresh server holds no group.
        listed = subprocess.run(
            [sys.executable, "-m", "tusou", "groups", "--json", "--server", url],
            env=dict(os.environ, TUSOU_ACCESS_KEY=key["access_key"], TUSOU_SECRET_KEY=key["secret_key"]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
