"""Tests of tools/automix.py on a small synthetic MusDB-HQ-shaped dataset.

The dataset's train/ holds VALID tracks named after official MusDB validation tracks and
TRACKS - VALID others, so that both splits of the remixes can be checked.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tracemalloc
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from demucs.errors import DatasetError
from demucs.wav import get_wav_datasets
from helpers import REPO, imported_modules, main_error, require_programs
from tools import automix, automix_analysis, automix_features, automix_workers
from tools.automix_analysis import RemixPlan, Settings, StemPlan, TrackAnalysis
from tools.synth_dataset import Song, generate_dataset, synth_song, track_names, write_track

SR = 22050
SECONDS = 8.
TRACKS = 8
VALID = 4  # tracks named after MusDB validation tracks (the first ones)
SOURCES = list(automix.SOURCES)
STEM_FIELDS = {"track", "offset_seconds", "tempo_factor", "pitch_semitones"}
# Wide tolerances: random synthetic tracks (90 to 140 BPM, any key) must all be compatible.
LOOSE = ["--max-tempo", "60", "--max-pitch", "6", "--workers", "1"]
PARALLEL = [*LOOSE[:-1], "2"]
VICTIM = "synth_007"  # the last train track: workers finish other tracks before it
# The `musdb` fixture (conftest.py): generate_dataset's arguments.
MUSDB = {"tracks": TRACKS, "seconds": SECONDS, "samplerate": SR, "seed": 0, "test_tracks": 0,
         "valid_tracks": VALID}


def _manifest(out: Path) -> dict[str, tp.Any]:
    return json.loads((out / automix.MANIFEST_FILE).read_text())


def _remix_folders(out: Path) -> set[str]:
    """The remix folders of `out`, as `split/name`."""
    return {f"{split}/{p.name}" for split in automix.SPLITS for p in (out / split).iterdir()
            if p.is_dir() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def analyses(musdb: Path) -> list[TrackAnalysis]:
    root = musdb / "train"
    return [automix.analyse_track(root, name, SOURCES) for name in automix.track_names(root)]


@pytest.fixture(scope="module")
def remixed(musdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_programs("soundstretch")
    out = tmp_path_factory.mktemp("automix") / "out"
    automix.main(["--musdb", str(musdb), "--out", str(out), "--mixes-per-track", "2", *LOOSE])
    return out


def _song(name: str) -> Song:
    """The musical plan synth_dataset used for the train track `name` (seed 0)."""
    index = track_names(TRACKS, VALID).index(name)
    return Song(np.random.default_rng(index), SECONDS, SR)


def _track(name: str, tempo: float, key: int) -> TrackAnalysis:
    """A hand-made analysis: SECONDS long, regular beats at `tempo`."""
    beats = [round(k * 60 / tempo, 6) for k in range(int(SECONDS * tempo / 60))]
    return TrackAnalysis(name, SR, 2, int(SECONDS * SR), tempo, beats, key, False)


# ---------------------------------------------------------------------------------------
# Analysis and planning

def test_analysis_finds_tempo_key_and_downbeat(analyses: list[TrackAnalysis]) -> None:
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
    tempo_ratio, pitch_shift = automix_analysis.tempo_ratio, automix_analysis.pitch_shift
    assert tempo_ratio(_track("a", 110, 0), _track("b", 100, 0), 15) == pytest.approx(1.1)
    assert tempo_ratio(_track("a", 120, 0), _track("b", 100, 0), 15) is None
    assert tempo_ratio(_track("a", 100, 0), _track("b", 210, 0), 15) == pytest.approx(200 / 210)
    assert pitch_shift(_track("a", 100, 0), _track("b", 100, 11)) == 1
    assert pitch_shift(_track("a", 100, 11), _track("b", 100, 1)) == -2


def test_split_names_puts_validation_tracks_apart(tmp_path: Path) -> None:
    names = track_names(TRACKS, VALID)
    splits = automix.split_names(tmp_path, names, SOURCES)
    assert splits == {"train": names[VALID:], "valid": names[:VALID]}
    assert set(splits["valid"]) <= automix.validation_tracks()
    assert not set(splits["train"]) & automix.validation_tracks()
    with pytest.raises(DatasetError, match="0 official MusDB validation tracks"):
        automix.split_names(tmp_path, track_names(TRACKS, 0), SOURCES)
    with pytest.raises(DatasetError, match="1 tracks besides"):
        automix.split_names(tmp_path, track_names(VALID + 1, VALID), SOURCES)


def test_plans_are_deterministic_and_borrow_within_their_split(
        analyses: list[TrackAnalysis]) -> None:
    settings = Settings(sources=SOURCES, mixes_per_track=3, max_tempo=60, max_pitch=6)
    valid = set(track_names(TRACKS, VALID)[:VALID])
    plans = automix_analysis.plan_all(analyses, settings, valid)
    assert plans == automix_analysis.plan_all(analyses, settings, valid)
    other = automix_analysis.plan_all(analyses, Settings(**{**settings.__dict__, "seed": 1}),
                                      valid)
    assert [p.to_dict() for p in plans] != [p.to_dict() for p in other]
    assert len(plans) == 3 * TRACKS
    assert sum(plan.split == "valid" for plan in plans) == 3 * VALID
    for plan in plans:
        tracks = {stem.track for stem in plan.stems}
        assert len(tracks) == len(SOURCES) and plan.target in tracks
        assert plan.split == ("valid" if plan.target in valid else "train")
        assert all((track in valid) == (plan.split == "valid") for track in tracks), plan


def test_strict_tolerances_make_fewer_remixes() -> None:
    """Only the tracks within the tolerances lend stems: with a 10% tempo and 1 semitone
    limit, the fast tracks f* are left out, a2 (2 semitones above a0 and a1) only lends them
    drums, and a2 itself finds too few pitched donors to be remixed."""
    tracks = [_track("a0", 120, 0), _track("a1", 118, 0), _track("a2", 122, 2),
              _track("a3", 121, 1), _track("f0", 156, 0), _track("f1", 160, 0)]
    loose = Settings(sources=SOURCES, mixes_per_track=3, max_tempo=60, max_pitch=6)
    strict = Settings(sources=SOURCES, mixes_per_track=3, max_tempo=10, max_pitch=1)
    all_plans = automix_analysis.plan_split(tracks, "train", loose)
    assert len(all_plans) == 3 * len(tracks)
    plans = automix_analysis.plan_split(tracks, "train", strict)
    assert 0 < len(plans) < len(all_plans)
    assert {plan.target for plan in plans} == {"a0", "a1", "a3"}
    for plan in plans:
        for stem in plan.stems:
            assert not stem.track.startswith("f"), plan
            assert abs(stem.tempo_factor - 1) <= 0.1 and abs(stem.pitch_semitones) <= 1, stem
            if stem.track == "a2" and plan.target in ("a0", "a1"):
                assert stem.source == "drums", plan
    # Nothing within tolerance at all: an error, not an empty dataset.
    zero = Settings(sources=SOURCES, max_tempo=0, max_pitch=0)
    with pytest.raises(DatasetError, match="compatible"):
        automix_analysis.plan_split(tracks, "train", zero)


# ---------------------------------------------------------------------------------------
# Analysis of tracks of known tempo, key and first downbeat

@pytest.mark.parametrize("tempo, pattern", [
    (84., "dotted"),  # the 4:3 confusion: dotted kicks at 84 BPM read as 112
    (62., "rock"), (176., "four"), (140., "sixteenths"), (100., "offbeat"), (120., None)])
def test_generated_tracks_of_known_tempo(tmp_path: Path, tempo: float,
                                         pattern: str | None) -> None:
    song, stems = synth_song(7, 16., SR, tempo=tempo, pattern=pattern, offset=0.7 * 60 / tempo)
    write_track(tmp_path / "song", stems, SR)
    analysis = automix.analyse_track(tmp_path, "song", SOURCES)
    assert abs(analysis.tempo / tempo - 1) < 0.04, (analysis.tempo, tempo)
    assert abs(analysis.downbeats()[0] - song.first_downbeat) < 0.05
    assert analysis.key == song.key


def test_silent_drums_leave_the_rhythm_to_the_other_stems(tmp_path: Path) -> None:
    _, stems = synth_song(5, 16., SR, tempo=96., pattern="rock")
    write_track(tmp_path / "song", {**stems, "drums": np.zeros_like(stems["drums"])}, SR)
    analysis = automix.analyse_track(tmp_path, "song", SOURCES)
    assert analysis.silent == ["drums"]
    assert abs(analysis.tempo / 96. - 1) < 0.04, analysis.tempo


def test_silence_has_no_tempo(tmp_path: Path) -> None:
    write_track(tmp_path / "quiet", {s: np.zeros((SR, 2)) for s in SOURCES}, SR)
    analysis = automix.analyse_track(tmp_path, "quiet", SOURCES)
    assert (analysis.tempo, analysis.beats, analysis.silent) == (0., [], SOURCES)
    assert automix_analysis.tempo_ratio(analysis, analysis, 15) is None


def test_features_do_not_depend_on_the_block_size() -> None:
    _, stems = synth_song(3, 6., SR, pattern="dotted")
    mono = stems["drums"].mean(axis=1) + stems["other"].mean(axis=1)
    for spectrum in (automix_features.onset_spectrum, automix_features.chroma_spectrum):
        small, fps = automix_features.features_of(mono, SR, spectrum, block=999)
        large, _ = automix_features.features_of(mono, SR, spectrum, block=1 << 16)
        assert fps > 5 and small.shape == large.shape
        np.testing.assert_allclose(small, large, rtol=1e-3, atol=1e-6 * large.max())


def test_analysis_memory_does_not_grow_with_the_track(tmp_path: Path) -> None:
    """Stems are read a block at a time and each spectrum frame is reduced at once: the
    peak memory of a 64 s track is that of a 16 s one, far below its audio (45 MB)."""
    peaks = {}
    for seconds in (16., 64.):
        write_track(tmp_path / f"t{seconds:.0f}", synth_song(1, seconds, SR)[1], SR)
        tracemalloc.start()
        automix.analyse_track(tmp_path, f"t{seconds:.0f}", SOURCES)
        peaks[seconds] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[64.] < 1.3 * peaks[16.] and peaks[64.] < 16e6, peaks


def test_analyses_are_cached_until_a_stem_changes(musdb: Path, tmp_path: Path,
                                                  analyses: list[TrackAnalysis]) -> None:
    root = Path(shutil.copytree(musdb / "train" / VICTIM, tmp_path / "train" / VICTIM)).parent
    analysis = next(a for a in analyses if a.name == VICTIM)
    assert automix.cached_analysis(root, tmp_path, VICTIM, SOURCES) is None
    automix.save_analysis(root, tmp_path, analysis, SOURCES)
    assert automix.cached_analysis(root, tmp_path, VICTIM, SOURCES) == analysis
    assert automix.cached_analysis(root, tmp_path, VICTIM, SOURCES[:3]) is None
    shutil.copy(root / VICTIM / "bass.wav", root / VICTIM / "drums.wav")
    assert automix.cached_analysis(root, tmp_path, VICTIM, SOURCES) is None


# ---------------------------------------------------------------------------------------
# Worker processes

def test_the_analysis_compiles_nothing() -> None:
    """No numba (librosa's beat tracker was compiled by every worker into one cache)."""
    modules = imported_modules("tools.automix")
    assert not {name.split(".")[0] for name in modules} & {"numba", "librosa", "llvmlite"}


@pytest.mark.slow
def test_parallel_run_from_an_empty_numba_cache(musdb: Path, tmp_path: Path,
                                                analyses: list[TrackAnalysis]) -> None:
    """The crash of the issue: two workers from an empty numba cache, in a fresh
    interpreter. The run works, writes nothing into the shared cache, and finds the same
    analyses as one process."""
    require_programs("soundstretch")
    cache, out = tmp_path / "numba", tmp_path / "out"
    cache.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tools.automix", "--musdb", str(musdb), "--out", str(out),
         "--mixes-per-track", "1", *PARALLEL], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "NUMBA_CACHE_DIR": str(cache)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(_manifest(out)) == TRACKS and not list(cache.iterdir())
    summary = json.loads((out / automix.SUMMARY_FILE).read_text())["tracks"]
    for analysis in analyses:
        assert summary[analysis.name]["tempo"] == pytest.approx(analysis.tempo)
        assert summary[analysis.name]["key"] == analysis.key


