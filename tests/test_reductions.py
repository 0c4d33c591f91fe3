"""The normalizations of the ONNX graphs (demucs/reductions.py): the same values as torch's
operators, and the runtimes as close to float64 as torch on a million values."""
from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from demucs import reductions
from demucs.backends import open_session
from demucs.graphs import Graph, _onnx_export

from helpers import skip_or_fail


@pytest.mark.parametrize("dims,keepdim", [([-1], False), ([1, 2], True), (None, False),
                                          ([0, 1], True)])  # the last axis kept
@pytest.mark.parametrize("long", [10 ** 6, 1000])  # by axes, by blocks (padded)
def test_means_and_deviations_equal_torch(dims: tp.Optional[tp.List[int]], keepdim: bool,
                                          long: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reductions, "LONG", long)
    x = torch.randn(2, 3, 5001, dtype=torch.float64) * 3 + 1.5
    along = dims or list(range(x.dim()))
    torch.testing.assert_close(reductions.mean(x, dims, keepdim), x.mean(along, keepdim))
    for correction in [0, 1]:
        torch.testing.assert_close(reductions.var(x, dims, correction=correction,
                                                  keepdim=keepdim),
                                   x.var(along, correction=correction, keepdim=keepdim))
        torch.testing.assert_close(reductions.std_unbiased(x, dims, bool(correction), keepdim),
                                   x.std(along, unbiased=bool(correction), keepdim=keepdim))


@pytest.mark.parametrize("shape,groups", [((2, 8, 3000), 4), ((1, 6, 5, 700), 3),
                                          ((1, 8, 10), 2)])  # the last one stays fused
def test_group_norm_equals_torch(shape: tp.Tuple[int, ...], groups: int,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reductions, "LONG", 1000)  # by a product with ones
    x = torch.randn(*shape, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1],
                                                                           dtype=torch.float64)
    torch.testing.assert_close(reductions.group_norm(x, groups, weight, bias, 1e-5),
                               F.group_norm(x, groups, weight, bias, 1e-5))


class Normalizations(nn.Module):
    """A group norm and a normalization by mean and deviation over a million values."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, mix: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        mean, std = mix.mean(dim=(1, 2), keepdim=True), mix.std(dim=(1, 2), keepdim=True)
        return self.norm(mix), (mix - mean) / std


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_runtimes_normalize_a_million_values_as_precisely_as_torch(
        backend: str, tmp_path: Path) -> None:
    """Without `DECOMPOSITIONS`, onnxruntime's group norm (an `InstanceNormalization`) was
    1.8e-5 of the scale away from float64, and OpenVINO's normalization of positive
    values 6.5e-6."""
    try:
        __import__(backend)
    except ImportError:
        skip_or_fail(f"{backend} is not installed (pip install .[onnx,openvino])")
    module = Normalizations(512).eval()
    generator = torch.Generator().manual_seed(0)
    mix = (torch.randn(1, 512, 2688, generator=generator) * 3 + 1.5).abs()  # as magnitudes
    _onnx_export(module, {"mix": mix}, tmp_path / "norm.onnx", ["norm", "scaled"], False)
    graph = Graph(file="norm.onnx", length=2688, segment=1., weights=[1.],
                  inputs={"mix": list(mix.shape)},
                  outputs={"norm": list(mix.shape), "scaled": list(mix.shape)})
    outputs = open_session(tmp_path / "norm.onnx", graph, backend).run({"mix": mix.numpy()})
    with torch.no_grad():
        expected = module.double()(mix.double())
    for out, reference in zip(outputs, expected):
        error = (torch.from_numpy(out).double() - reference).abs().max() / reference.abs().max()
        assert error < 1e-6, f"error {error:.2e} of the scale"
