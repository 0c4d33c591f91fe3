"""Test-set evaluation: nSDR, museval SDR, and `evaluate` on a synthetic MusDB."""
from __future__ import annotations

import math
import multiprocessing
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import stempeg
import torch
from omegaconf import DictConfig, OmegaConf

from demucs import evaluate as ev
from demucs.errors import ConfigError, DatasetError
from demucs.hdemucs import HDemucs
from helpers import SOURCES, Scaler, imported_modules, require_programs

SECONDS = 2.
MUSDB = {"tracks": 0, "test_tracks": 3, "seconds": SECONDS}  # `musdb` fixture's size


# ---------------------------------------------------------------------------------------
# new_sdr and eval_track


def test_new_sdr_by_hand() -> None:
    references = torch.tensor([[[[1., 2.], [0., -1.]], [[0.5, 0.5], [0.5, 0.5]]]])  # (1,2,2,2)
    estimates = torch.tensor([[[[1., 1.], [0., 0.]], [[0., 0.], [0., 0.]]]])
    expected = [10 * math.log10((6 + 1e-7) / (2 + 1e-7)), 0.]
    assert ev.new_sdr(references, estimates)[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_new_sdr_known_cases() -> None:
    torch.manual_seed(0)
    references = torch.randn(2, 4, 2, 1000).double()
    assert ev.new_sdr(references, references).min() > 70
    assert ev.new_sdr(references, torch.zeros_like(references)).abs().max() < 1e-6
    # Noise 10 times smaller in amplitude: 20 dB.
    noisy = references + 0.1 * torch.randn_like(references)
    assert ev.new_sdr(references, noisy).mean().item() == pytest.approx(20, abs=0.5)
    silent = torch.zeros(1, 1, 2, 10)
    assert ev.new_sdr(silent, silent).item() == pytest.approx(0.)


def test_new_sdr_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 5\) and \(1, 2, 2, 6\)"):
        ev.new_sdr(torch.zeros(1, 2, 2, 5), torch.zeros(1, 2, 2, 6))
    with pytest.raises(ValueError, match="same shape"):
        ev.eval_track(torch.zeros(2, 2, 5), torch.zeros(2, 2, 6), 4, 4, compute_sdr=False)


def test_eval_track_museval() -> None:
    # The one museval case (about 2 s of CPU): 2 sources, 2 s stereo, noise at -20 dB.
    rng = np.random.default_rng(0)
    samplerate = 44100
    references = torch.from_numpy(rng.standard_normal((2, 2, 2 * samplerate)))
    estimates = references + 0.1 * torch.from_numpy(rng.standard_normal(references.shape))
    scores = ev.eval_track(references, estimates, samplerate, samplerate, compute_sdr=True)
    assert scores.museval is not None and set(scores.museval) == {"sdr", "sir", "isr", "sar"}
    assert scores.museval["sdr"] == pytest.approx([20, 20], abs=0.5)
    assert all(len(values) == 2 for values in scores.museval.values())
    assert scores.nsdr == pytest.approx([20, 20], abs=0.5)


def test_eval_track_nsdr_only() -> None:
    references = torch.ones(4, 2, 100)
    scores = ev.eval_track(references, references.numpy() * 0.9, 10, 10, compute_sdr=False)
    assert scores.museval is None
    assert scores.nsdr == pytest.approx([20.] * 4, abs=1e-4)


def test_import_is_light() -> None:
    loaded = imported_modules("demucs.evaluate")
    assert not loaded & {"museval", "musdb", "dora", "hydra"}


# ---------------------------------------------------------------------------------------
# evaluate on a synthetic MusDB


def run_eval(model: tp.Any, cfg: DictConfig, folder: Path,
             compute_sdr: bool = False) -> dict[str, float]:
    """`evaluate` as the solver and tools.test_pretrained call it."""
    return ev.evaluate(model, cfg.test, ev.get_test_set(cfg, model.sources), "cpu", folder,
                       compute_sdr=compute_sdr)


def make_cfg(musdb: Path, **test: tp.Any) -> DictConfig:
    base = {"save": False, "workers": 0, "split": True, "shifts": 0, "overlap": 0.25,
            "nonhq": None, "sdr": True}
    return OmegaConf.create({"dset": {"musdb": str(musdb)}, "test": {**base, **test}})


