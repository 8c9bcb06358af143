"""Crash safety of the real server: kill -9 under concurrent writes loses nothing acknowledged.

The harness lives in ``bench/crash.py`` (the long run: ``python -m bench.crash --kills 20``); this is the CI
version with a handful of kills.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import crash


def _report(stats: crash.Stats) -> str:
    return (
        f"kills {stats.kills}, acked {stats.acked_writes}, checked {stats.checked}, lost {stats.lost}, "
        f"uncertain {stats.uncertain}, violations: {stats.violations[:10]}"
    )


def test_kill_9_under_concurrent_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    stats = crash.run(kills=3, workers=3, seed=7, min_run=0.0, max_run=1.2, data=tmp_path / "data",
                      echo=False)
    assert stats.kills == 3
    # The run must have exercised something on both sides of the kill, or it proves nothing.
    assert stats.acked_writes >= 15 and stats.checked >= 15, _report(stats)
    assert stats.lost == 0, _report(stats)
    assert not stats.violations, _report(stats)


@pytest.mark.slow
def test_kill_9_many_times(tmp_path: Path) -> None:
    stats = crash.run(kills=20, workers=4, seed=11, min_run=0.3, max_run=2.5, data=tmp_path / "data",
                      echo=False)
    assert stats.lost == 0 and not stats.violations, _report(stats)
