"""The model registry (demucs.models): the config names, the builder of demucs.train and the
allow-list of safe package loading all agree with it."""
from __future__ import annotations

import fractions

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from demucs import checks, models, states, train
from demucs.errors import ConfigError

from helpers import imported_modules, same_state

# Small versions of each registered model; a name missing here builds at its config size.
SMALL = {
    "demucs": ["demucs.channels=4", "demucs.depth=2", "dset.segment=2"],
    "hdemucs": ["hdemucs.channels=4", "hdemucs.depth=4", "hdemucs.nfft=512", "model_segment=1"],
    "htdemucs": ["htdemucs.channels=8", "htdemucs.t_layers=1", "model_segment=1"],
}


def cfg_of(name: str) -> DictConfig:
    return train.main.get_xp([f"model={name}", *SMALL.get(name, [])]).cfg


def test_registry_lists_demucs_and_hdemucs() -> None:
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    assert models.model_names()[:2] == ["demucs", "hdemucs"]
    assert models.model_class("demucs") is Demucs
    assert models.model_class("hdemucs") is HDemucs
    assert models.model_classes() == [models.model_class(n) for n in models.model_names()]


@pytest.mark.parametrize("name", ["tasnet", "", "Demucs"])
def test_unknown_name_lists_the_registered_ones(name: str) -> None:
    with pytest.raises(ConfigError, match=f"model='{name}'.*demucs, hdemucs"):
        models.model_class(name)
    cfg = cfg_of("demucs")
    cfg.model = name
    with pytest.raises(ConfigError, match="demucs, hdemucs"):
        checks.check_config(cfg)


def test_allow_list_is_the_registry_and_the_quantizers() -> None:
    # v4 packages store their training segment as a Fraction.
    expected = models.model_classes() + states.quantizer_classes() + [fractions.Fraction]
    assert states.safe_globals() == expected


def test_default_model_is_registered_and_every_name_has_a_config_section() -> None:
    cfg = train.main.get_xp([]).cfg
    assert cfg.model in models.model_names()
    for name in models.model_names():
        assert name in cfg, f"conf/config.yaml has no `{name}:` section"


@pytest.mark.parametrize("name", models.model_names())
def test_every_registered_model_builds_from_its_config(name: str) -> None:
    model = train.get_model(cfg_of(name))
    assert type(model) is models.model_class(name)
    assert type(model) in states.safe_globals()


@pytest.mark.parametrize("name", models.model_names())
def test_package_of_every_registered_model_loads_safely(name: str, tmp_path: Path) -> None:
    cfg = cfg_of(name)
    torch.manual_seed(0)
    model = train.get_model(cfg).eval()
    path = tmp_path / f"{name}.th"
    states.save_atomic(states.serialize_model(model, cfg, half=False), path)
    loaded = states.load_model(path)  # weights_only=True with the allow-list
    assert type(loaded) is type(model)
    assert same_state(loaded, model)


@pytest.mark.slow
def test_registry_is_a_leaf_module() -> None:
    loaded = {m for m in imported_modules("demucs.models") if m.startswith("demucs.")}
    assert loaded <= {"demucs.models", "demucs.demucs", "demucs.hdemucs", "demucs.hlayers",
                      "demucs.htdemucs", "demucs.transformer", "demucs.spec", "demucs.wiener",
                      "demucs.utils", "demucs.errors", "demucs.norm", "demucs.lean",
                      "demucs.roformer", "demucs.bs_roformer", "demucs.mel_roformer",
                      "demucs.scnet", "demucs.losses"}, loaded