def expected_nsdr(musdb: Path, weights: list[float]) -> dict[str, list[float]]:
    """nSDR per source and track of `Mixer`, from the files, by the formula."""
    per_source: dict[str, list[float]] = {source: [] for source in SOURCES}
    for track in sorted((musdb / "test").iterdir()):
        mix = sf.read(str(track / "mixture.wav"), dtype="float32")[0].T
        mean = mix.mean(0).mean()
        for source, weight in zip(SOURCES, weights):
            ref = sf.read(str(track / f"{source}.wav"), dtype="float32")[0].T.astype(np.float64)
            est = weight * (mix - mean) + mean
            per_source[source].append(
                10 * math.log10(((ref ** 2).sum() + 1e-7) / (((ref - est) ** 2).sum() + 1e-7)))
    return per_source


def test_evaluate_nsdr_values(musdb: Path, tmp_path: Path) -> None:
    weights = [0.3, 0.2, 0.25, 0.25]
    model = Scaler(SOURCES, weights)
    model.train()
    metrics = run_eval(model, make_cfg(musdb), tmp_path)
    # The original's keys and order: per source the mean and median over tracks, then both
    # averaged over the sources.
    assert list(metrics) == [f"nsdr{med}_{source}" for source in SOURCES
                             for med in ("", "_med")] + ["nsdr", "nsdr_med"]
    expected = expected_nsdr(musdb, weights)
    for source in SOURCES:
        assert metrics[f"nsdr_{source}"] == pytest.approx(np.mean(expected[source]), abs=1e-3)
        assert metrics[f"nsdr_med_{source}"] == pytest.approx(np.median(expected[source]),
                                                              abs=1e-3)
    assert metrics["nsdr"] == pytest.approx(np.mean([metrics[f"nsdr_{s}"] for s in SOURCES]))
    assert metrics["nsdr_med"] == pytest.approx(
        np.mean([metrics[f"nsdr_med_{s}"] for s in SOURCES]))
    assert model.training  # the mode is restored
    assert not (tmp_path / "wav").exists()


