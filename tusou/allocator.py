"""The C allocator's policy for the server process: glibc malloc's settings, made once when ``tusou serve``
starts, before its threads. A no-op where the C library is not glibc.

* **A fixed mmap threshold of 1 MB**, so that freed images leave the process. glibc raises its threshold
  each time a large block is freed, so after the first big image later ones are carved from the heap
  arenas of whichever of many threads decoded them, and stay in RSS when freed: measured, the 16-image
  attack of ``bench/hostile.py`` grew a server by ~670 MB with the pixel budget alone and by ~210 MB with
  the fixed threshold.
* **16 MB of slack at the top of each heap** (``M_TOP_PAD``), so that a search's arrays are reused. With
  the fixed threshold alone a heap was trimmed back to the kernel whenever more than 128 KB lay free at
  its top, and a block that did not fit the top was mapped on its own: a large answer's arrays (the
  re-rank's float32 rows, ~25 MB in pieces of 3 MB, and the scan's gathers) came back as fresh pages on
  every search. 500k dense, 10,000 hits by stored id over HTTP, the server measured from /proc: ~8,000-
  12,000 page faults and 29-37 ms of kernel CPU a search, 54-62 ms p50 (59-70 in ``bench/scale.py``);
  with the slack 1-4 faults and ~5 ms once warm, 34-37 ms p50 (``bench/scale.py`` prints the server's
  faults and kernel time per search), and the server's RSS ~45 MB higher (652-660 MB: the arrays stay).
  16 MB and 32 MB measured alike; 4 MB still took ~1,900 faults a search. Images still leave: a block
  larger than the slack does not fit the top and is mapped and unmapped at once (``bench/hostile.py``:
  the 16-image add 213 -> 236 MB peak growth, 4 concurrent 16-bit searches 321 -> 350 MB, bound 600).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h).
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 20
TOP_PAD = 16 << 20


def tune_for_serving() -> bool:
    """Set the two parameters above; False where they could not be set (no glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return False
    # glibc only: musl has a mallopt that accepts these and does nothing.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    threshold = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    pad = libc.mallopt(_M_TOP_PAD, TOP_PAD)
    return threshold == 1 and pad == 1
