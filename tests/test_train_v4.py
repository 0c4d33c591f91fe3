"""The Demucs v4 training options of demucs.train: the transformer's optimizer group and
the dataset settings `dset.use_musdb`, `dset.wav2` (`wav2_weight`, `wav2_valid`),
`dset.valid_samples` and `dset.backend`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, Subset

from demucs import checks, train
from demucs.errors import ConfigError
from demucs.htdemucs import HTDemucs
from demucs.train import main
from demucs.wav import Wavset

from helpers import SOURCES, write_musdb, write_track
from tools.synth_dataset import generate_dataset

VALID_TRACK = "Actions - One Minute Smile"  # an official MusDB validation track
RATE = 1000  # samples per second of the tiny datasets: 2 s tracks, 1 s examples


def cfg_of(*argv: str) -> DictConfig:
    return main.get_xp(list(argv)).cfg


# ---------------------------------------------------------------------------------------
# The model


@pytest.fixture(scope="module")
def manifest_v4(reference_dir: Path) -> list[dict[str, tp.Any]]:
    cases = json.loads((reference_dir / "v4" / "golden" / "manifest_v4.json").read_text())
    assert cases
    return cases


def test_model_kwargs_match_reference(manifest_v4: list[dict[str, tp.Any]]) -> None:
    """The v4 golden models were built from these XPs: same class, same arguments."""
    for case in manifest_v4:
        cfg = cfg_of(*case["xp_argv"])
        assert cfg.model == case["model"] == "htdemucs", case["name"]
        kwargs = train.get_model_kwargs(cfg)
        assert kwargs == case["kwargs"], case["name"]
        assert list(kwargs) == list(case["kwargs"]), case["name"]


def test_golden_models_build(manifest_v4: list[dict[str, tp.Any]]) -> None:
    for case in manifest_v4:
        model = train.get_model(cfg_of(*case["xp_argv"]))
        assert type(model) is HTDemucs, case["name"]
        assert len(model.state_dict()) == case["num_state_tensors"], case["name"]
        assert model.segment == case["segment"] and model.use_train_segment


def test_use_train_segment_false(manifest_v4: list[dict[str, tp.Any]]) -> None:
    cfg = cfg_of(*manifest_v4[0]["xp_argv"], "use_train_segment=false")
    assert train.get_model_kwargs(cfg)["use_train_segment"] is False
    assert not train.get_model(cfg).use_train_segment
    hdemucs = cfg_of("model=hdemucs", "use_train_segment=false")  # HDemucs has no such option
    assert "use_train_segment" not in train.get_model_kwargs(hdemucs)


def test_train_segment_needs_chunked_validation() -> None:
    with pytest.raises(ConfigError, match="valid_apply=false: model=htdemucs runs on at most"):
        main.get_xp(["model=htdemucs", "valid_apply=false"])
    main.get_xp(["model=htdemucs", "valid_apply=false", "use_train_segment=false"])
    main.get_xp(["model=hdemucs", "valid_apply=false"])
    main.get_xp(["model=htdemucs", "test.split=false"])  # apply_model cuts it anyway


def test_htdemucs_transformer_group(manifest_v4: list[dict[str, tp.Any]]) -> None:
    cfg = cfg_of(*manifest_v4[0]["xp_argv"], "htdemucs.t_lr=1e-4", "optim.weight_decay=0.1")
    model = train.get_model(cfg)
    assert isinstance(model, HTDemucs) and model.crosstransformer is not None
    rest, transformer = train.get_optimizer(model, cfg).param_groups
    assert ids(transformer["params"]) == ids(model.crosstransformer.parameters())
    assert transformer["lr"] == 1e-4 and transformer["weight_decay"] == 0.0
    assert rest["lr"] == 3e-4 and rest["weight_decay"] == 0.1
    assert len(rest["params"]) + len(transformer["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------
# Optimizer


class WithTransformer(torch.nn.Module):
    """Stands for an HTDemucs: a `crosstransformer` among other layers."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(3, 4)
        self.crosstransformer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        self.decoder = torch.nn.Linear(2, 3)


def htdemucs_cfg(*argv: str) -> DictConfig:
    cfg = cfg_of("optim.lr=0.01", "optim.weight_decay=0.5", *argv)
    cfg.model = "htdemucs"  # set after get_xp: the group must not depend on the registry
    return cfg


def ids(params: tp.Iterable[torch.nn.Parameter]) -> list[int]:
    return [id(param) for param in params]


def test_transformer_has_its_own_group() -> None:
    model = WithTransformer()
    optimizer = train.get_optimizer(model, htdemucs_cfg("htdemucs.t_lr=0.001"))
    rest, transformer = optimizer.param_groups
    assert ids(transformer["params"]) == ids(model.crosstransformer.parameters())
    assert ids(rest["params"]) == ids([*model.encoder.parameters(),
                                       *model.decoder.parameters()])
    assert transformer["lr"] == 0.001 and transformer["weight_decay"] == 0.0
    assert rest["lr"] == 0.01 and rest["weight_decay"] == 0.5