def test_evaluate_hdemucs_save(musdb: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = HDemucs(SOURCES, channels=4, depth=5, segment=1)
    cfg = make_cfg(musdb, save=True, shifts=1)
    metrics = run_eval(model, cfg, tmp_path)
    assert set(metrics) == {"nsdr", "nsdr_med"} | {f"nsdr{med}_{source}" for source in SOURCES
                                                   for med in ("", "_med")}
    assert all(np.isfinite(value) for value in metrics.values())
    tracks = sorted(path.name for path in (musdb / "test").iterdir())
    assert sorted(path.name for path in (tmp_path / "wav").iterdir()) == tracks
    info = sf.info(str(tmp_path / "wav" / tracks[0] / "vocals.wav"))
    assert (info.samplerate, info.channels, info.frames) == (44100, 2, int(SECONDS * 44100))


def fake_museval(references: np.ndarray, estimates: np.ndarray, win: int,
                 hop: int) -> dict[str, list[float]]:
    """Stands for museval: per-source values that depend on the track (its peak) and on
    the metric."""
    base = np.arange(references.shape[0]) + 100 * float(np.abs(references).max())
    return {name: list(base + offset) for offset, name in enumerate(ev.MUSEVAL_METRICS)}


def _museval_expectation(musdb: Path) -> np.ndarray:
    """(tracks, metrics, S) values of `fake_museval` on the test tracks."""
    values = []
    for track in sorted((musdb / "test").iterdir()):
        refs = np.stack([sf.read(str(track / f"{s}.wav"), dtype="float32")[0] for s in SOURCES])
        fake = fake_museval(refs, refs, 1, 1)
        values.append([fake[name] for name in ev.MUSEVAL_METRICS])
    return np.array(values)


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_sdr_aggregation(musdb: Path, tmp_path: Path, workers: int,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if workers and multiprocessing.get_start_method() != "fork":
        pytest.skip("the fake museval reaches pool workers only through fork")
    monkeypatch.setattr(ev, "museval_scores", fake_museval)
    model = Scaler(SOURCES, [0.25] * 4)
    metrics = run_eval(model, make_cfg(musdb, workers=workers), tmp_path, compute_sdr=True)
    expected = _museval_expectation(musdb)  # (tracks, metrics, S)
    assert len(expected) == 3
    for index, name in enumerate(ev.MUSEVAL_METRICS):
        # Mean over tracks of the per-track values, and their median (as the original).
        means, medians = expected[:, index].mean(axis=0), np.median(expected[:, index], axis=0)
        assert not np.allclose(means, medians)  # the tracks differ: the two are told apart
        for source, mean, median in zip(SOURCES, means, medians):
            assert metrics[f"{name}_{source}"] == pytest.approx(mean)
            assert metrics[f"{name}_med_{source}"] == pytest.approx(median)
        assert metrics[name] == pytest.approx(means.mean())
        assert metrics[f"{name}_med"] == pytest.approx(medians.mean())
    names = ["nsdr", *ev.MUSEVAL_METRICS]
    assert list(metrics) == [  # the order of the original's history
        key for name in names
        for key in [f"{name}{med}_{s}" for s in SOURCES for med in ("", "_med")]
        + [name, f"{name}_med"]]


def test_evaluate_distributed_share(musdb: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 1 of 2 separates tracks 1 (of 0, 1, 2) and gets the others' results."""
    monkeypatch.setattr(ev, "_distributed", lambda: (1, 2))
    other = {"synth_test_000": ev.TrackScores([1.] * 4), "synth_test_002": ev.TrackScores([3.] * 4)}
    mine: dict[str, tp.Any] = {}

    def all_gather_object(parts: list, scores: dict) -> None:
        mine.update(scores)
        parts[:] = [other, scores]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    model = Scaler(SOURCES, [0.25] * 4)
    metrics = run_eval(model, make_cfg(musdb), tmp_path)
    assert list(mine) == ["synth_test_001"]
    assert metrics["nsdr_drums"] == pytest.approx((1 + 3 + mine["synth_test_001"].nsdr[0]) / 3)


def test_evaluate_errors(musdb: Path, tmp_path: Path) -> None:
    model = Scaler(SOURCES, [0.25] * 4)
    with pytest.raises(DatasetError, match="no test/ folder"):
        run_eval(model, make_cfg(tmp_path), tmp_path)
    cfg = make_cfg(musdb)
    cfg.dset.musdb = None
    with pytest.raises(ConfigError, match="dset.musdb"):
        run_eval(model, cfg, tmp_path)
    with pytest.raises(DatasetError, match="Missing test file .*guitar.wav"):
        run_eval(Scaler(["guitar"], [1.]), make_cfg(musdb), tmp_path)
    with pytest.raises(DatasetError, match="no test/ folder of .stem.mp4"):
        run_eval(model, make_cfg(musdb, nonhq=str(tmp_path)), tmp_path)


def test_evaluate_nonhq(musdb: Path, tmp_path: Path) -> None:
    """test.nonhq: the original MusDB (.stem.mp4 read by musdb), here one AAC track."""
    require_programs("ffmpeg", "ffprobe")
    track = musdb / "test" / "synth_test_000"
    names = ["mixture"] + SOURCES  # the stream order of the MusDB stems
    stems = np.stack([sf.read(str(track / f"{name}.wav"), dtype="float32")[0]
                      for name in names])  # (5, T, C)
    (tmp_path / "nonhq" / "test").mkdir(parents=True)
    stempeg.write_stems(str(tmp_path / "nonhq" / "test" / "synth_test_000.stem.mp4"), stems,
                        sample_rate=44100, writer=stempeg.StreamsWriter(codec="aac"))
    weights = [0.3, 0.2, 0.25, 0.25]
    cfg = make_cfg(musdb, nonhq=str(tmp_path / "nonhq"))
    metrics = run_eval(Scaler(SOURCES, weights), cfg, tmp_path)
    expected = expected_nsdr(musdb, weights)
    for source in SOURCES:  # AAC is lossy: close to the HQ values
        assert metrics[f"nsdr_{source}"] == pytest.approx(expected[source][0], abs=0.5)
    with pytest.raises(DatasetError, match="no guitar stem"):
        run_eval(Scaler(["guitar"], [1.]), cfg, tmp_path)
