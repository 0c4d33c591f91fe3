"""Model packages: round trips, safe loading and clear errors."""
from __future__ import annotations

import io
import os
import typing as tp
import zipfile
from pathlib import Path

import pytest
import torch

from demucs.errors import ModelLoadingError
from demucs.hdemucs import HDemucs
from demucs.states import (copy_state, get_state, load_model, save_with_checksum,
                           serialize_model, swap_state)

from helpers import same_state, tiny_hdemucs


def tiny() -> HDemucs:
    return tiny_hdemucs(depth=5).eval()


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_round_trip_float_and_half(tmp_path: Path) -> None:
    model = tiny()
    x = torch.randn(1, 2, 4096)
    path = tmp_path / "model.th"
    torch.save(serialize_model(model, {"seed": 1}, half=False), path)
    assert torch.equal(forward(load_model(path), x), forward(model, x))
    torch.save(serialize_model(model, {"seed": 1}, half=True), path)
    package = torch.load(path, weights_only=False)
    assert all(v.dtype == torch.half for v in package["state"].values())
    assert package["training_args"] == {"seed": 1}
    assert torch.allclose(forward(load_model(path), x), forward(model, x), atol=1e-3)


def test_save_with_checksum(tmp_path: Path) -> None:
    import hashlib
    out = save_with_checksum({"a": torch.ones(3)}, tmp_path / "abc.th")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:8]
    assert out.name == f"abc-{digest}.th"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unknown_kwargs_are_dropped_with_warning() -> None:
    package = serialize_model(tiny(), {}, half=False)
    package["kwargs"]["from_the_future"] = 3
    with pytest.warns(UserWarning, match="from_the_future"):
        model = load_model(package)
    assert isinstance(model, HDemucs)


class Exploit:
    def __reduce__(self) -> tuple[tp.Callable[[str], int], tuple[str]]:
        return (os.system, ("touch pwned",))


def test_crafted_package_is_refused_and_runs_nothing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.th"
    package = serialize_model(tiny(), {}, half=False)
    package["training_args"] = Exploit()
    torch.save(package, path)
    with pytest.raises(ModelLoadingError, match="os.system|posix.system") as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_non_model_klass_is_refused() -> None:
    package = serialize_model(tiny(), {}, half=False)
    package["klass"] = dict
    with pytest.raises(ModelLoadingError, match="not a model class"):
        load_model(package)


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage", "not_a_package"])
def test_bad_files_give_one_line_errors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.th"
    if kind == "truncated":
        buf = io.BytesIO()
        torch.save(serialize_model(tiny(), {}), buf)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint at all")
    elif kind == "not_a_package":
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(ModelLoadingError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_trusted_opt_in_loads_custom_objects(tmp_path: Path) -> None:
    path = tmp_path / "custom.th"
    package = serialize_model(tiny(), {}, half=False)
    package["training_args"] = zipfile.ZipInfo("x")  # harmless, but not allow-listed
    torch.save(package, path)
    with pytest.raises(ModelLoadingError, match="zipfile.ZipInfo"):
        load_model(path)
    assert isinstance(load_model(path, trusted=True), HDemucs)


def test_quantized_state_round_trip(tmp_path: Path) -> None:
    from diffq import DiffQuantizer
    model = tiny()
    quantizer = DiffQuantizer(model, min_size=0.01, group_size=8)
    package = serialize_model(model, {}, quantizer=quantizer)
    assert package["state"]["__quantized"] and package["state"]["quantized"]
    path = tmp_path / "quantized.th"
    torch.save(package, path)
    loaded = load_model(path)  # safe load: the quantizer class is allow-listed
    x = torch.randn(1, 2, 4096)
    out = forward(loaded, x)
    assert out.shape == (1, 4, 2, 4096)
    # Quantized weights are close to the originals, not equal to them.
    assert torch.allclose(out, forward(tiny(), x), atol=0.05)


def test_copy_and_swap_state() -> None:
    model = tiny()
    saved = copy_state(model.state_dict())
    zeros = {k: torch.zeros_like(v) for k, v in saved.items()}
    with swap_state(model, zeros):
        assert all((p == 0).all() for p in model.parameters())
    assert same_state(model, saved)
    assert get_state(model, None, half=True)["encoder.0.conv.weight"].dtype == torch.half


def test_get_state_copies_the_weights() -> None:
    model = tiny()
    state = get_state(model, None, half=False)
    first = next(iter(state))
    saved = state[first].clone()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert torch.equal(state[first], saved)