@pytest.mark.slow
def test_each_worker_has_its_own_numba_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/shared/cache")
    folders: dict[int, str] = {}
    with automix_workers.Workers(2) as pool:
        pool.run(os.getenv, [("NUMBA_CACHE_DIR",)] * 2, ["a", "b"], folders.__setitem__, "")
    assert len(set(folders.values())) == 2 and "/shared/cache" not in folders.values()
    assert os.environ["NUMBA_CACHE_DIR"] == "/shared/cache"


def _analyse_or_die(root: Path, track: str, sources: list[str]) -> TrackAnalysis:
    """analyse_track, but the worker given VICTIM kills itself."""
    if track == VICTIM:
        os.kill(os.getpid(), signal.SIGKILL)
    return automix_analysis.analyse_track(root, track, sources)


def _render_or_die(root: Path, out: Path, plans: list[RemixPlan], *args: tp.Any) -> int:
    """render_target, but the worker given VICTIM's remixes kills itself."""
    if plans[0].target == VICTIM:
        os.kill(os.getpid(), signal.SIGKILL)
    return automix.render_target(root, out, plans, *args)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["analysing", "remixing"])
def test_killed_worker_is_a_one_line_error_and_the_run_resumes(
        musdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], step: str) -> None:
    require_programs("soundstretch")
    out = tmp_path / "out"
    argv = ["--musdb", str(musdb), "--out", str(out), "--mixes-per-track", "1", *PARALLEL]
    if step == "analysing":
        monkeypatch.setattr(automix, "analyse_track", _analyse_or_die)
    else:
        monkeypatch.setattr(automix, "render_target", _render_or_die)
    message = main_error(automix.main, argv, capsys)
    assert f"worker process died (killed by SIGKILL) while {step} track {VICTIM!r}" in message
    assert "--overwrite" in message
    monkeypatch.undo()
    automix.main([*argv, "--overwrite"])
    printed = capsys.readouterr().out
    assert len(_manifest(out)) == TRACKS and set(_manifest(out)) == _remix_folders(out)
    # What the workers finished before VICTIM's was kept: at least two tracks.
    pattern = r"\((\d+) read back" if step == "analysing" else r"(\d+) already there"
    match = re.search(pattern, printed)
    assert match and int(match.group(1)) >= 2, printed


