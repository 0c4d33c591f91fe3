"""Tests of demucs.wav: examples, metadata cache, dataset builders and bad input."""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import julius
import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from demucs import wav
from demucs.errors import ConfigError, DatasetError
from demucs.wav import Wavset, build_metadata, get_musdb_wav_datasets, get_wav_datasets

from helpers import SOURCES, write_musdb, write_track
# The `dset` values of the base config (reference config_defaults.txt), paths excepted.
BASE_DSET = {"musdb": None, "musdb_samplerate": 44100, "wav": None, "segment": 11, "shift": 1,
             "train_valid": False, "full_cv": True, "samplerate": 44100, "channels": 2,
             "normalize": True, "metadata": "./metadata", "sources": SOURCES}
VALID_TRACK = "Actions - One Minute Smile"  # an official MusDB validation track


def ramp_stems(length: int, channels: int = 1, sources: tp.Sequence[str] = SOURCES,
               ) -> dict[str, np.ndarray]:
    """Stems whose value tells the sample index: source k is (k + 1) * index / 1e5."""
    index = np.arange(length)[:, None] * np.ones((1, channels))
    return {name: (k + 1) * index / 1e5 for k, name in enumerate(sources)}


def make_dset(tmp_path: Path, **overrides: tp.Any) -> tp.Any:
    return OmegaConf.create({**BASE_DSET, "metadata": str(tmp_path / "metadata"), **overrides})


# ---------------------------------------------------------------------------------------
# Golden data of the original

GOLDEN_TRACK_ORDER = ["tone_b", "tone_c", "tone_a"]  # os.walk order where the golden was made


@pytest.fixture(scope="module")
def tone_dataset(tmp_path_factory: pytest.TempPathFactory, reference_dir: Path) -> Path:
    script = reference_dir / "golden_data" / "make_tone_dataset.py"
    out = tmp_path_factory.mktemp("tone")
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out


def golden_cases() -> list[str]:
    return ["seg1.5_shift0.5", "seg2_norm0_mono", "seg5_sr16k"]


def base_dset_from_reference(reference_dir: Path) -> dict[str, tp.Any]:
    values = {}
    for line in (reference_dir / "config_defaults.txt").read_text().splitlines():
        key, _, value = line.partition(" = ")
        if key.startswith("dset."):
            values[key[len("dset."):]] = ast.literal_eval(value)
    return values


def _our_index(dataset: Wavset, golden_index: int) -> int:
    """Our index of the example that the original numbered `golden_index`.

    Both follow the file system's listing order of the tracks; where it differs from the one
    the golden was made on, map through the track names.
    """
    counts = dict(zip(dataset.tracks, dataset.num_examples))
    for name in GOLDEN_TRACK_ORDER:
        if golden_index < counts[name]:
            start = dataset.tracks.index(name)
            return sum(dataset.num_examples[:start]) + golden_index
        golden_index -= counts[name]
    raise IndexError(golden_index)


