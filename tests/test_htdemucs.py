"""HTDemucs (Demucs v4): golden comparisons with upstream Demucs 4, the options of the
model and its transformer, packages, and chunked inference with a length limit.

Agreement with the golden outputs: max|ours - golden| <= 1e-4 * max|golden| + 1e-5.
"""
from __future__ import annotations

import fractions
import inspect
import json
import random
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from demucs.apply import BagOfModels, apply_model, max_allowed_segment
from demucs.errors import ConfigError
from demucs.htdemucs import HTDemucs
from demucs.models import model_class
from demucs.states import load_model, load_package, serialize_model
from demucs.transformer import CrossTransformerEncoder

from helpers import (SOURCES, assert_tensor_close, noise, normalized, tiny_hdemucs,
                     tiny_htdemucs)

SIX = [*SOURCES, "guitar", "piano"]
# The packages of the reference's v4/golden/ with the sources and the training length
# (`kwargs['segment']`, seconds) each holds: the manifest's `segment` for the four XP
# cases, which upstream stores as the int 1; 3/4 s as a Fraction for the exported one.
PACKAGES: tp.Dict[str, tp.Tuple[tp.List[str], tp.Union[int, fractions.Fraction]]] = {
    "v4_htdemucs": (SOURCES, 1),
    "v4_htdemucs_6s": (SIX, 1),
    "v4_htdemucs_bottom": (SOURCES, 1),
    "v4_htdemucs_wiener": (SOURCES, 1),
    "v4_htdemucs_exported": (SOURCES, fractions.Fraction(3, 4)),
}
CASES = list(PACKAGES)
# Options tried on `tiny_htdemucs`.
OPTIONS: tp.Dict[str, tp.Dict[str, tp.Any]] = {
    "sin": {},
    "cape_cross_first": {"t_emb": "cape", "t_cross_first": True, "t_layers": 3},
    "scaled_bottom_group_norms": {"t_emb": "scaled", "bottom_channels": 32,
                                  "t_layer_scale": False, "t_norm_in": False,
                                  "t_norm_in_group": True, "t_group_norm": True},
    "wiener_post_norm_relu": {"cac": False, "wiener_iters": 1, "end_iters": 1,
                              "t_norm_first": False, "t_norm_out": False, "t_gelu": False},
    "mixture_phase": {"cac": False, "wiener_iters": -1, "end_iters": -1},
    "wiener_residual": {"cac": False, "wiener_residual": True},
    "multi_freqs": {"multi_freqs": [0.5], "multi_freqs_depth": 2},
    "channels_time_bottom": {"channels_time": 16, "bottom_channels": 32},
    "no_transformer": {"t_layers": 0, "channels_time": 16},
    "merged_branches": {"nfft": 1024},
    "dconv_both_context_no_freq_emb": {"dconv_mode": 3, "context_enc": 1, "norm_starts": 2,
                                       "freq_emb": 0},
    "dropout_sin_shift": {"t_dropout": 0.1, "t_sin_random_shift": 3, "t_hidden_scale": 2.},
}


