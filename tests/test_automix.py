"""Tests of tools/automix.py on a small synthetic MusDB-HQ-shaped dataset."""
from __future__ import annotations

import json
import os
import shutil
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from demucs.errors import DatasetError
from demucs.wav import get_wav_datasets
from tools import automix, automix_analysis
from tools.synth_dataset import Song, generate_dataset, track_names

SR = 22050
SECONDS = 8.
TRACKS = 4
# Wide tolerances: 4 random synthetic tracks (90 to 140 BPM, any key) must all be compatible.
LOOSE = ["--max-tempo", "60", "--max-pitch", "6", "--valid-tracks", "1", "--workers", "1"]


def needs_soundstretch() -> None:
    """Skip without soundstretch, except on CI (CI=true) where it must be installed."""
    if shutil.which("soundstretch") is None and os.environ.get("CI") != "true":
        pytest.skip("soundstretch is not installed")


@pytest.fixture(scope="module")
def musdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("musdb"), tracks=TRACKS, seconds=SECONDS,
                            samplerate=SR, seed=0, test_tracks=0)


@pytest.fixture(scope="module")
def analyses(musdb: Path) -> list[automix.TrackAnalysis]:
    root = musdb / "train"
    return [automix.analyse_track(root, name, automix.SOURCES)
            for name in automix.track_names(root)]