# ---------------------------------------------------------------------------------------
# The written dataset and its manifest

def _dset(path: Path, tmp_path: Path) -> tp.Any:
    return OmegaConf.create({
        "wav": str(path), "metadata": str(tmp_path / "metadata"), "sources": SOURCES,
        "segment": 2., "shift": 1., "samplerate": SR, "channels": 2, "normalize": True,
        "train_valid": False, "full_cv": True})


def test_cli_writes_a_wav_dataset(remixed: Path, tmp_path: Path) -> None:
    train, valid = get_wav_datasets(_dset(remixed, tmp_path))
    assert len(train) > 0 and len(valid) == 2 * VALID  # full_cv: one example per remix
    assert train[0].shape[:2] == (len(SOURCES), 2)
    manifest = _manifest(remixed)
    assert len(manifest) == 2 * TRACKS
    for key, remix in manifest.items():
        wavs = {name: sf.read(str(remixed / key / f"{name}.wav"), dtype="float32")[0]
                for name in ["mixture", *SOURCES]}
        assert {len(wav) for wav in wavs.values()} == {remix["length_samples"]}
        assert remix["length_samples"] > 0.5 * SECONDS * SR / 1.6
        np.testing.assert_allclose(wavs["mixture"], sum(wavs[s] for s in SOURCES), atol=1e-5)
        for name in SOURCES:
            assert np.abs(wavs[name]).max() > 1e-3, (key, name)  # not silent


