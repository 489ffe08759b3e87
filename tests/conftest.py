"""Test-session settings shared by every test module.

* ``ZEROADAMW_STRICT_DEVICE=1`` (unless already set): the collectives' strict device checking is on for the whole
  suite; processes the tests spawn inherit it through the environment.
* The CUDA tier (tests/test_cuda.py, marker ``cuda``) is skipped, not passed, where there is no GPU; the terminal
  summary says how many of its tests did not run, so a CPU-only green run is never mistaken for a GPU-checked one.
"""

from __future__ import annotations

import os

os.environ.setdefault("ZEROADAMW_STRICT_DEVICE", "1")

NO_GPU = "no CUDA device: not run on a GPU"  # the skip reason tests/test_cuda.py gives


def _skip_reason(report) -> str:
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = sum(NO_GPU in _skip_reason(r) for r in terminalreporter.stats.get("skipped", []))
    if n:
        terminalreporter.write_line(f"cuda tier: {n} test{'s' if n != 1 else ''} not run (no GPU)")