def test_transformer_group_defaults_to_the_global_settings() -> None:
    optimizer = train.get_optimizer(WithTransformer(),
                                    htdemucs_cfg("htdemucs.t_weight_decay=null"))
    rest, transformer = optimizer.param_groups
    assert transformer["lr"] == rest["lr"] == 0.01
    assert transformer["weight_decay"] == rest["weight_decay"] == 0.5


def test_models_without_transformer_have_one_group() -> None:
    optimizer = train.get_optimizer(torch.nn.Linear(3, 2), htdemucs_cfg("htdemucs.t_lr=0.1"))
    group, = optimizer.param_groups
    assert group["lr"] == 0.01 and len(group["params"]) == 2


# ---------------------------------------------------------------------------------------
# Config checks


@pytest.mark.parametrize("argv, message", [
    (["dset.use_musdb=false"], "dset.use_musdb=false leaves no training data"),
    (["dset.valid_samples=0"], "dset.valid_samples=0 must be a positive number"),
    (["dset.backend=sox_io"], "dset.backend='sox_io' is not valid; choose one of: soundfile"),
    (["dset.wav2=/x", "+dset.wav2_weight=1.5"], "dset.wav2_weight=1.5 must be strictly"),
])
def test_bad_dset_settings(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        main.get_xp(argv)


def test_backend_is_not_in_the_signature() -> None:
    xp = main.get_xp(["dset.backend=soundfile"])
    assert xp.cfg.dset.backend == "soundfile" and xp.sig == main.get_xp([]).sig


def test_wav2_folder_is_checked(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    cfg = cfg_of(f"dset.musdb={tmp_path}", f"dset.wav2={missing}")
    with pytest.raises(ConfigError, match=f"dset.wav2='{missing}': no such folder"):
        checks.check_dataset_paths(cfg.dset)


# ---------------------------------------------------------------------------------------
# Datasets


def write_wavset(root: Path, train: int, valid: int, seed: int = 5) -> Path:
    """A wav dataset: `train` and `valid` tracks of 2 s (2 examples each) at RATE."""
    rng = np.random.default_rng(seed)
    for split, count in [("train", train), ("valid", valid)]:
        for k in range(count):
            write_track(root / split / f"{root.name}_{k}",
                        {source: rng.normal(0, 0.1, (2 * RATE, 2)) for source in SOURCES},
                        samplerate=RATE)
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """MusDB (1 train and 1 valid track), `wav` (2 train, 1 valid), `wav2` (3, 2)."""
    write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1"], length=2 * RATE)
    write_wavset(tmp_path / "wav", 2, 1)
    write_wavset(tmp_path / "wav2", 3, 2, seed=6)
    return tmp_path


def datasets(data: Path, *argv: str) -> tuple[tp.Any, tp.Any]:
    cfg = cfg_of(f"dset.musdb={data / 'musdb'}", f"dset.metadata={data / 'metadata'}",
                 f"dset.samplerate={RATE}", "dset.segment=1", "dset.shift=1",
                 "augment.repitch.proba=0", *argv)
    return train.get_datasets(cfg)


def tracks(dataset: tp.Any) -> list[str]:
    """The track of each example of a Wavset, a ConcatDataset or a Subset of them."""
    if isinstance(dataset, Wavset):
        return [dataset.locate(index)[0] for index in range(len(dataset))]
    if isinstance(dataset, Subset):
        return [tracks(dataset.dataset)[index] for index in dataset.indices]
    assert isinstance(dataset, ConcatDataset)
    return [name for part in dataset.datasets for name in tracks(part)]


def test_musdb_and_wav(data: Path) -> None:
    train_set, valid_set = datasets(data, f"dset.wav={data / 'wav'}")
    assert sorted(tracks(train_set)) == ["t1"] * 2 + ["wav_0"] * 2 + ["wav_1"] * 2
    assert tracks(valid_set) == [VALID_TRACK, "wav_0"]


def test_without_musdb(data: Path) -> None:
    train_set, valid_set = datasets(data, f"dset.wav={data / 'wav'}", "dset.use_musdb=false")
    assert isinstance(train_set, Wavset) and isinstance(valid_set, Wavset)
    assert sorted(tracks(train_set)) == ["wav_0"] * 2 + ["wav_1"] * 2
    assert tracks(valid_set) == ["wav_0"]
    assert train_set[0].shape == (4, 2, RATE)


def test_wav2_added_as_is(data: Path) -> None:
    train_set, valid_set = datasets(data, f"dset.wav2={data / 'wav2'}")
    assert sorted(tracks(train_set)) == ["t1"] * 2 + [f"wav2_{k}" for k in range(3) for _ in "ab"]
    assert tracks(valid_set) == [VALID_TRACK]  # wav2_valid: false


@pytest.mark.parametrize("weight, repeats, share", [
    (0.5, (3, 1), 0.5),     # 2 MusDB examples repeated 3 times, 6 of wav2
    (0.9, (1, 3), 0.9),     # wav2 repeated 3 times (upstream cannot go above 0.75 here)
    (0.75, (1, 1), 0.75),   # the natural share
])
def test_wav2_weight(data: Path, weight: float, repeats: tuple[int, int],
                     share: float) -> None:
    train_set, _ = datasets(data, f"dset.wav2={data / 'wav2'}", f"+dset.wav2_weight={weight}")
    names = tracks(train_set)
    assert names.count("t1") == 2 * repeats[0] and len(names) == 2 * repeats[0] + 6 * repeats[1]
    assert sum(name.startswith("wav2_") for name in names) / len(names) == share


def test_wav2_valid(data: Path) -> None:
    wav2 = [f"dset.wav2={data / 'wav2'}", "+dset.wav2_valid=true"]
    _, valid_set = datasets(data, *wav2)
    assert tracks(valid_set)[0] == VALID_TRACK
    assert sorted(tracks(valid_set)[1:]) == ["wav2_0", "wav2_1"]
    _, valid_set = datasets(data, *wav2, "+dset.wav2_weight=0.5")
    names = tracks(valid_set)  # as many wav2 tracks as the others, drawn at random
    assert names[0] == VALID_TRACK and len(names) == 2 and names[1] in ("wav2_0", "wav2_1")


def test_valid_samples(data: Path) -> None:
    wav = [f"dset.wav={data / 'wav'}", f"dset.wav2={data / 'wav2'}", "+dset.wav2_valid=true"]
    _, everything = datasets(data, *wav)
    _, subset = datasets(data, *wav, "dset.valid_samples=2")
    _, again = datasets(data, *wav, "dset.valid_samples=2")
    assert len(tracks(everything)) == 4
    assert isinstance(subset, Subset) and len(subset) == 2
    assert set(tracks(subset)) < set(tracks(everything)) and subset.indices == again.indices
    _, segments = datasets(data, *wav, "dset.valid_samples=5", "dset.full_cv=false")
    assert len(segments) == 5 and segments[0].shape == (5, 2, RATE)  # mixture + 4 sources
    _, whole = datasets(data, *wav, "dset.valid_samples=100")
    assert tracks(whole) == tracks(everything)


def test_mmi_group_builds(data: Path) -> None:
    train_set, valid_set = datasets(data, "dset=extra_mmi_goodclean", f"dset.wav={data / 'wav'}",
                                    f"dset.wav2={data / 'wav2'}")
    assert len(train_set) == 2 + 4 + 6
    assert sorted(tracks(valid_set)) == sorted([VALID_TRACK, "wav_0"])  # fewer than 100


def test_sdx23_group_builds(data: Path) -> None:
    train_set, _ = datasets(data, "dset=sdx23_bleeding", f"dset.wav={data / 'wav'}")
    assert sorted(tracks(train_set)) == ["wav_0"] * 2 + ["wav_1"] * 2


# ---------------------------------------------------------------------------------------
# A real training


@pytest.mark.slow
def test_htdemucs_trains(tmp_path: Path) -> None:
    """`python -m demucs.train` trains a tiny HTDemucs at its training length, with its
    transformer group, a second wav dataset and a subset of the valid set."""
    generate_dataset(tmp_path / "musdb", tracks=3, seconds=3, valid_tracks=1, test_tracks=1)
    generate_dataset(tmp_path / "wav2", tracks=2, seconds=3, seed=1, valid_tracks=0,
                     test_tracks=2)
    (tmp_path / "wav2" / "test").rename(tmp_path / "wav2" / "valid")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    env.update(MUSDB_PATH=str(tmp_path / "musdb"), METADATA_PATH=str(tmp_path / "metadata"))
    argv = ["model=htdemucs", "htdemucs.channels=8", "htdemucs.t_layers=1",
            "htdemucs.nfft=1024", "htdemucs.t_lr=1e-4", "dset.segment=2", "dset.shift=1",
            f"dset.wav2={tmp_path / 'wav2'}", "+dset.wav2_valid=true", "dset.valid_samples=2",
            "batch_size=2", "epochs=2", "max_batches=2", "misc.num_workers=0",
            "test.sdr=false", "augment.remix.group_size=2", "augment.repitch.proba=0"]
    result = subprocess.run([sys.executable, "-m", "demucs.train", *argv], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder, = (tmp_path / "outputs" / "xps").iterdir()
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == 2 and "nsdr" in history[-1]["test"]
    package = torch.load(folder / "best.th", map_location="cpu", weights_only=False)
    assert package["klass"] is HTDemucs and package["kwargs"]["t_lr"] == 1e-4
    assert package["kwargs"]["segment"] == 1  # what it trained on: dset.segment - dset.shift
