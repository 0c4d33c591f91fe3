"""Tests of tools.synth_dataset: layout, exact mixtures, determinism and use by demucs.wav."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from omegaconf import OmegaConf

from demucs.wav import get_musdb_wav_datasets
from tools.synth_dataset import SOURCES, VALID_NAMES, generate_dataset, main, synth_track

SR = 22050


def read(path: Path) -> np.ndarray:
    return sf.read(str(path), dtype="int16")[0].astype(np.int32)  # (T, 2)


def test_layout_and_exact_mixture(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "synth", tracks=4, seconds=2, samplerate=SR,
                           test_tracks=1)
    train = sorted(p.name for p in (out / "train").iterdir())
    assert len(train) == 4 and VALID_NAMES[0] in train
    assert [p.name for p in (out / "test").iterdir()] == ["synth_test_000"]
    folder = out / "train" / train[0]
    assert sorted(p.stem for p in folder.iterdir()) == sorted(["mixture", *SOURCES])
    info = sf.info(str(folder / "mixture.wav"))
    assert (info.channels, info.samplerate, info.frames, info.subtype) == (2, SR, 2 * SR,
                                                                           "PCM_16")
    mixture = read(folder / "mixture.wav")
    assert np.array_equal(mixture, sum(read(folder / f"{s}.wav") for s in SOURCES))
    assert 0.5 * 32767 < np.abs(mixture).max() <= 0.9 * 32767 + 1  # loud, no clipping


def test_deterministic(tmp_path: Path) -> None:
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        generate_dataset(tmp_path / name, tracks=1, seconds=1, samplerate=SR, seed=seed,
                         test_tracks=0)
    files = {name: (tmp_path / name / "train" / VALID_NAMES[0] / "vocals.wav").read_bytes()
             for name in "abc"}
    assert files["a"] == files["b"] != files["c"]


def test_musical_structure() -> None:
    stems = synth_track(seed=3, seconds=4, samplerate=SR)
    assert set(stems) == set(SOURCES)
    spectra = {name: np.abs(np.fft.rfft(stem.mean(1))) for name, stem in stems.items()}
    freqs = np.fft.rfftfreq(4 * SR, 1 / SR)
    peak_hz = {name: freqs[spec.argmax()] for name, spec in spectra.items()}
    assert 30 < peak_hz["bass"] < 200 < peak_hz["vocals"]  # bass notes low, melody high
    # drums: short hits, so a peaky envelope; the others are sustained notes
    hop = SR // 100
    envelope = np.abs(stems["drums"][:, 0])[: len(stems["drums"]) // hop * hop]
    frames = envelope.reshape(-1, hop).max(1)
    assert frames.max() > 5 * np.median(frames)
    assert not np.allclose(stems["vocals"][:, 0], stems["vocals"][:, 1])  # stereo image


def test_other_sources_and_valid_split(tmp_path: Path) -> None:
    six = ["drums", "bass", "other", "vocals", "guitar", "piano"]
    out = generate_dataset(tmp_path / "synth", tracks=4, seconds=1.5, samplerate=SR,
                           sources=six, test_tracks=0)
    dset = OmegaConf.create({"musdb": str(out), "metadata": str(tmp_path / "meta"),
                             "sources": six, "segment": 1, "shift": 1, "samplerate": SR,
                             "channels": 2, "normalize": True, "train_valid": False,
                             "full_cv": True})
    train, valid = get_musdb_wav_datasets(dset)
    assert len(valid) == 1 and len(train) == 3 * 2
    assert train[0].shape == (6, 2, SR) and valid[0].shape == (7, 2, int(1.5 * SR))


def test_command_line(tmp_path: Path) -> None:
    main([str(tmp_path / "cli"), "--tracks", "2", "--seconds", "1", "--samplerate", "8000",
          "--test-tracks", "1", "--float", "--sources", "vocals", "accompaniment"])
    folder = tmp_path / "cli" / "train" / VALID_NAMES[0]
    assert sorted(p.name for p in folder.iterdir()) == ["accompaniment.wav", "mixture.wav",
                                                        "vocals.wav"]
    assert sf.info(str(folder / "mixture.wav")).subtype == "FLOAT"