def test_training_remixes_never_use_validation_tracks(remixed: Path, musdb: Path) -> None:
    validation = automix.validation_tracks()
    names = set(automix.track_names(musdb / "train"))
    assert len(names & validation) == VALID  # the dataset does hold validation tracks
    splits = {"train": names - validation, "valid": names & validation}
    manifest = _manifest(remixed)
    assert {remix["split"] for remix in manifest.values()} == {"train", "valid"}
    for key, remix in manifest.items():
        assert key.startswith(remix["split"] + "/")
        donors = {stem["track"] for stem in remix["stems"].values()}
        # Every stem comes from the split of the remix: training remixes from non-validation
        # train tracks only, validation remixes from validation tracks only.
        assert donors <= splits[remix["split"]], (key, donors)
        assert remix["target"] in donors


def test_manifest_lists_every_remix_and_stem(remixed: Path, musdb: Path) -> None:
    manifest = _manifest(remixed)
    assert set(manifest) == _remix_folders(remixed)
    for key, remix in manifest.items():
        assert set(remix["stems"]) == set(SOURCES), key
        assert remix["samplerate"] == SR and remix["format"] == "float32"
        assert remix["gain"] == 1.
        kept = [s for s in remix["stems"].values() if s["track"] == remix["target"]]
        assert len(kept) == 1 and (kept[0]["tempo_factor"], kept[0]["pitch_semitones"]) == (1, 0)
        for source, stem in remix["stems"].items():
            assert set(stem) == STEM_FIELDS, (key, source)
            assert isinstance(stem["pitch_semitones"], int) and abs(stem["pitch_semitones"]) <= 6
            assert 1 / 1.6 <= stem["tempo_factor"] <= 1.6
            duration = sf.info(str(musdb / "train" / stem["track"] / f"{source}.wav")).duration
            assert 0 <= stem["offset_seconds"] < duration
    # The manifest is also what the remix folders record: it can be rebuilt from them.
    copy = Path(shutil.copytree(remixed, remixed.parent / "records",
                                ignore=shutil.ignore_patterns("*.wav", automix.MANIFEST_FILE)))
    assert automix.write_manifest(copy) == manifest == _manifest(copy)


