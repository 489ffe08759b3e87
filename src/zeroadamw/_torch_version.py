"""The torch versions zeroadamw supports, checked when it is imported (a clear error instead of a crash later)."""

from __future__ import annotations

import re as _re

MIN_TORCH = (2, 11)  # the supported lower bound; pyproject.toml's `torch>=2.11` says the same


def parse_torch_version(version: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a torch version string: ``"2.13.0+cpu"``, ``"2.11.0a0+git1234abc"``,
    ``"2.12.0.dev20260101+cu128"``, ``"2.11"`` -- pre-release / local parts are ignored (a 2.11 pre-release or
    nightly counts as 2.11). Raises ValueError for anything without a leading ``MAJOR.MINOR``."""
    m = _re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if m is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def check_torch_version(version: str, required: tuple[int, int] = MIN_TORCH) -> None:
    """Raise ImportError naming the installed and the required version when ``version`` is older than
    ``required`` (or unreadable)."""
    want = ".".join(map(str, required))
    try:
        have = parse_torch_version(version)
    except ValueError:
        raise ImportError(f"zeroadamw needs torch >= {want}; cannot read the installed torch's version "
                          f"{version!r}") from None
    if have[: len(required)] < tuple(required):
        raise ImportError(f"zeroadamw needs torch >= {want}, but torch {version} is installed: upgrade torch "
                          f"(e.g. pip install 'torch>={want}'; `make setup` / scripts/install_torch.sh pick a build)")
