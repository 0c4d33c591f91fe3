"""Shared pytest fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tools` is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))


def reference_path() -> Path:
    """The reference facts: $DEMUCS_REFERENCE, or ../shared/reference next to the repo."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    return Path(os.environ.get("DEMUCS_REFERENCE", default))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference folder; tests using it skip without it, except on CI (CI=true)."""
    path = reference_path()
    if not path.is_dir():
        message = f"reference facts not found at {path} (set DEMUCS_REFERENCE)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
