"""The server's allocator policy (tusou/allocator.py), measured in a fresh Python process: a worker thread
that allocates and fills a 3 MB array again and again (what a large search does with the re-rank's rows)
takes fresh pages from the kernel every time under the fixed 1 MB mmap threshold alone, and reuses them
once the heap keeps its slack."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHURN = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys, threading
    import numpy as np
    from tusou import allocator

    if sys.argv[1] == "served":
        assert allocator.tune_for_serving()
    else:  # the policy before the slack: the fixed threshold alone
        assert ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, allocator.MMAP_THRESHOLD) == 1

    def churn():
        for _ in range(40):
            rows = np.empty((2048, 384), dtype=np.float32)
            rows.fill(1.0)
            del rows

    churn()  # the first round may take fresh pages either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker = threading.Thread(target=churn)
    worker.start()
    worker.join()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def faults(policy: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, policy], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_the_served_heap_keeps_a_searchs_arrays_instead_of_faulting_them_in_again() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc: Linux only")
    fixed_only, served = faults("fixed"), faults("served")
    # 40 arrays of 3 MB: ~30,000 fresh pages when each is mapped on its own (fewer with transparent huge
    # pages); reused, a few hundred at most.
    assert fixed_only > 5_000, fixed_only
    assert served < fixed_only / 20, (served, fixed_only)