def _loud_stems(length: int) -> dict[str, np.ndarray]:
    """(2, length) stems: bass and other peak well above full scale but mostly cancel, so
    that their sum (the mixture) stays below it."""
    t = np.arange(length) / SR
    sine = np.stack([np.sin(2 * np.pi * 110 * t)] * 2).astype(np.float32)
    return {"drums": 0.1 * np.cos(7 * sine), "bass": 1.5 * sine, "other": -1.3 * sine,
            "vocals": 0.2 * sine ** 2}


@pytest.mark.parametrize("int16", [True, False])
def test_loud_stems_are_written_without_wraparound(tmp_path: Path, int16: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    length = SR // 2
    stems = _loud_stems(length)
    monkeypatch.setattr(automix, "render_stem",
                        lambda root, stem, length, channels: stems[stem.source])
    plan = RemixPlan("loud - mix00", "train", "loud", length,
                     [StemPlan(source, f"t{k}", 0., 1., 0) for k, source in enumerate(SOURCES)])
    assert automix.render_remix(tmp_path, tmp_path, plan, SR, 2, int16)
    folder = tmp_path / plan.folder
    read = {name: sf.read(str(folder / f"{name}.wav"), dtype="float32", always_2d=True)[0].T
            for name in ["mixture", *SOURCES]}
    gain = automix.write_manifest(tmp_path)[plan.folder]["gain"]
    assert sf.info(str(folder / "bass.wav")).subtype == ("PCM_16" if int16 else "FLOAT")
    if int16:
        assert gain == pytest.approx(automix.HEADROOM / 1.5)  # bass, the loudest file
    else:
        assert gain == 1.  # float32 keeps values above 1
    for source in SOURCES:
        loud = np.abs(stems[source]) > 1e-2
        assert np.all(np.sign(read[source][loud]) == np.sign(stems[source][loud])), source
        np.testing.assert_allclose(read[source], gain * stems[source], atol=1 / 32767)
    np.testing.assert_allclose(read["mixture"], sum(read[s] for s in SOURCES), atol=1e-6)
    assert np.abs(read["bass"]).max() == pytest.approx(1.5 * gain, abs=1e-4)


# ---------------------------------------------------------------------------------------
# Output folder, resume and errors

def test_refuses_a_non_empty_output(musdb: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    require_programs("soundstretch")
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as error:
        automix.main(["--musdb", str(musdb), "--out", str(tmp_path), *LOOSE])
    assert error.value.code == 1
    message = capsys.readouterr().err.strip()
    assert "not empty" in message and "--overwrite" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_resume_keeps_finished_remixes_and_their_manifest_entries(
        musdb: Path, remixed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupted run (a remix missing, a temporary folder left over) resumed with
    fewer mixes per track: the missing remix is made, the others are kept, and so are the
    remixes of the earlier run and their manifest entries (one from the old manifest only,
    its folder having lost its record)."""
    out = Path(shutil.copytree(remixed, tmp_path / "out"))
    before = _manifest(out)
    first = sorted(key for key in before if key.endswith("mix00"))
    stamps = {key: (out / key / "drums.wav").stat().st_mtime_ns for key in first}
    shutil.rmtree(out / first[0])
    (out / "train" / f"{automix.TMP_PREFIX}x-1").mkdir()
    (out / "notes.txt").write_text("mine")
    recordless = sorted(key for key in before if key.endswith("mix01"))[0]
    (out / recordless / automix.PLAN_FILE).unlink()
    capsys.readouterr()
    automix.main(["--musdb", str(musdb), "--out", str(out), "--mixes-per-track", "1",
                  "--overwrite", *LOOSE])
    captured = capsys.readouterr()
    assert f"1 written, {TRACKS - 1} already there" in captured.out
    assert f"holds {TRACKS} track folders that this run does not make" in captured.err
    assert (out / first[0] / "mixture.wav").is_file()
    for key in first[1:]:
        assert (out / key / "drums.wav").stat().st_mtime_ns == stamps[key]
    assert not list((out / "train").glob(automix.TMP_PREFIX + "*"))
    assert (out / "notes.txt").read_text() == "mine"
    assert _manifest(out) == before and set(before) == _remix_folders(out)


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
        assert message.startswith(f"{automix.PROG}: error: ")
        assert expected in message and "\n" not in message, message


@pytest.mark.slow
def test_user_error_is_one_line_and_verbose_adds_the_traceback(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tools.automix", "--musdb", str(tmp_path / "nope"),
            "--out", str(tmp_path / "out")]
    for verbose in (False, True):
        result = subprocess.run([*argv, *(["-v"] if verbose else [])], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("tools.automix: error: ") and "nope" in lines[-1]
        if verbose:
            assert lines[0].startswith("Traceback") and "DatasetError" in result.stderr
        else:
            assert len(lines) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_env_variables_are_the_defaults(musdb: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    require_programs("soundstretch")
    monkeypatch.setenv("MUSDB_PATH", str(musdb))
    monkeypatch.setenv("AUTOMIX_MUSDB_PATH", str(tmp_path))
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit):  # reaches the output check: both paths were taken
        automix.main([])
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
    shutil.copytree(musdb / "train" / "synth_004", root / "synth_004")
    (root / "synth_004" / "bass.wav").unlink()
    with pytest.raises(DatasetError, match="bass.wav"):
        automix.analyse_track(root, "synth_004", SOURCES)


@pytest.mark.slow
def test_other_sources_in_a_process_pool(tmp_path: Path) -> None:
    require_programs("soundstretch")
    sources = ["drums", "bass", "guitar"]
    musdb = generate_dataset(tmp_path / "musdb", tracks=6, seconds=4., samplerate=SR, seed=3,
                             sources=sources, test_tracks=0, valid_tracks=3)
    out = tmp_path / "out"
    automix.main(["--musdb", str(musdb), "--out", str(out), "--sources", *sources,
                  "--mixes-per-track", "1", "--segment", "2", *LOOSE[:-1], "2"])
    manifest = _manifest(out)
    assert len(manifest) == 6 and set(manifest) == _remix_folders(out)
    for key, remix in manifest.items():
        assert list(remix["stems"]) == sources
        assert SR <= remix["length_samples"] <= 2 * SR
        assert sorted(p.name for p in (out / key).glob("*.wav")) == [
            "bass.wav", "drums.wav", "guitar.wav", "mixture.wav"]


# ---------------------------------------------------------------------------------------
# What the remixes sound like

def test_remixed_drums_follow_the_target(remixed: Path, analyses: list[TrackAnalysis]) -> None:
    """Borrowed drums are stretched to the target's tempo and start on a beat."""
    tempos = {analysis.name: analysis.tempo for analysis in analyses}
    for key, remix in _manifest(remixed).items():
        drums, _ = sf.read(str(remixed / key / "drums.wav"), dtype="float32")
        tempo, _ = automix_analysis.estimate_beats(drums.mean(axis=1), SR)
        target = tempos[remix["target"]]
        ratio = min((tempo / target, 2 * tempo / target, tempo / target / 2),
                    key=lambda r: abs(np.log(r)))
        assert abs(ratio - 1) < 0.05, (key, remix["stems"]["drums"], tempo, target)
        head = np.abs(drums[:int(0.03 * SR)]).max()
        assert head > 0.3 * np.abs(drums).max(), key  # a kick right at the start


def _chroma(mono: np.ndarray) -> np.ndarray:
    import librosa
    return librosa.feature.chroma_cqt(y=mono, sr=SR, hop_length=4096).mean(axis=1)  # (12,)


def test_borrowed_stems_are_shifted_by_the_planned_pitch(musdb: Path, remixed: Path) -> None:
    """The chroma of each `other` stem is that of its source region, rolled by the shift."""
    for key, remix in _manifest(remixed).items():
        stem = remix["stems"]["other"]
        frames = int(remix["length_samples"] * stem["tempo_factor"])
        original, _ = automix.read_stem(musdb / "train", stem["track"], "other",
                                        int(stem["offset_seconds"] * SR), frames)
        rendered, _ = sf.read(str(remixed / key / "other.wav"), dtype="float32")
        before, after = _chroma(original.mean(axis=0)), _chroma(rendered.mean(axis=1))
        scores = [np.corrcoef(np.roll(before, shift), after)[0, 1] for shift in range(12)]
        assert int(np.argmax(scores)) == stem["pitch_semitones"] % 12, (key, stem)
