"""EMA math, the singular value penalty, quantizer setup and single-process distrib."""
from __future__ import annotations

import math
import random
import types

import pytest
import torch
from torch import nn

from demucs import distrib
from demucs.ema import ModelEMA
from demucs.errors import ConfigError
from demucs.quantize import get_quantizer, model_size
from demucs.metrics import Averager
from demucs.svd import power_iteration, svd_penalty, top_singular_value_squared

# ---------------------------------------------------------------------------------------
# EMA


def set_weights(model: nn.Linear, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)


@pytest.mark.parametrize("decay", [0., 0.5, 0.9])
def test_ema_unbiased_is_weighted_mean(decay: float) -> None:
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay)
    values = [1., 4., -2., 3.5]
    for value in values:
        set_weights(model, value)
        ema.update()
    n = len(values)
    coefs = [decay ** (n - 1 - i) for i in range(n)]
    expected = sum(c * v for c, v in zip(coefs, values)) / sum(coefs)
    assert torch.allclose(ema.state["weight"], torch.full((2, 3), expected))
    assert torch.allclose(ema.state["bias"], torch.full((2,), -expected))
    assert ema.count == pytest.approx(sum(coefs))


def test_ema_biased_starts_from_initial_weights() -> None:
    model = nn.Linear(3, 2)
    set_weights(model, 2.)
    ema = ModelEMA(model, 0.75, unbias=False)
    set_weights(model, 6.)
    ema.update()
    ema.update()
    expected = 0.75 * (0.75 * 2 + 0.25 * 6) + 0.25 * 6
    assert torch.allclose(ema.state["weight"], torch.full((2, 3), expected))


