"""`make test` runs on pytest-xdist workers, and xdist refuses to start when two workers collect different test ids.

A parametrize value that depends on the clock or on string hashing (a gzip header's timestamp, a set's order) gives
each worker its own ids, so CI fails before a single test runs. This test collects the suite twice, a second apart and
under two hash seeds, and compares the ids.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _collected_ids(hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(ids) > 100, result.stdout[-3000:]
    return ids


def test_every_worker_collects_the_same_test_ids():
    first = _collected_ids("1")
    time.sleep(1.1)  # a value taken from the clock in seconds (a gzip mtime) differs now
    second = _collected_ids("2")
    differing = sorted(set(first) ^ set(second))
    assert not differing, "test ids that change between collections (fix the parametrize value or give ids=):\n" + (
        "\n".join(differing[:20])
    )
    assert first == second, "the same test ids were collected in a different order"
