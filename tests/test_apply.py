"""apply_model invariants: chunking, shifts, bags, TensorChunk."""
from __future__ import annotations

import random

import pytest
import torch

from demucs.apply import BagOfModels, TensorChunk, apply_model
from demucs.demucs import Demucs
from demucs.hdemucs import HDemucs

SOURCES = ["drums", "bass", "other", "vocals"]


class Identityish(torch.nn.Module):
    """A stand-in model: source k is (k + 1) times the mixture."""

    def __init__(self, segment: float = 0.1):
        super().__init__()
        self.sources = SOURCES
        self.samplerate = 1000
        self.audio_channels = 2
        self.segment = segment
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.arange(1, 5, dtype=x.dtype)[None, :, None, None]
        return scale * x[:, None]


def test_split_reconstructs_pointwise_model() -> None:
    model = Identityish()
    mix = torch.randn(2, 2, 1234)
    out = apply_model(model, mix, shifts=0, split=True, overlap=0.25)
    expected = model(mix)
    assert torch.allclose(out, expected, atol=1e-5)


def test_shifts_of_pointwise_model_are_exact() -> None:
    model = Identityish()
    mix = torch.randn(1, 2, 700)
    random.seed(0)
    out = apply_model(model, mix, shifts=3, split=False)
    assert torch.allclose(out, model(mix), atol=1e-5)


def test_split_close_to_no_split_for_real_model() -> None:
    torch.manual_seed(0)
    model = HDemucs(SOURCES, channels=4, segment=1.0, depth=5).eval()
    mix = torch.randn(1, 2, 3 * 44100)
    whole = apply_model(model, mix, shifts=0, split=False)
    chunked = apply_model(model, mix, shifts=0, split=True, overlap=0.25)
    assert whole.shape == chunked.shape == (1, 4, 2, 3 * 44100)
    # Chunk boundaries change the context a little, not the overall estimate.
    rel = (whole - chunked).norm() / whole.norm()
    assert rel < 0.2


def test_shifts_average_the_shifted_outputs() -> None:
    torch.manual_seed(0)
    model = Demucs(SOURCES, channels=4, depth=3, segment=1.0).eval()
    mix = torch.randn(1, 2, 5000)
    random.seed(42)
    averaged = apply_model(model, mix, shifts=2, split=False)
    random.seed(42)
    offsets = [random.randint(0, 22050) for _ in range(2)]
    singles = []
    for offset in offsets:
        padded = torch.nn.functional.pad(mix, (22050, 22050))
        shifted = padded[..., offset:offset + 5000 + 22050 - offset]
        singles.append(apply_model(model, shifted, shifts=0, split=False)[..., 22050 - offset:])
    assert torch.allclose(averaged, torch.stack(singles).mean(0), atol=1e-5)


def test_bag_weights_and_errors() -> None:
    a, b = Identityish(), Identityish()
    bag = BagOfModels([a, b], weights=[[1, 0, 1, 1], [0, 1, 1, 3]], segment=0.2)
    assert a.segment == b.segment == 0.2
    mix = torch.randn(1, 2, 500)
    out = apply_model(bag, mix, shifts=0)
    assert torch.allclose(out, a(mix), atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        BagOfModels([a, b], weights=[[1, 1, 1, 1]])
    with pytest.raises(ValueError, match="one weight per source"):
        BagOfModels([a], weights=[[1, 1]])


def test_tensor_chunk_padding_reads_neighbours() -> None:
    x = torch.arange(10.)[None]
    chunk = TensorChunk(x, 3, 4)
    assert chunk.shape == [1, 4]
    assert chunk.padded(6).tolist() == [[2., 3., 4., 5., 6., 7.]]
    sub = TensorChunk(chunk, 2, 5)
    assert sub.offset == 5 and sub.length == 2
    edge = TensorChunk(x, 8)
    assert edge.padded(6).tolist() == [[6., 7., 8., 9., 0., 0.]]
    with pytest.raises(ValueError):
        TensorChunk(x, 10)


def test_progress_and_threads(capsys: pytest.CaptureFixture) -> None:
    model = Identityish()
    mix = torch.randn(1, 2, 1000)
    out = apply_model(model, mix, shifts=0, split=True, progress=True, num_workers=2)
    assert torch.allclose(out, model(mix), atol=1e-5)
    assert "seconds" in capsys.readouterr().err