def test_ema_update_is_the_formula_tensor_by_tensor() -> None:
    """The multi-tensor update gives, bit for bit, `avg * (1 - w) + w * value` computed
    tensor by tensor, for weights and floating point buffers alike."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.GroupNorm(2, 8), norm)
    ema = ModelEMA(model, 0.9)
    expected = {key: value.clone() for key, value in ema.state.items()}
    count = 0.
    for _ in range(3):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
            assert norm.running_mean is not None
            norm.running_mean.add_(1.)
        ema.update()
        count = count * 0.9 + 1
        current = model.state_dict()
        for key, average in expected.items():
            average.mul_(1 - 1 / count).add_(current[key], alpha=1 / count)
    assert ema.state.keys() == expected.keys()
    assert all(torch.equal(ema.state[key], value) for key, value in expected.items())


def test_ema_swap_and_state_dict() -> None:
    linear = nn.Linear(3, 2)
    model = nn.Sequential(linear, nn.BatchNorm1d(2))  # BN has an int buffer
    ema = ModelEMA(model, 0.5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        linear.weight.add_(1.)
    ema.update()
    with ema.swap():
        assert torch.equal(linear.weight, ema.state["0.weight"])
    assert torch.equal(linear.weight, original["0.weight"] + 1)
    assert "1.num_batches_tracked" not in ema.state  # only floating point tensors
    other = ModelEMA(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.count == ema.count
    assert all(torch.equal(other.state[k], v) for k, v in ema.state.items())
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, 1.)


# ---------------------------------------------------------------------------------------
# SVD penalty


def matrix_with_spectrum(rows: int, cols: int, top: float, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) matrix whose largest singular value is `top`, the others <= 1."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    k = min(rows, cols)
    values = torch.linspace(1., 0.1, k)
    values[0] = top
    return u[:, :k] @ torch.diag(values) @ v[:, :k].t()


def test_power_iteration_top_eigenvalue() -> None:
    torch.manual_seed(0)
    matrix = matrix_with_spectrum(12, 20, 3.)
    gram = matrix @ matrix.t()
    expected = torch.linalg.eigvalsh(gram).max()
    assert power_iteration(gram, niters=30, bs=2).item() == pytest.approx(expected.item(),
                                                                          rel=1e-4)
    with pytest.raises(ValueError, match="square"):
        power_iteration(matrix)


@pytest.mark.parametrize("powm", [False, True])
@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_top_singular_value_matches_svdvals(powm: bool, shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    matrix = matrix_with_spectrum(*shape, top=4.)
    expected = torch.linalg.svdvals(matrix)[0].item() ** 2
    estimate = top_singular_value_squared(matrix, dim=1, niters=10, powm=powm)
    assert estimate.item() == pytest.approx(expected, rel=1e-3)
    assert top_singular_value_squared(matrix, exact=True).item() == pytest.approx(expected)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 5)
        self.convtr = nn.ConvTranspose1d(8, 6, 4)
        self.linear = nn.Linear(6, 10)
        self.small = nn.Conv1d(2, 2, 1)


def exact_top(matrix: torch.Tensor) -> float:
    return torch.linalg.svdvals(matrix)[0].item() ** 2


def value(penalty: float | torch.Tensor) -> float:
    return float(penalty.detach()) if isinstance(penalty, torch.Tensor) else penalty


def test_svd_penalty_sums_layers() -> None:
    torch.manual_seed(2)
    net = TinyNet()
    conv = exact_top(net.conv.weight.reshape(8, -1))
    convtr_as_in = exact_top(net.convtr.weight.reshape(8, -1))  # (in, out * k)
    convtr_as_out = exact_top(net.convtr.weight.transpose(0, 1).reshape(6, -1))
    linear = exact_top(net.linear.weight)
    small = exact_top(net.small.weight.reshape(2, -1))
    total = svd_penalty(net, min_size=0, exact=True, convtr=False)
    assert value(total) == pytest.approx(conv + convtr_as_in + linear + small, rel=1e-5)
    total = svd_penalty(net, min_size=0, exact=True, convtr=True)
    assert value(total) == pytest.approx(conv + convtr_as_out + linear + small, rel=1e-5)
    total = svd_penalty(net, min_size=0, exact=True, conv_only=True)
    assert value(total) == pytest.approx(conv + convtr_as_in + small, rel=1e-5)
    # min_size is in MB of float32: the small conv (4 weights) is below 2e-5 MB.
    total = svd_penalty(net, min_size=2e-5, exact=True)
    assert value(total) == pytest.approx(conv + convtr_as_in + linear, rel=1e-5)
    estimate = svd_penalty(net, min_size=0, niters=300, powm=True)
    assert value(estimate) == pytest.approx(conv + convtr_as_in + linear + small, rel=1e-3)
    assert svd_penalty(net, min_size=1.) == 0.
    penalty = svd_penalty(net, min_size=0, exact=True)
    assert isinstance(penalty, torch.Tensor) and penalty.requires_grad


def test_svd_penalty_proba() -> None:
    net = TinyNet()
    full = value(svd_penalty(net, min_size=0, exact=True))
    rng = random.Random(0)
    values = [value(svd_penalty(net, min_size=0, exact=True, proba=0.5, rng=rng))
              for _ in range(40)]
    assert set(round(v / full, 4) for v in values) == {0., 2.}  # skipped, or scaled by 1/p
    rng_a, rng_b = random.Random(3), random.Random(3)
    draws_a = [svd_penalty(net, min_size=0, exact=True, proba=0.5, rng=rng_a) == 0.
               for _ in range(10)]
    draws_b = [svd_penalty(net, min_size=0, exact=True, proba=0.5, rng=rng_b) == 0.
               for _ in range(10)]
    assert draws_a == draws_b  # the draws only depend on the generator given


# ---------------------------------------------------------------------------------------
# Quantizers, metrics averaging


def quant_cfg(diffq: float | None = None, qat: int | None = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(diffq=diffq, qat=qat, min_size=0.001, group_size=8)


def test_quantizers() -> None:
    model = nn.Sequential(nn.Conv1d(16, 32, 8), nn.Conv1d(32, 4, 1))
    assert get_quantizer(model, quant_cfg()) is None
    assert model_size(model) == pytest.approx(sum(p.numel() for p in model.parameters())
                                              * 4 / 2 ** 20)
    optimizer = torch.optim.Adam(model.parameters())
    quantizer = get_quantizer(model, quant_cfg(diffq=1e-4), optimizer)
    assert len(optimizer.param_groups) == 2  # the bits of DiffQ join the optimizer
    assert any(name.endswith("_diffq") for name, _ in model.named_parameters())
    assert 0 < model_size(model, quantizer) < 32 * 16 * 8 * 4 / 2 ** 20
    qat_model = nn.Sequential(nn.Conv1d(16, 32, 8))
    qat = get_quantizer(qat_model, quant_cfg(qat=4))
    assert qat is not None and qat.qat and qat.bits == 4
    with pytest.raises(ConfigError, match="choose one quantizer"):
        get_quantizer(model, quant_cfg(diffq=1e-4, qat=8))


def test_averager_and_single_process_distrib() -> None:
    averager = Averager()
    averager.update({"loss": 1., "nsdr": 4.})
    averager.update({"loss": 3., "nsdr": 0.})
    assert averager.mean() == {"loss": 2., "nsdr": 2.}  # each batch counts once
    assert averager.reduce() == averager.mean()
    finite = Averager(finite_only=True)  # fp16: overflowed batches stay out of the means
    finite.update({"loss": 1., "grad": math.inf})
    finite.update({"loss": math.nan, "grad": math.inf})
    finite.update({"loss": 3.})
    means = finite.mean()
    assert means["loss"] == 2. and math.isnan(means["grad"])
    assert finite.counts == {"loss": 2, "grad": 0}
    assert distrib.world_size() == 1 and distrib.rank() == 0 and distrib.is_master()
    assert distrib.total(2.5) == 2.5
    model = nn.Linear(2, 2)
    assert distrib.wrap(model) is model
    dataset = torch.utils.data.TensorDataset(torch.arange(5))
    assert len(distrib.loader(dataset, batch_size=2, shuffle=False)) == 3
    sampler = distrib.ShardSampler(dataset, rank=1, world_size=2)
    assert list(sampler) == [1, 3] and len(sampler) == 2
