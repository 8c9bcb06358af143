"""List markers: opaque, validated cursors over a group's insertion order (a sequence number)."""

from __future__ import annotations

import base64
import binascii

from tusou.store.base import BadMarker


def encode_marker(seq: int) -> str:
    return base64.urlsafe_b64encode(seq.to_bytes(8, "big")).decode().rstrip("=")


def decode_marker(marker: str) -> int:
    if not marker:
        return 0
    try:
        raw = base64.urlsafe_b64decode(marker + "=" * (-len(marker) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadMarker() from exc
    if len(raw) != 8 or encode_marker(int.from_bytes(raw, "big")) != marker:
        raise BadMarker()
    return int.from_bytes(raw, "big")