def forward(model: nn.Module, mix: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(mix)


@pytest.fixture(scope="module")
def golden(reference_dir: Path) -> Path:
    return reference_dir / "v4" / "golden"


Models = tp.Dict[str, HTDemucs]


@pytest.fixture(scope="module")
def models(golden: Path) -> Models:
    """Every golden package, loaded safely (no trusted unpickling)."""
    loaded = {name: load_model(golden / f"{name}.th").eval() for name in CASES}
    assert all(isinstance(model, HTDemucs) for model in loaded.values())
    return tp.cast(Models, loaded)


# ---------------------------------------------------------------------------------------
# Golden comparisons


def test_constructor_takes_the_manifest_kwargs(golden: Path) -> None:
    manifest = json.loads((golden / "manifest_v4.json").read_text())
    params = set(inspect.signature(HTDemucs).parameters)
    for case in manifest:
        assert case["model"] == "htdemucs" and model_class("htdemucs") is HTDemucs
        assert params - {"use_train_segment"} == set(case["kwargs"]), case["name"]


@pytest.mark.parametrize("name", CASES)
def test_state_keys_and_shapes(name: str, golden: Path, models: Models) -> None:
    expected = json.loads((golden / f"{name}.state_keys.json").read_text())
    ours = {key: list(value.shape) for key, value in models[name].state_dict().items()}
    assert ours == expected


@pytest.mark.parametrize("name", CASES)
def test_forward_on_the_training_length(name: str, golden: Path, models: Models) -> None:
    io = torch.load(golden / f"{name}.io.pt")
    length = int(models[name].segment * models[name].samplerate)
    assert_tensor_close(forward(models[name], io["mix"][None, :, :length])[0], io["forward"])


@pytest.mark.parametrize("name", CASES)
def test_apply_split_over_the_whole_mix(name: str, golden: Path, models: Models) -> None:
    io = torch.load(golden / f"{name}.io.pt")
    out = apply_model(models[name], normalized(io["mix"])[None], shifts=0, split=True,
                      overlap=0.25)[0]
    assert_tensor_close(out, io["apply_split_overlap025"])


def test_bag_of_two_htdemucs(golden: Path, models: Models) -> None:
    spec = yaml.safe_load((golden / "v4_bag.yaml").read_text())
    bag = BagOfModels([models[name] for name in spec["models"]], spec["weights"],
                      spec.get("segment"))
    io = torch.load(golden / "v4_bag.io.pt")
    out = apply_model(bag, normalized(io["mix"])[None], shifts=0, split=True, overlap=0.25)
    assert_tensor_close(out[0], io["apply_split_overlap025"])


def test_exported_package_has_fraction_segment_and_half_state(golden: Path,
                                                             models: Models) -> None:
    package = load_package(golden / "v4_htdemucs_exported.th")  # safe loading
    assert package["kwargs"]["segment"] == fractions.Fraction(3, 4)
    assert all(value.dtype == torch.half for value in package["state"].values())
    model = models["v4_htdemucs_exported"]
    assert model.segment == fractions.Fraction(3, 4)
    assert model.valid_length(1000) == 33075 and max_allowed_segment(model) == 0.75


def test_all_v4_packages_load_safely_as_the_models_described(
        golden: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v4/golden/ holds exactly `PACKAGES` (an empty or missing folder fails); each loads
    through torch's safe loader alone and rebuilds the HTDemucs the reference describes."""
    assert sorted(path.stem for path in golden.glob("*.th")) == sorted(PACKAGES)
    manifest = {case["name"]: case
                for case in json.loads((golden / "manifest_v4.json").read_text())}
    assert set(manifest) == set(PACKAGES) - {"v4_htdemucs_exported"}
    safe_flags: tp.List[tp.Any] = []
    torch_load = torch.load

    def spy(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        safe_flags.append(kwargs.get("weights_only"))
        return torch_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    for name, (sources, segment) in PACKAGES.items():
        safe_flags.clear()
        package = load_package(golden / f"{name}.th")
        assert safe_flags == [True], name
        kwargs = package["kwargs"]
        assert package["klass"] is HTDemucs, name
        assert type(kwargs["segment"]) is type(segment) and kwargs["segment"] == segment, name
        if name in manifest:
            assert fractions.Fraction(manifest[name]["segment"]) == segment, name
            assert manifest[name]["kwargs"]["sources"] == sources, name
        model = load_model(package)
        assert type(model) is HTDemucs and model.sources == sources, name
        assert (model.samplerate, model.audio_channels) == (44100, 2), name
        assert model.segment == segment and max_allowed_segment(model) == float(segment)


# ---------------------------------------------------------------------------------------
# Options of the model and of the transformer


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_builds_trains_and_separates(name: str) -> None:
    model = tiny_htdemucs(**OPTIONS[name])
    out = model(noise(2, 4000)[None])  # training mode: records the training length
    out.square().mean().backward()
    assert model.segment == fractions.Fraction(1, 2)
    model.eval()
    out = forward(model, torch.stack([noise(2, 3000, seed=1), noise(2, 3000, seed=2)]))
    assert out.shape == (2, len(SOURCES), 2, 3000) and torch.isfinite(out).all()


@pytest.mark.parametrize("option", ["t_sparse_self_attn", "t_sparse_cross_attn"])
def test_sparse_attention_is_a_config_error(option: str) -> None:
    sparse: tp.Dict[str, tp.Any] = {option: True}
    with pytest.raises(ConfigError, match="xformers"):
        tiny_htdemucs(**sparse)
    tiny_htdemucs(t_layers=0, **sparse)  # no transformer: the option is moot


@pytest.mark.parametrize("kwargs, match", [
    ({"nfft": 512}, "merge"),
    ({"nfft": 1024, "depth": 5}, "exhausted"),
    ({"channels_time": 16}, "bottom_channels"),
    ({"t_emb": "rope"}, "t_emb"),
    ({"t_heads": 7}, "heads"),
])
def test_inconsistent_structures_are_config_errors(kwargs: tp.Dict[str, tp.Any],
                                                   match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_htdemucs(**kwargs)


def cape_encoder() -> CrossTransformerEncoder:
    return CrossTransformerEncoder(dim=16, emb="cape", num_heads=2, num_layers=1)


def test_cape_augmentation_only_in_training() -> None:
    encoder = cape_encoder().eval()
    first = encoder._pos_embedding(50, 3, 16, "cpu")
    assert torch.equal(first, encoder._pos_embedding(50, 3, 16, "cpu"))
    assert torch.equal(first[:, 0], first[:, 2])  # no per-item augmentation
    encoder.train()
    augmented = encoder._pos_embedding(50, 3, 16, "cpu")
    assert augmented.shape == first.shape == (50, 3, 16)
    assert not torch.allclose(augmented[:, 0], augmented[:, 1])  # per batch item
    assert not torch.allclose(augmented, encoder._pos_embedding(50, 3, 16, "cpu"))
    encoder.cape_augment = False
    assert torch.equal(first, encoder._pos_embedding(50, 3, 16, "cpu"))


def test_cape_augmentation_changes_training_outputs_only() -> None:
    model = tiny_htdemucs(t_emb="cape")
    mix = noise(2, 4000)[None]
    with torch.no_grad():
        assert not torch.equal(model(mix), model(mix))
    model.eval()
    assert torch.equal(forward(model, mix), forward(model, mix))


# ---------------------------------------------------------------------------------------
# Training length (use_train_segment)


def test_short_input_is_padded_to_the_training_length() -> None:
    model = tiny_htdemucs().eval()
    mix = noise(2, 2500)[None]
    padded = torch.nn.functional.pad(mix, (0, 4000 - 2500))
    assert torch.equal(forward(model, mix), forward(model, padded)[..., :2500])
    assert model.valid_length(2500) == 4000
    with pytest.raises(ValueError, match="longer than the training length"):
        forward(model, noise(2, 4001)[None])


def test_without_use_train_segment_any_length_runs() -> None:
    model = tiny_htdemucs(use_train_segment=False).eval()
    assert model.valid_length(6000) == 6000 and max_allowed_segment(model) == float("inf")
    assert forward(model, noise(2, 6000)[None]).shape == (1, len(SOURCES), 2, 6000)


def test_training_forward_records_its_length_in_packages() -> None:
    model = tiny_htdemucs(segment=1)
    model(noise(2, 3000)[None])
    assert model.segment == fractions.Fraction(3, 8)
    package = serialize_model(model, {}, half=False)
    assert package["kwargs"]["segment"] == fractions.Fraction(3, 8)
    assert load_model(package).segment == fractions.Fraction(3, 8)


def test_half_package_round_trip(tmp_path: Path) -> None:
    model = tiny_htdemucs(segment=fractions.Fraction(1, 2)).eval()
    path = tmp_path / "htdemucs.th"
    torch.save(serialize_model(model, {"model": "htdemucs"}, half=True), path)
    loaded = load_model(path).eval()
    mix = noise(2, 4000)[None]
    assert loaded.segment == fractions.Fraction(1, 2)
    torch.testing.assert_close(forward(loaded, mix), forward(model, mix), atol=2e-3, rtol=0)


# ---------------------------------------------------------------------------------------
# Chunked inference


class LengthSpy:
    """Records the input lengths that reach a model's forward."""

    def __init__(self, model: nn.Module) -> None:
        self.lengths: tp.List[int] = []
        model.register_forward_pre_hook(lambda _, inputs: self.lengths.append(
            inputs[0].shape[-1]))


@pytest.mark.parametrize("shifts, split", [(0, True), (1, True), (2, False), (0, False)])
def test_apply_never_exceeds_the_training_length(shifts: int, split: bool) -> None:
    model = tiny_htdemucs().eval()
    spy = LengthSpy(model)
    random.seed(0)
    out = apply_model(model, noise(2, 11000)[None], shifts=shifts, split=split)
    assert out.shape == (1, len(SOURCES), 2, 11000)
    assert spy.lengths and set(spy.lengths) == {4000}


def test_segment_argument_is_bounded_by_the_model() -> None:
    model = tiny_htdemucs().eval()
    spy = LengthSpy(model)
    out = apply_model(model, noise(2, 5000)[None], shifts=0, segment=0.25)
    assert out.shape == (1, len(SOURCES), 2, 5000)
    assert set(spy.lengths) == {2000}  # 0.25 s chunks, that the model pads itself
    with pytest.raises(ValueError, match="longer than"):
        apply_model(model, noise(2, 5000)[None], shifts=0, segment=0.75)


def test_bag_of_hdemucs_and_htdemucs() -> None:
    v3 = tiny_hdemucs(depth=4, samplerate=8000, segment=1.0, nfft=1024).eval()
    v4 = tiny_htdemucs().eval()
    weights = [[1., 0., 1., 1.], [0., 1., 1., 3.]]  # (models, S)
    bag = BagOfModels([v3, v4], weights=weights, segment=0.75)
    assert v3.segment == 0.75 and v4.segment == 0.5  # never longer than the training
    assert bag.max_allowed_segment == 0.5
    spy = LengthSpy(v4)
    mix = noise(2, 9000)[None]
    out = apply_model(bag, mix, shifts=0)
    assert set(spy.lengths) == {4000}
    members = [apply_model(model, mix, shifts=0) for model in (v3, v4)]  # (B, S, C, T)
    for s in range(len(SOURCES)):
        total = sum(weight[s] for weight in weights)
        expected = sum(weight[s] * member[:, s] for weight, member in zip(weights, members))
        torch.testing.assert_close(out[:, s], expected / total, msg=SOURCES[s])


def test_bag_without_htdemucs_has_no_limit() -> None:
    bag = BagOfModels([tiny_hdemucs(depth=4, nfft=1024)])
    assert bag.max_allowed_segment == float("inf")
