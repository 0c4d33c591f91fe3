"""Shared pytest fixtures and the `needs_programs` marker (helpers.needs_ffmpeg, ...)."""
from __future__ import annotations

import os
import typing as tp
from pathlib import Path

import pytest

from helpers import require_programs, skip_or_fail

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_programs(*names): skip without these programs (fail on CI=true)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs_programs"):
        require_programs(*marker.args)


def reference_path() -> Path:
    """The reference facts: $DEMUCS_REFERENCE, or ../shared/reference next to the repo."""
    default = REPO.parent / "shared" / "reference"
    return Path(os.environ.get("DEMUCS_REFERENCE", default))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference folder; tests using it skip without it, except on CI (CI=true)."""
    path = reference_path()
    if not path.is_dir():
        skip_or_fail(f"reference facts not found at {path} (set DEMUCS_REFERENCE)")
    return path


@pytest.fixture(autouse=True)
def configs_checked_afresh() -> tp.Iterator[None]:
    """`train.main` checks the config of a signature once per process; tests change what
    the checks see (CUDA refusals lifted on the CPU, ...), so each test starts afresh."""
    from demucs.train import main  # here, not at collection: the training stack is heavy
    main._checked.clear()
    yield
