"""Shared by the GPU-tier section scripts: how a section reports its result to scripts/gpu_check.py.

A section prints, on stdout, one line per result: ``GPU_RESULT {json}`` with at least ``name`` and ``status``
(``ok`` a measurement was taken, ``pass`` / ``fail`` a check, ``not_run`` with a ``summary`` saying why). The
orchestrator adds the section name, the wall time and, when the process failed, the tail of its log.
"""

from __future__ import annotations

import json
import math
import os
import sys

RESULT_TAG = "GPU_RESULT "
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def emit(name: str, status: str, summary: str = "", **data) -> None:
    rec = {"name": name, "status": status, "summary": summary, "data": data}
    print(RESULT_TAG + json.dumps(rec, default=_jsonable), flush=True)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.tolist()
        if isinstance(x, (torch.dtype, torch.device)):
            return str(x)
    except ImportError:
        pass
    return str(x)


def ensure_src_on_path() -> None:
    """Import zeroadamw from this checkout (src/) whether or not PYTHONPATH says so."""
    src = os.path.join(ROOT, "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.append(tests)


def module_version(dist: str) -> str | None:
    """The installed version of a distribution (``pip`` name), without importing it; None when not installed."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