@pytest.fixture(scope="module")
def remixed(musdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    needs_soundstretch()
    out = tmp_path_factory.mktemp("automix") / "out"
    automix.main(["--musdb", str(musdb), "--out", str(out), "--mixes-per-track", "2", *LOOSE])
    return out


def _song(name: str) -> Song:
    """The musical plan synth_dataset used for the train track `name` (seed 0)."""
    index = track_names(TRACKS, max(1, TRACKS // 4)).index(name)
    return Song(np.random.default_rng(index), SECONDS, SR)


def test_analysis_finds_tempo_key_and_downbeat(analyses: list[automix.TrackAnalysis]) -> None:
    assert len(analyses) == TRACKS
    for analysis in analyses:
        song = _song(analysis.name)
        bpm = 60 / song.beat
        assert abs(analysis.tempo - bpm) < 0.04 * bpm, (analysis.name, analysis.tempo, bpm)
        assert analysis.key == song.root % 12, analysis.name
        assert analysis.silent == []
        # Kicks fall on even beats: the first downbeat must be one of them.
        first = analysis.downbeats()[0] / song.beat
        assert abs(first - 2 * round(first / 2)) < 0.15, (analysis.name, first)


def test_tempo_ratio_and_pitch_shift() -> None:
    def track(tempo: float, key: int) -> automix.TrackAnalysis:
        return automix.TrackAnalysis("t", SR, 2, SR, tempo, [], key, False)
    assert automix.tempo_ratio(track(110, 0), track(100, 0), 15) == pytest.approx(1.1)
    assert automix.tempo_ratio(track(120, 0), track(100, 0), 15) is None
    assert automix.tempo_ratio(track(100, 0), track(210, 0), 15) == pytest.approx(200 / 210)
    assert automix.pitch_shift(track(100, 0), track(100, 11)) == 1
    assert automix.pitch_shift(track(100, 11), track(100, 1)) == -2


def test_plans_are_deterministic_and_mix_different_tracks(
        analyses: list[automix.TrackAnalysis]) -> None:
    settings = automix.Settings(sources=list(automix.SOURCES), mixes_per_track=3,
                                max_tempo=60, max_pitch=6, valid_tracks=1)
    plans = automix.plan_all(analyses, settings)
    assert plans == automix.plan_all(analyses, settings)
    other = automix.plan_all(analyses, automix.Settings(**{**settings.__dict__, "seed": 1}))
    assert [p.to_dict() for p in plans] != [p.to_dict() for p in other]
    assert len(plans) == 3 * TRACKS
    assert sum(plan.split == "valid" for plan in plans) == 3
    for plan in plans:
        assert len({stem.track for stem in plan.stems}) == len(automix.SOURCES)
        assert plan.target in {stem.track for stem in plan.stems}


def test_strict_tolerances_make_fewer_remixes(analyses: list[automix.TrackAnalysis]) -> None:
    strict = automix.Settings(sources=list(automix.SOURCES), max_tempo=0, max_pitch=0,
                              valid_tracks=1)
    with pytest.raises(DatasetError, match="compatible"):
        automix.plan_all(analyses, strict)


def _dset(path: Path, tmp_path: Path) -> tp.Any:
    return OmegaConf.create({
        "wav": str(path), "metadata": str(tmp_path / "metadata"),
        "sources": list(automix.SOURCES), "segment": 2., "shift": 1., "samplerate": SR,
        "channels": 2, "normalize": True, "train_valid": False, "full_cv": True})


def test_cli_writes_a_wav_dataset(remixed: Path, tmp_path: Path) -> None:
    train, valid = get_wav_datasets(_dset(remixed, tmp_path))
    assert len(train) > 0 and len(valid) == 2  # 2 remixes of the single valid target
    assert train[0].shape[:2] == (len(automix.SOURCES), 2)
    summary = json.loads((remixed / automix.SUMMARY_FILE).read_text())
    assert len(summary["remixes"]) == 2 * TRACKS
    for remix in summary["remixes"]:
        folder = remixed / remix["split"] / remix["name"]
        assert len({stem["track"] for stem in remix["stems"]}) == len(automix.SOURCES)
        for stem in remix["stems"]:
            assert abs(stem["pitch"]) <= 6 and abs(stem["tempo"]) <= 60
        wavs = {name: sf.read(str(folder / f"{name}.wav"), dtype="float32")[0]
                for name in ["mixture", *automix.SOURCES]}
        assert {len(wav) for wav in wavs.values()} == {remix["length"]}
        assert remix["length"] > 0.5 * SECONDS * SR / 1.6
        stems_sum = sum(wavs[name] for name in automix.SOURCES)
        np.testing.assert_allclose(wavs["mixture"], stems_sum, atol=1e-5)
        for name in automix.SOURCES:
            assert np.abs(wavs[name]).max() > 1e-3, (remix["name"], name)  # not silent


def test_refuses_a_non_empty_output(musdb: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    needs_soundstretch()
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as error:
        automix.main(["--musdb", str(musdb), "--out", str(tmp_path), *LOOSE])
    assert error.value.code == 1
    message = capsys.readouterr().err.strip()
    assert "not empty" in message and "--overwrite" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_resume_skips_finished_remixes(musdb: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    needs_soundstretch()
    out = tmp_path / "out"
    args = ["--musdb", str(musdb), "--out", str(out), "--mixes-per-track", "1", "--int16",
            *LOOSE]
    automix.main(args)
    folders = sorted(p for split in ("train", "valid") for p in (out / split).iterdir())
    assert len(folders) == TRACKS
    stamps = {p: (p / "drums.wav").stat().st_mtime_ns for p in folders}
    # An interrupted run: one remix missing, a temporary folder left over.
    shutil.rmtree(folders[0])
    (out / "train" / f"{automix.TMP_PREFIX}x-1").mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    automix.main([*args, "--overwrite"])
    assert f"1 written, {TRACKS - 1} already there" in capsys.readouterr().out
    assert (folders[0] / "mixture.wav").is_file()
    for folder in folders[1:]:
        assert (folder / "drums.wav").stat().st_mtime_ns == stamps[folder]
    assert not list((out / "train").glob(automix.TMP_PREFIX + "*"))
    assert (out / "notes.txt").read_text() == "mine"
    assert sf.info(str(folders[0] / "bass.wav")).subtype == "PCM_16"


def test_missing_paths_are_one_line_errors(musdb: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MUSDB_PATH", raising=False)
    monkeypatch.delenv("AUTOMIX_MUSDB_PATH", raising=False)
    cases = [([], "MUSDB_PATH"), (["--musdb", str(musdb)], "AUTOMIX_MUSDB_PATH"),
             (["--musdb", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "train")]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as error:
            automix.main(argv)
        assert error.value.code == 1
        message = capsys.readouterr().err.strip()
        assert expected in message and "\n" not in message, message


def test_env_variables_are_the_defaults(musdb: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MUSDB_PATH", str(musdb))
    monkeypatch.setenv("AUTOMIX_MUSDB_PATH", str(tmp_path))
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit):  # reaches the output check: both paths were taken
        automix.main(["--valid-tracks", "1"])
    assert str(tmp_path) in capsys.readouterr().err


def test_missing_soundstretch(musdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as error:
        automix.main(["--musdb", str(musdb), "--out", str(tmp_path / "out"), *LOOSE])
    assert error.value.code == 1
    assert "soundstretch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_stem(musdb: Path, tmp_path: Path) -> None:
    root = tmp_path / "train"
    shutil.copytree(musdb / "train" / "synth_001", root / "synth_001")
    (root / "synth_001" / "bass.wav").unlink()
    with pytest.raises(DatasetError, match="bass.wav"):
        automix.analyse_track(root, "synth_001", automix.SOURCES)


def test_other_sources_in_a_process_pool(tmp_path: Path) -> None:
    needs_soundstretch()
    sources = ["drums", "bass", "guitar"]
    musdb = generate_dataset(tmp_path / "musdb", tracks=4, seconds=4., samplerate=SR, seed=3,
                             sources=sources, test_tracks=0)
    out = tmp_path / "out"
    automix.main(["--musdb", str(musdb), "--out", str(out), "--sources", *sources,
                  "--mixes-per-track", "1", "--segment", "2", *LOOSE[:-1], "2"])
    summary = json.loads((out / automix.SUMMARY_FILE).read_text())
    assert len(summary["remixes"]) == 4
    for remix in summary["remixes"]:
        assert [stem["source"] for stem in remix["stems"]] == sources
        assert SR <= remix["length"] <= 2 * SR
        folder = out / remix["split"] / remix["name"]
        assert sorted(p.name for p in folder.glob("*.wav")) == [
            "bass.wav", "drums.wav", "guitar.wav", "mixture.wav"]


def test_remixed_drums_follow_the_target(remixed: Path,
                                         analyses: list[automix.TrackAnalysis]) -> None:
    """Borrowed drums are stretched to the target's tempo and start on a beat."""
    tempos = {analysis.name: analysis.tempo for analysis in analyses}
    summary = json.loads((remixed / automix.SUMMARY_FILE).read_text())
    for remix in summary["remixes"]:
        drums_stem, = [stem for stem in remix["stems"] if stem["source"] == "drums"]
        drums, _ = sf.read(str(remixed / remix["split"] / remix["name"] / "drums.wav"),
                           dtype="float32")
        tempo, _ = automix_analysis.estimate_beats(drums.mean(axis=1), SR)
        target = tempos[remix["target"]]
        ratio = min((tempo / target, 2 * tempo / target, tempo / target / 2),
                    key=lambda r: abs(np.log(r)))
        assert abs(ratio - 1) < 0.05, (remix["name"], drums_stem, tempo, target)
        head = np.abs(drums[:int(0.03 * SR)]).max()
        assert head > 0.3 * np.abs(drums).max(), remix["name"]  # a kick right at the start


def _chroma(mono: np.ndarray) -> np.ndarray:
    import librosa
    return librosa.feature.chroma_cqt(y=mono, sr=SR, hop_length=4096).mean(axis=1)  # (12,)


def test_borrowed_stems_are_shifted_by_the_planned_pitch(
        musdb: Path, remixed: Path) -> None:
    """The chroma of each `other` stem is that of its source region, rolled by the shift."""
    summary = json.loads((remixed / automix.SUMMARY_FILE).read_text())
    for remix in summary["remixes"]:
        stem, = [stem for stem in remix["stems"] if stem["source"] == "other"]
        frames = int(remix["length"] * stem["stretch"])
        original, _ = automix.read_stem(musdb / "train", stem["track"], "other",
                                        int(stem["start"] * SR), frames)
        rendered, _ = sf.read(str(remixed / remix["split"] / remix["name"] / "other.wav"),
                              dtype="float32")
        before, after = _chroma(original.mean(axis=0)), _chroma(rendered.mean(axis=1))
        scores = [np.corrcoef(np.roll(before, shift), after)[0, 1] for shift in range(12)]
        assert int(np.argmax(scores)) == stem["pitch"] % 12, (remix["name"], stem)
