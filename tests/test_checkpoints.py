"""Loading XP checkpoints and model packages: a damaged file is one line saying so, while
an error that does not come from the file (our own code, memory) goes through as it is."""
from __future__ import annotations

import io
import typing as tp
from pathlib import Path

import pytest
import torch

from demucs import checkpoints, states
from demucs.checkpoints import load_checkpoint
from demucs.errors import ModelLoadingError
from demucs.states import load_package, serialize_model
from helpers import tiny_hdemucs


def saved(value: tp.Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def checkpoint_bytes() -> bytes:
    return saved({"state": {"weight": torch.randn(4000)}, "history": [], "args": {}})


def damaged(good: bytes, kind: str) -> bytes:
    """`good` (a torch.save file) damaged in one of the ways files get damaged."""
    middle = len(good) // 2
    return {
        "empty": b"",
        "truncated": good[:middle],
        "cut_short": good[:-30],
        "garbage": b"this is not a checkpoint at all" * 40,
        "zeroed_block": good[:middle] + bytes(200) + good[middle + 200:],
    }[kind]


DAMAGES = {
    "empty": "the file is empty",
    "truncated": "the file is truncated (its zip archive has no end)",
    "cut_short": "the file is truncated (its zip archive has no end)",
    "garbage": "not a file written by torch.save",
    "zeroed_block": "the file is damaged (its part ",
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_damaged_checkpoint_is_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "checkpoint.th"
    path.write_bytes(damaged(checkpoint_bytes(), kind))
    with pytest.raises(ModelLoadingError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: unreadable checkpoint, {DAMAGES[kind]}")
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_damaged_package_is_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.th"
    path.write_bytes(damaged(saved(serialize_model(tiny_hdemucs(), {}, half=False)), kind))
    with pytest.raises(ModelLoadingError) as error:
        load_package(path)
    message = str(error.value)
    assert message.startswith(f"{path}: unreadable model package, {DAMAGES[kind]}")
    assert message.endswith("download or export it again.")


def test_a_zip_that_torch_did_not_write(tmp_path: Path) -> None:
    import zipfile
    path = tmp_path / "model.th"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadingError, match="a zip archive, but not one written by "
                                                "torch.save"):
        load_package(path)


def test_error_of_our_unpickler_is_not_called_damage(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in our loading code, on a whole file, surfaces as itself."""
    path = tmp_path / "checkpoint.th"
    path.write_bytes(checkpoint_bytes())

    def broken() -> dict[tuple[str, str], tp.Any]:
        raise KeyError("numpy:dtype")

    monkeypatch.setattr(checkpoints, "_allowed_globals", broken)
    with pytest.raises(KeyError, match="numpy:dtype"):
        load_checkpoint(path)


@pytest.mark.parametrize("error", [TypeError("a bug"), MemoryError()])
def test_errors_beside_the_file_go_through_package_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    path = tmp_path / "model.th"
    torch.save(serialize_model(tiny_hdemucs(), {}, half=False), path)

    def failing(path: Path, trusted: bool) -> tp.Any:
        raise error

    monkeypatch.setattr(states, "_torch_load", failing)
    with pytest.raises(type(error)):
        load_package(path)


def test_memory_error_of_a_checkpoint_goes_through(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.th"
    path.write_bytes(checkpoint_bytes())

    def failing(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        raise MemoryError()

    monkeypatch.setattr(checkpoints.torch, "load", failing)
    with pytest.raises(MemoryError):
        load_checkpoint(path)


def test_whole_files_still_load(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.th"
    path.write_bytes(checkpoint_bytes())
    assert load_checkpoint(path)["state"]["weight"].shape == (4000,)
