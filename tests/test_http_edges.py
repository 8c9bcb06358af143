"""The HTTP boundary under careless or hostile clients: what the wire may carry and what the server answers.

Each test drives a real server over a real socket with requests signed like Qiniu's SDK signs them.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
import requests

from tests.conftest import QiniuClient, Tusou
from tusou.api.auth import sign_qiniu

IMAGE_ROUTE = "/v1/image/group/{group_id}/image"


def requests_counted(tusou: Tusou, route: str) -> dict[str, float]:
    """Requests the server counted for ``route``, by status (its /metrics)."""
    text = requests.get(tusou.server.url + "/metrics", timeout=10).text
    found: dict[str, float] = {}
    pattern = (
        r'tusou_http_requests_total\{method="POST",route="' + re.escape(route) + r'",status="(\d+)"\} (\S+)'
    )
    for status, count in re.findall(pattern, text):
        found[status] = float(count)
    return found


def signed_head(client: QiniuClient, path: str, body: bytes) -> bytes:
    headers = sign_qiniu(
        client.access_key,
        client.secret_key,
        "POST",
        client.base + path,
        headers={"Content-Type": "application/json"},
        body=body,
    )
    host = client.base.removeprefix("http://")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n").encode()


def test_a_client_that_hangs_up_mid_body_is_no_server_error(
    tusou: Tusou, client: QiniuClient, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that times out or is cancelled while uploading (a big batch on a slow link) leaves the server
    # a body shorter than its Content-Length. Nothing failed on the server: no 500 in the metrics (operators
    # alert on those), no "unexpected error" traceback in the log.
    assert client.post("/v1/image/group/g/new", {"data": []}).status_code == 200
    body = b'{"id": "x"}'
    head = signed_head(client, "/v1/image/group/g/image", body)
    with socket.create_connection(("127.0.0.1", tusou.server.port)) as sock:
        sock.sendall(head + b"Content-Length: 1000\r\n\r\n" + body[:5])
        time.sleep(0.2)  # let the server start reading the body before the hang-up
    deadline = time.monotonic() + 30
    while not requests_counted(tusou, IMAGE_ROUTE) and time.monotonic() < deadline:
        time.sleep(0.05)
    counted = requests_counted(tusou, IMAGE_ROUTE)
    assert counted and "500" not in counted, counted
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    # The server still answers that client's next request.
    assert client.post("/v1/image/group/g/image", {"id": "x"}).json() == {"error": "image x not exists"}