def check_fingerprint(example: torch.Tensor, golden: dict[str, tp.Any]) -> None:
    assert tuple(example.shape) == tuple(golden["shape"])
    torch.testing.assert_close(example[..., :256], golden["head"].float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(example[..., -256:], golden["tail"].float(), atol=1e-4, rtol=0)
    for key, values in [("sum", example.double().sum(-1)),
                        ("abs", example.double().abs().sum(-1))]:
        expected = golden[key].double()
        assert (values - expected).abs().max() <= 1e-4 * max(1., expected.abs().max()), key


@pytest.mark.parametrize("case", golden_cases())
def test_golden_examples(case: str, tone_dataset: Path, tmp_path: Path,
                         reference_dir: Path) -> None:
    expected = torch.load(reference_dir / "golden_data" / "expected_examples.pt")[case]
    cfg = OmegaConf.merge({"dset": base_dset_from_reference(reference_dir)},
                          OmegaConf.from_dotlist(expected["config"]))
    cfg.dset.musdb = str(tone_dataset)
    cfg.dset.metadata = str(tmp_path / "metadata")
    train_set, valid_set = get_musdb_wav_datasets(cfg.dset)
    assert len(train_set) == expected["len_train"]
    assert len(valid_set) == expected["len_valid"]
    walk_order = [Path(root).name for root, dirs, _ in os.walk(tone_dataset / "train")
                  if not dirs and Path(root).name != VALID_TRACK]
    assert train_set.tracks == walk_order  # the original's order: the file system's
    for index, golden in expected["train"].items():
        check_fingerprint(train_set[_our_index(train_set, index)], golden)
    check_fingerprint(valid_set[0], expected["valid0"])


# ---------------------------------------------------------------------------------------
# Examples

def test_counts_offsets_and_padding(tmp_path: Path) -> None:
    write_track(tmp_path / "a", ramp_stems(3500))
    metadata = build_metadata(tmp_path, SOURCES)
    dataset = Wavset(tmp_path, metadata, SOURCES, segment=1.2, shift=0.5, normalize=False,
                     samplerate=1000, channels=1)
    assert len(dataset) == math.ceil((3.5 - 1.2) / 0.5) + 1 == 6
    for k in range(6):
        example = dataset[k]  # (S, C, T)
        assert example.shape == (4, 1, 1200)
        valid = min(1200, 3500 - 500 * k)
        expected = (500 * k + torch.arange(valid)) / 1e5
        for s in range(4):
            torch.testing.assert_close(example[s, 0, :valid], (s + 1) * expected)
        assert not example[..., valid:].any()  # zero padding on the right
    with pytest.raises(IndexError):
        dataset[6]


def test_whole_track_and_short_track(tmp_path: Path) -> None:
    write_track(tmp_path / "a", ramp_stems(900))
    metadata = build_metadata(tmp_path, SOURCES)
    whole = Wavset(tmp_path, metadata, SOURCES, normalize=False, samplerate=1000, channels=1)
    assert len(whole) == 1 and whole[0].shape == (4, 1, 900)
    short = Wavset(tmp_path, metadata, SOURCES, segment=2, shift=1, normalize=False,
                   samplerate=1000, channels=1)
    assert len(short) == 1 and short[0].shape == (4, 1, 2000)
    assert not short[0][..., 900:].any()


def test_normalisation_uses_mono_mixture(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stems = {name: rng.normal(0.1, 0.2, (2000, 2)) * [1., 0.5] for name in SOURCES}
    write_track(tmp_path / "a", stems)
    meta = build_metadata(tmp_path, SOURCES)["a"]
    assert meta.mean is not None and meta.std is not None
    mono = sf.read(str(tmp_path / "a" / "mixture.wav"), dtype="float32")[0].mean(1)
    assert meta.mean == pytest.approx(mono.mean(), rel=1e-5)
    assert meta.std == pytest.approx(mono.std(ddof=1), rel=1e-5)
    dataset = Wavset(tmp_path, {"a": meta}, SOURCES, samplerate=1000)
    raw = Wavset(tmp_path, {"a": meta}, SOURCES, samplerate=1000, normalize=False)
    torch.testing.assert_close(dataset[0], (raw[0] - meta.mean) / meta.std)


def test_resampling(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    write_track(tmp_path / "a", {name: rng.normal(0, 0.1, (2205, 2)) for name in SOURCES},
                samplerate=22050)
    metadata = build_metadata(tmp_path, SOURCES)
    native = Wavset(tmp_path, metadata, SOURCES, normalize=False, samplerate=22050)[0]
    up = Wavset(tmp_path, metadata, SOURCES, normalize=False, samplerate=44100)[0]
    assert up.shape == (4, 2, 4410)
    torch.testing.assert_close(up, julius.resample_frac(native, 22050, 44100))
    segments = Wavset(tmp_path, metadata, SOURCES, segment=0.05, shift=0.02, normalize=False,
                      samplerate=16000)
    assert segments[0].shape == (4, 2, 800)


@pytest.mark.parametrize("file_channels,channels", [(1, 2), (2, 1), (3, 2), (2, 2)])
def test_channel_conversion(tmp_path: Path, file_channels: int, channels: int) -> None:
    rng = np.random.default_rng(2)
    stems = {name: rng.normal(0, 0.1, (500, file_channels)) for name in SOURCES}
    write_track(tmp_path / "a", stems)
    metadata = build_metadata(tmp_path, SOURCES)
    example = Wavset(tmp_path, metadata, SOURCES, normalize=False, samplerate=1000,
                     channels=channels)[0]
    raw = torch.from_numpy(np.stack([stems[name].T for name in SOURCES])).float()
    if file_channels == 1:
        expected = raw.expand(-1, channels, -1)
    elif channels == 1:
        expected = raw.mean(1, keepdim=True)
    else:
        expected = raw[:, :channels]
    torch.testing.assert_close(example, expected, atol=1e-6, rtol=0)


def test_stereo_cannot_become_three_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    write_track(tmp_path / "a", {name: rng.normal(0, 0.1, (500, 2)) for name in SOURCES})
    dataset = Wavset(tmp_path, build_metadata(tmp_path, SOURCES), SOURCES, normalize=False,
                     samplerate=1000, channels=3)
    with pytest.raises(DatasetError, match=r"Track 'a': .*drums\.wav: .*2 channels to 3"):
        dataset[0]


def test_metadata_as_plain_dicts(tmp_path: Path) -> None:
    write_track(tmp_path / "a", ramp_stems(1000))
    meta = {"a": {"length": 1000, "samplerate": 1000, "mean": 0., "std": 1.}}
    assert Wavset(tmp_path, meta, SOURCES, samplerate=1000, channels=1)[0].shape == (4, 1, 1000)


# ---------------------------------------------------------------------------------------
# Metadata cache

@pytest.fixture
def count_scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the tracks that get scanned."""
    scanned: list[str] = []
    original = wav._scan_track

    def counting(folder: Path, track: str, *args: tp.Any) -> wav.TrackMeta:
        scanned.append(track)
        return original(folder, track, *args)
    monkeypatch.setattr(wav, "_scan_track", counting)
    return scanned


def test_cache_reused_invalidated_rebuilt(tmp_path: Path, count_scans: list[str]) -> None:
    musdb = write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1", "t2"])
    dset = make_dset(tmp_path, musdb=str(musdb), segment=1, shift=1)
    get_musdb_wav_datasets(dset)
    assert sorted(count_scans) == sorted([VALID_TRACK, "t1", "t2"])
    cache_files = list((tmp_path / "metadata").glob("demucs_musdb_*.json"))
    assert len(cache_files) == 1
    count_scans.clear()
    train, valid = get_musdb_wav_datasets(dset)
    assert count_scans == [] and len(train) == 2 * 3 and len(valid) == 1
    # A changed file: only its track is rescanned, with its new length.
    write_track(musdb / "train" / "t1", {source: np.zeros((5000, 2)) + 0.1
                                          for source in SOURCES})
    train, _ = get_musdb_wav_datasets(dset)
    assert count_scans == ["t1"]
    assert train.metadata["t1"].length == 5000 and len(train) == 3 + 5
    count_scans.clear()
    get_musdb_wav_datasets(dset)
    assert count_scans == []
    # Deleting the cache folder rebuilds everything.
    for path in (tmp_path / "metadata").iterdir():
        path.unlink()
    (tmp_path / "metadata").rmdir()
    get_musdb_wav_datasets(dset)
    assert len(count_scans) == 3 and cache_files[0].is_file()


def test_cache_file_is_json_of_records(tmp_path: Path) -> None:
    musdb = write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1"])
    get_musdb_wav_datasets(make_dset(tmp_path, musdb=str(musdb)))
    cache_file, = (tmp_path / "metadata").glob("demucs_musdb_*.json")
    data = json.loads(cache_file.read_text())
    entry = data["folders"][str(musdb / "train")]["t1"]
    assert entry["length"] == 3000 and entry["samplerate"] == 1000
    assert set(entry["files"]) == {"mixture.wav", *(s + ".wav" for s in SOURCES)}


def original_cache_name(prefix: str, path: str) -> str:
    """The name the original Demucs gives its metadata cache of the dataset `path`."""
    return f"{prefix}_{hashlib.sha1(path.encode()).hexdigest()[:8]}.json"


def test_original_cache_files_are_left_alone(tmp_path: Path) -> None:
    musdb = write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1"])
    folder = tmp_path / "metadata"
    folder.mkdir()
    # What the original writes there: {track: {...}} (musdb) and {split: {track: {...}}} (wav).
    original = folder / original_cache_name("musdb", str(musdb))
    original.write_text(json.dumps({"t1": {"length": 7, "mean": 0, "std": 1,
                                           "samplerate": 44100}}))
    stamp = original.stat().st_mtime_ns
    train, _ = get_musdb_wav_datasets(make_dset(tmp_path, musdb=str(musdb)))
    assert train.metadata["t1"].length == 3000  # scanned, not read from the original's file
    assert json.loads(original.read_text())["t1"]["length"] == 7
    assert original.stat().st_mtime_ns == stamp
    ours, = folder.glob("demucs_musdb_*.json")
    assert ours.name == "demucs_" + original.name


@pytest.mark.parametrize("content", [
    '{"t1": {"length": 7, "mean": 0, "std": 1, "samplerate": 44100}}',  # the original's
    '{"version": 1, "folders": ["not", "a", "dict"]}',
    '{"version": 1, "folders": {"x": {"t1": {"length": "?"}}}}',
    '{"version": 99, "folders": {}}',
    "[1, 2, 3]",
    "not json {",
])
def test_foreign_content_in_our_cache_is_rescanned(tmp_path: Path, count_scans: list[str],
                                                   content: str) -> None:
    musdb = write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1"])
    dset = make_dset(tmp_path, musdb=str(musdb))
    cache = tmp_path / "metadata" / ("demucs_" + original_cache_name("musdb", str(musdb)))
    cache.parent.mkdir()
    cache.write_text(content)
    train, _ = get_musdb_wav_datasets(dset)
    assert sorted(count_scans) == sorted([VALID_TRACK, "t1"])
    assert train.metadata["t1"].length == 3000
    assert json.loads(cache.read_text())["version"] == wav.CACHE_VERSION  # rewritten


def test_new_and_removed_tracks(tmp_path: Path, count_scans: list[str]) -> None:
    musdb = write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1"])
    dset = make_dset(tmp_path, musdb=str(musdb))
    get_musdb_wav_datasets(dset)
    count_scans.clear()
    write_musdb(musdb, ["t2"])
    train, _ = get_musdb_wav_datasets(dset)
    assert count_scans == ["t2"] and set(train.tracks) == {"t1", "t2"}
    for path in (musdb / "train" / "t1").iterdir():
        path.unlink()
    (musdb / "train" / "t1").rmdir()
    train, _ = get_musdb_wav_datasets(dset)
    assert train.tracks == ["t2"]


def test_track_order_kept_from_previous_scan(tmp_path: Path, count_scans: list[str]) -> None:
    for name in ["a", "b", "c"]:
        write_track(tmp_path / name, ramp_stems(100))
    first = build_metadata(tmp_path, SOURCES)
    previous = dict(reversed(list(first.items())))
    write_track(tmp_path / "d", ramp_stems(100))
    count_scans.clear()
    again = build_metadata(tmp_path, SOURCES, previous=previous)
    assert list(again) == list(previous) + ["d"] and count_scans == ["d"]


def test_cache_rescans_for_other_sources(tmp_path: Path, count_scans: list[str]) -> None:
    six = SOURCES + ["guitar", "piano"]
    musdb = write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1"], sources=six)
    get_musdb_wav_datasets(make_dset(tmp_path, musdb=str(musdb)))
    count_scans.clear()
    dset = make_dset(tmp_path, musdb=str(musdb), sources=six, segment=1, samplerate=1000)
    train, valid = get_musdb_wav_datasets(dset)
    assert len(count_scans) == 2  # the cache did not know guitar.wav and piano.wav
    assert train[0].shape == (6, 2, 1000) and valid[0].shape == (7, 2, 3000)


# ---------------------------------------------------------------------------------------
# Dataset builders

@pytest.mark.parametrize("sources", [["vocals", "accompaniment"], SOURCES])
def test_musdb_split_and_sources(tmp_path: Path, sources: list[str]) -> None:
    musdb = write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1", "t2"], sources=sources)
    dset = make_dset(tmp_path, musdb=str(musdb), sources=sources, segment=1, shift=0.5,
                     samplerate=1000)
    train, valid = get_musdb_wav_datasets(dset)
    assert sorted(train.tracks) == ["t1", "t2"] and valid.tracks == [VALID_TRACK]
    assert len(train) == 2 * 5 and train[0].shape == (len(sources), 2, 1000)
    assert valid.sources == ["mixture"] + sources and valid[0].shape == (len(sources) + 1, 2, 3000)
    mixture, stems = valid[0][0], valid[0][1:]
    meta = valid.metadata[VALID_TRACK]
    assert meta.mean is not None and meta.std is not None
    # normalised: (mix - m) / s = sum((x_k - m) / s) + (S - 1) * m / s
    torch.testing.assert_close(stems.sum(0) + (len(sources) - 1) * meta.mean / meta.std,
                               mixture, atol=1e-4, rtol=0)


def test_musdb_train_valid_and_segmented_valid(tmp_path: Path) -> None:
    musdb = write_musdb(tmp_path / "musdb", [VALID_TRACK, "t1"])
    dset = make_dset(tmp_path, musdb=str(musdb), segment=1, shift=1, samplerate=1000,
                     train_valid=True, full_cv=False)
    train, valid = get_musdb_wav_datasets(dset)
    assert sorted(train.tracks) == sorted([VALID_TRACK, "t1"])
    assert valid.tracks == [VALID_TRACK] and len(valid) == 3
    assert valid[0].shape == (5, 2, 1000)


def test_wav_datasets(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for split, names in {"train": ["x", "y"], "valid": ["z"]}.items():
        for name in names:
            write_track(tmp_path / "data" / split / name,
                        {source: rng.normal(0, 0.1, (2000, 2)) for source in SOURCES})
    dset = make_dset(tmp_path, wav=str(tmp_path / "data"), segment=1, shift=1,
                     samplerate=1000)
    train, valid = get_wav_datasets(dset)
    assert len(train) == 4 and len(valid) == 1 and valid[0].shape == (5, 2, 2000)
    assert list((tmp_path / "metadata").glob("demucs_wav_*.json"))
    dset.train_valid = True
    train, _ = get_wav_datasets(dset)
    assert len(train) == 6 and train[5].shape == (4, 2, 1000)


def test_second_wav_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for split in ["train", "valid"]:
        write_track(tmp_path / "second" / split / "w",
                    {source: rng.normal(0, 0.1, (2000, 2)) for source in SOURCES})
    dset = make_dset(tmp_path, wav2=str(tmp_path / "second"), segment=1, shift=1,
                     samplerate=1000)
    train, valid = get_wav_datasets(dset, "wav2")
    assert train.root == tmp_path / "second" / "train" and len(train) == 2 and len(valid) == 1
    (tmp_path / "third").mkdir()
    dset.wav2 = str(tmp_path / "third")
    with pytest.raises(DatasetError, match="dset.wav2=.*third/train does not exist"):
        get_wav_datasets(dset, "wav2")


def test_random_subset() -> None:
    data = list(range(10))
    subset = wav.random_subset(data, 4)
    assert len(subset) == 4 and len(set(subset)) == 4 and list(subset) != [0, 1, 2, 3]
    assert list(wav.random_subset(data, 4)) == list(subset)  # always the same examples
    assert list(wav.random_subset(data, 4, seed=1)) != list(subset)
    assert wav.random_subset(data, 10) is data and wav.random_subset(data, 11) is data


@pytest.mark.parametrize("base, extra, weight, repeats", [
    (2, 6, 0.5, (3, 1)), (10, 10, 0.5, (1, 1)), (100, 10, 0.2, (1, 2)), (10, 100, 0.2, (40, 1)),
    (6, 2, 0.9, (1, 27)), (0, 5, 0.3, (1, 1)),
])
def test_weighted_repeats(base: int, extra: int, weight: float,
                          repeats: tuple[int, int]) -> None:
    assert wav.weighted_repeats(base, extra, weight) == repeats


@pytest.mark.parametrize("weight", [0, 1, 1.5, -0.1])
def test_weighted_repeats_bad_weight(weight: float) -> None:
    with pytest.raises(ConfigError, match="dset.wav2_weight"):
        wav.weighted_repeats(2, 2, weight)


# ---------------------------------------------------------------------------------------
# Bad input

def _write_broken_musdb(root: Path, broken: str) -> Path:
    """A MusDB folder (one track 't1') with the defect `broken`; returns dset.musdb."""
    if broken == "nowhere":
        return root / "nowhere"
    if broken == "no train folder":
        root.mkdir()
        return root
    if broken == "no track":
        (root / "train").mkdir(parents=True)
        return root
    track = write_musdb(root, ["t1"]) / "train" / "t1"
    if broken == "missing stem":
        (track / "bass.wav").unlink()
    elif broken == "short stem":
        sf.write(str(track / "vocals.wav"), np.zeros((10, 2)), 1000)
    elif broken == "other samplerate":
        sf.write(str(track / "drums.wav"), np.zeros((3000, 2)), 8000)
    elif broken == "not a wav":
        (track / "other.wav").write_bytes(b"this is not a wav file" * 10)
    elif broken == "empty wav":
        sf.write(str(track / "mixture.wav"), np.zeros((0, 2)), 1000)
    else:
        raise ValueError(f"unknown defect {broken!r}")
    return root


@pytest.mark.parametrize("broken, fragments", [
    ("missing stem", ["'t1'", "bass.wav", "missing"]),
    ("short stem", ["'t1'", "vocals.wav", "same length"]),
    ("other samplerate", ["'t1'", "drums.wav", "sample rate"]),
    ("not a wav", ["'t1'", "other.wav", "cannot read"]),
    ("empty wav", ["'t1'", "mixture.wav", "empty"]),
    ("no track", ["no track", "{musdb}/train"]),
    ("nowhere", ["dset.musdb", "{musdb}"]),
    ("no train folder", ["dset.musdb", "{musdb}/train"]),
])
def test_bad_musdb_folder_is_a_dataset_error_naming_the_culprit(
        tmp_path: Path, broken: str, fragments: list[str]) -> None:
    musdb = _write_broken_musdb(tmp_path / "musdb", broken)
    with pytest.raises(DatasetError) as error:
        get_musdb_wav_datasets(make_dset(tmp_path, musdb=str(musdb)))
    for fragment in fragments:
        assert fragment.format(musdb=musdb) in str(error.value), str(error.value)


def test_wav_dataset_without_valid(tmp_path: Path) -> None:
    write_track(tmp_path / "data" / "train" / "x", ramp_stems(1000))
    with pytest.raises(DatasetError, match="valid"):
        get_wav_datasets(make_dset(tmp_path, wav=str(tmp_path / "data")))
