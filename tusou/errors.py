"""Every error tusou answers a client with: one base carrying Qiniu's HTTP status and error text.

The HTTP layer has one handler for :class:`QiniuError` that writes ``status`` and ``{"error": message}``;
whatever layer refuses a request raises the base or a subclass, and nothing translates between them.
Subclasses exist only where a caller must tell errors apart: the store's (a batch turns some into per-image
``errors[]`` entries, the CLI and tests check for a missing group), the signature check's, and an image
that could not be fetched or decoded (``kind`` says why, for metrics and per-image errors).
"""

from __future__ import annotations


class QiniuError(Exception):
    """A request tusou refuses: ``status`` is the HTTP status, ``message`` the text sent to the client."""

    status: int = 400

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AuthError(QiniuError):
    """A request whose signature, key or date is refused (401 bad token, 403 stale or malformed date).

    ``reason`` says why for the server's log (unknown key, revoked key, bad signature, host mismatch, ...);
    the client only ever gets ``message``, so a prober learns nothing about which keys exist.
    """

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(status, message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


class RateLimited(QiniuError):
    """429: the access key sent more than its rate; ``retry_after_s`` goes out as ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(429, message)
        self.retry_after_s = retry_after_s


class StoreError(QiniuError):
    """A request the store refuses (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(status, message)


class GroupExists(StoreError):
    def __init__(self, group: str) -> None:
        super().__init__("group already exists")
        self.group = group


class GroupNotFound(StoreError):
    def __init__(self, group: str) -> None:
        super().__init__(f"group {group} not exists")
        self.group = group


class ImageNotFound(StoreError):
    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id} not exists")


class BadMarker(StoreError):
    def __init__(self) -> None:
        super().__init__("invalid marker")
