"""Shared pytest fixtures and the `needs_programs` marker (helpers.needs_ffmpeg, ...)."""
from __future__ import annotations

import os
import typing as tp
from pathlib import Path

import pytest

from helpers import one_thread, require_programs, skip_or_fail
from tools.synth_dataset import generate_dataset

REPO = Path(__file__).resolve().parents[1]
one_thread()


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


@pytest.fixture(scope="module")
def musdb(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic MusDB-HQ folder, DATA/musdb in a fresh DATA, made once per module with
    the `generate_dataset` arguments of the module's `MUSDB` dict (its size)."""
    sizes = getattr(request.module, "MUSDB", None)
    if sizes is None:
        pytest.fail(f"{request.module.__name__} uses the musdb fixture without a MUSDB dict "
                    "(the generate_dataset arguments: tracks, seconds, ...)")
    return generate_dataset(tmp_path_factory.mktemp("data") / "musdb", **sizes)


@pytest.fixture
def xp_folder(musdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Dora's XPs in tmp_path; the dataset (`musdb`, its metadata next to it) from the
    environment, as users set it."""
    from demucs.train import main
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    monkeypatch.setenv("MUSDB_PATH", str(musdb))
    monkeypatch.setenv("METADATA_PATH", str(musdb.parent / "metadata"))
    return tmp_path / "outputs"


@pytest.fixture(autouse=True)
def configs_checked_afresh() -> tp.Iterator[None]:
    """`train.main` checks the config of a signature once per process; tests change what
    the checks see (CUDA refusals lifted on the CPU, ...), so each test starts afresh."""
    from demucs.train import main  # here, not at collection: the training stack is heavy
    main._checked.clear()
    yield
