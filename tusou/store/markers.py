"""List markers: opaque, validated cursors over a group's insertion order.

A page ends at some row's sequence number, which comes from a counter shared by every tenant: handed out
as it is, two markers of one's own group would tell how many images *other* tenants inserted in between.
So a marker is that number encrypted under a key of the store and the (tenant, group) it belongs to, with
an authentication tag: it reveals nothing, cannot be forged or moved to another group, and anything that
is not a marker this store issued for this group is refused with "invalid marker" (400).

Encryption is a 4-round Feistel network over the 64-bit number with HMAC-SHA256 round functions (a keyed
pseudorandom permutation); the tag is 48 bits of HMAC-SHA256 over the ciphertext. 19 characters, url-safe.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from tusou.errors import BadMarker

KEY_BYTES = 32
_TAG_BYTES = 6
_ROUNDS = 4
_MASK32 = 0xFFFFFFFF


def new_marker_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


class MarkerCodec:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("marker key too short")
        self._key = key

    def _tweak(self, tenant: str, group: str) -> bytes:
        return hashlib.sha256(
            tenant.encode("utf-8", "surrogatepass") + b"\x00" + group.encode("utf-8", "surrogatepass")
        ).digest()

    def _round(self, tweak: bytes, i: int, half: int) -> int:
        mac = hmac.new(self._key, tweak + bytes((i,)) + half.to_bytes(4, "big"), hashlib.sha256).digest()
        return int.from_bytes(mac[:4], "big")

    def _tag(self, tweak: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, b"tag" + tweak + body, hashlib.sha256).digest()[:_TAG_BYTES]

    def encode(self, tenant: str, group: str, seq: int) -> str:
        if not 0 <= seq < 1 << 64:
            raise ValueError("sequence number out of range")
        tweak = self._tweak(tenant, group)
        left, right = seq >> 32, seq & _MASK32
        for i in range(_ROUNDS):
            left, right = right, left ^ self._round(tweak, i, right)
        body = ((left << 32) | right).to_bytes(8, "big")
        return base64.urlsafe_b64encode(body + self._tag(tweak, body)).decode().rstrip("=")

    def decode(self, tenant: str, group: str, marker: str) -> int:
        """The sequence number a page starts after: 0 for "" (the first page). Raises BadMarker."""
        if not marker:
            return 0
        if len(marker) != 19 or not marker.isascii():
            raise BadMarker()
        try:
            raw = base64.urlsafe_b64decode(marker + "=")
        except (binascii.Error, ValueError) as exc:
            raise BadMarker() from exc
        if len(raw) != 8 + _TAG_BYTES or base64.urlsafe_b64encode(raw).decode().rstrip("=") != marker:
            raise BadMarker()
        tweak = self._tweak(tenant, group)
        body, tag = raw[:8], raw[8:]
        if not hmac.compare_digest(tag, self._tag(tweak, body)):
            raise BadMarker()
        value = int.from_bytes(body, "big")
        left, right = value >> 32, value & _MASK32
        for i in reversed(range(_ROUNDS)):
            left, right = right ^ self._round(tweak, i, left), left
        seq = (left << 32) | right
        if seq >= 1 << 63:  # never issued (sequence numbers are SQLite/Milvus int64): refuse, never overflow
            raise BadMarker()
        return seq
