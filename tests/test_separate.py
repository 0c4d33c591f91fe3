"""The `demucs` command end to end, on tiny random-weights models exported to a temp repo:
outputs, every option, batch robustness (bad tracks reported, the others separated) and
the checks made before the model loads."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import soundfile
import torch
import yaml

from demucs import separate
from demucs.apply import apply_model
from demucs.audio import AudioFile, save_audio
from demucs.htdemucs import HTDemucs
from demucs.states import load_model, save_with_checksum, serialize_model

from helpers import (SOURCES, file_bytes, main_error, needs_ffmpeg, noise, one_line,
                     read_wav, skip_or_fail, tiny_demucs, tiny_hdemucs, tones)

SR = 44100
SECONDS = 3


class Setup(tp.NamedTuple):
    repo: Path
    mix: Path
    mix_wav: torch.Tensor
    short: Path  # a 1 s track, for the tests of options and errors


def make_mix(seconds: float = SECONDS, samplerate: int = SR, channels: int = 2) -> torch.Tensor:
    """Tones at 110, 440 and 1320 Hz (one per channel) and a little noise, (C, T)."""
    wav = tones([110, 440, 1320][:channels], seconds, samplerate, 0.3)
    return wav + noise(channels, wav.shape[-1], seed=0, scale=0.05)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("separate")
    repo = root / "release_models"
    hdemucs = tiny_hdemucs(seed=0, segment=2)
    demucs = tiny_demucs(seed=1, depth=4, segment=2)
    save_with_checksum(serialize_model(hdemucs, {"model": "hdemucs"}), repo / "tinyhd.th")
    save_with_checksum(serialize_model(demucs, {"model": "demucs"}), repo / "tinyd.th")
    (repo / "duo.yaml").write_text(yaml.safe_dump({
        "models": ["tinyhd", "tinyd"], "weights": [[1, 1, 0, 1], [1, 0, 1, 1]], "segment": 1.5}))
    mix_wav = make_mix()
    save_audio(mix_wav, root / "mix.wav", SR, as_float=True)
    save_audio(make_mix(1), root / "short.wav", SR, as_float=True)
    return Setup(repo, root / "mix.wav", mix_wav, root / "short.wav")


def run_main(argv: tp.List[str]) -> None:
    """Run the command in-process; fail on a non-zero exit."""
    try:
        separate.main(argv)
    except SystemExit as exit:
        assert exit.code in (0, None), f"demucs {' '.join(argv)} exited with {exit.code}"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m demucs ARGS` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "demucs", *args], capture_output=True,
                          text=True, timeout=300)


def demucs_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one-line error of `demucs ARGV` (run in process), which exits with status 1."""
    return main_error(separate.main, list(argv), capsys)


def expected_sources(setup: Setup, name: str, **kwargs: tp.Any) -> torch.Tensor:
    """What the command must compute: normalise, apply_model, denormalise."""
    if name == "duo":
        from demucs.pretrained import get_model
        model = get_model(name, repo=setup.repo)
    else:
        model = load_model(next(setup.repo.glob(f"{name}-*.th")))
    model.eval()
    ref = setup.mix_wav.mean(0)
    norm = (setup.mix_wav - ref.mean()) / ref.std()
    return apply_model(model, norm[None], **kwargs)[0] * ref.std() + ref.mean()


@pytest.mark.slow
def test_console_script_default_output(setup: Setup, tmp_path: Path) -> None:
    demucs_bin = Path(sys.executable).parent / "demucs"
    if not demucs_bin.exists():
        skip_or_fail("the demucs console script is not installed (pip install -e .)")
    out = tmp_path / "separated"
    proc = subprocess.run([str(demucs_bin), "--repo", str(setup.repo), "-n", "tinyhd",
                           str(setup.mix), "-o", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = out / "tinyhd" / "mix"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.wav" for s in SOURCES)
    for source in SOURCES:
        info = soundfile.info(str(folder / f"{source}.wav"))
        assert (info.samplerate, info.channels, info.subtype) == (SR, 2, "PCM_16")
        assert info.frames == SECONDS * SR


@pytest.mark.parametrize("name", ["tinyhd", "duo"])
def test_outputs_are_the_model_estimates(setup: Setup, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", name, str(setup.mix), "-o", str(out),
              "--shifts", "0", "--float32", "--clip-mode", "clamp", "-d", "cpu"])
    expected = expected_sources(setup, name, shifts=0, split=True, overlap=0.25)
    expected = expected.clamp(-0.99, 0.99)
    for index, source in enumerate(SOURCES):
        got = read_wav(out / name / "mix" / f"{source}.wav")
        assert got.shape == (2, SECONDS * SR)
        assert torch.allclose(got, expected[index], atol=1e-5), source


def test_two_stems(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyhd", str(setup.mix), "-o", str(out),
              "--shifts", "0", "--float32", "--clip-mode", "clamp", "--two-stems", "vocals",
              "-d", "cpu"])
    folder = out / "tinyhd" / "mix"
    assert sorted(p.name for p in folder.iterdir()) == ["no_vocals.wav", "vocals.wav"]
    expected = expected_sources(setup, "tinyhd", shifts=0)
    vocals = expected[3].clamp(-0.99, 0.99)
    assert torch.allclose(read_wav(folder / "vocals.wav"), vocals, atol=1e-5)
    rest = expected[:3].sum(0).clamp(-0.99, 0.99)
    assert torch.allclose(read_wav(folder / "no_vocals.wav"), rest, atol=1e-5)


def test_formats_filename_and_options(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "duo", str(setup.mix), "-o", str(out),
              "--int24", "--filename", "{stem}-{track}.{trackext}.{ext}", "--segment", "2",
              "--overlap", "0.1", "-j", "2"])
    names = sorted(p.name for p in (out / "duo").iterdir())
    assert names == sorted(f"{s}-mix.wav.wav" for s in SOURCES)
    assert soundfile.info(str(out / "duo" / "drums-mix.wav.wav")).subtype == "PCM_24"


def test_no_split_and_resampled_mono_input(setup: Setup, tmp_path: Path) -> None:
    mono = tmp_path / "mono song.wav"
    save_audio(make_mix(2, 22050, channels=1), mono, 22050)
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyd", str(mono), "-o", str(out), "--no-split"])
    info = soundfile.info(str(out / "tinyd" / "mono song" / "bass.wav"))
    assert (info.samplerate, info.channels) == (SR, 2)
    assert abs(info.frames - 2 * SR) <= 2


@needs_ffmpeg
def test_mp3_output(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyhd", str(setup.mix), "-o", str(out),
              "--mp3", "--mp3-bitrate", "128", "--two-stems", "drums"])
    folder = out / "tinyhd" / "mix"
    assert sorted(p.name for p in folder.iterdir()) == ["drums.mp3", "no_drums.mp3"]
    file = AudioFile(folder / "drums.mp3")
    assert file.info["streams"][0]["codec_name"] == "mp3"
    assert file.samplerate() == SR and file.channels() == 2
    assert file.duration() == pytest.approx(SECONDS, abs=0.1)


# ---------------------------------------------------------------------------------------
# Options of upstream 4.1 on the short track


class Run(tp.NamedTuple):
    code: int
    out: str
    err: str


def run_capture(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    """Run `demucs ARGV` in process; its exit status, stdout and stderr."""
    code = 0
    try:
        separate.main(list(argv))
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def error_lines(err: str) -> list[str]:
    """The `demucs: error:` lines of stderr (progress bars aside)."""
    return [line for line in err.splitlines() if line.startswith("demucs: error: ")]


def vocals_only(setup: Setup, out: Path, *options: str) -> Path:
    """Separate the short track writing only the vocals; the path of that file."""
    run_main(["--repo", str(setup.repo), "-n", "tinyhd", str(setup.short), "-o", str(out),
              "--shifts", "0", "--two-stems", "vocals", "--other-method", "none", "-d", "cpu",
              *options])
    folder = out / "tinyhd" / "short"
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].stem == "vocals", files
    return files[0]


@pytest.mark.parametrize("options,fmt,subtype", [
    ([], "WAV", "PCM_16"),
    (["--int24"], "WAV", "PCM_24"),
    (["--float32"], "WAV", "FLOAT"),
    (["--flac"], "FLAC", "PCM_16"),
    (["--flac", "--int24"], "FLAC", "PCM_24"),
    (["--mp3", "--mp3-bitrate", "96", "--mp3-preset", "7"], "MP3", "MPEG_LAYER_III"),
])
def test_output_formats(setup: Setup, tmp_path: Path, options: list[str], fmt: str,
                        subtype: str) -> None:
    path = vocals_only(setup, tmp_path, *options)
    assert path.suffix == "." + fmt.lower()
    info = soundfile.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.channels) == (fmt, subtype, SR, 2)
    if fmt != "MP3":  # mp3 adds encoder delay and padding
        assert info.frames == SR


def test_mp3_presets_trade_quality(setup: Setup, tmp_path: Path) -> None:
    best = vocals_only(setup, tmp_path / "best", "--mp3", "--mp3-preset", "2")
    fast = vocals_only(setup, tmp_path / "fast", "--mp3", "--mp3-preset", "7")
    assert best.read_bytes() != fast.read_bytes()


def mix_and_stems(folder: Path, *names: str) -> dict[str, torch.Tensor]:
    return {name: read_wav(folder / f"{name}.wav") for name in names}


@pytest.mark.parametrize("method,files", [("add", ["no_vocals", "vocals"]),
                                          ("minus", ["minus_vocals", "vocals"]),
                                          ("none", ["vocals"])])
def test_other_method(setup: Setup, tmp_path: Path, method: str, files: list[str]) -> None:
    loud = tmp_path / "loud.wav"  # peaks above 1: --clip-mode none keeps them (float32)
    mix = 20 * make_mix(1)
    save_audio(mix, loud, SR, as_float=True, clip="none")
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyhd", str(loud), "-o", str(out), "--shifts",
              "0", "--float32", "--clip-mode", "none", "--two-stems", "vocals",
              "--other-method", method, "-d", "cpu"])
    folder = out / "tinyhd" / "loud"
    assert sorted(p.stem for p in folder.iterdir()) == files
    got = mix_and_stems(folder, *files)
    assert got["vocals"].abs().max() > 1  # not rescaled, not clamped
    if method == "minus":
        assert torch.allclose(got["minus_vocals"], mix - got["vocals"], atol=1e-5)
    if method == "add":
        model = load_model(next(setup.repo.glob("tinyhd-*.th"))).eval()
        ref = mix.mean(0)
        norm = (mix - ref.mean()) / ref.std()
        stems = apply_model(model, norm[None], shifts=0)[0] * ref.std() + ref.mean()
        assert torch.allclose(got["vocals"], stems[3], atol=1e-5)
        assert torch.allclose(got["no_vocals"], stems[:3].sum(0), atol=1e-5)


@pytest.mark.parametrize("mode", ["rescale", "clamp", "none"])
def test_clip_modes(setup: Setup, tmp_path: Path, mode: str) -> None:
    loud = tmp_path / "loud.wav"
    save_audio(4 * make_mix(1), loud, SR, as_float=True, clip="none")
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyd", str(loud), "-o", str(out), "--shifts",
              "0", "--float32", "--clip-mode", mode, "--two-stems", "drums",
              "--other-method", "minus"])
    peak = read_wav(out / "tinyd" / "loud" / "minus_drums.wav").abs().max().item()
    expected = {"rescale": pytest.approx(1 / 1.01, abs=1e-6), "clamp": pytest.approx(0.99)}
    assert peak == expected[mode] if mode in expected else peak > 1


def test_segment_jobs_and_bag_notice(setup: Setup, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--repo", str(setup.repo), "-n", "duo", str(setup.short), "--shifts", "0",
              "--float32", "-d", "cpu", "--segment", "0.75"]
    first = run_capture(capsys, *common, "-o", str(tmp_path / "a"))
    assert first.code == 0, error_lines(first.err)
    assert "Selected model is a bag of 2 models" in first.out
    assert "separated 1 of 1 tracks" in first.out
    threads = run_capture(capsys, *common, "-o", str(tmp_path / "b"), "-j", "2")
    assert threads.code == 0, error_lines(threads.err)
    for source in SOURCES:
        a = read_wav(tmp_path / "a" / "duo" / "short" / f"{source}.wav")
        assert torch.equal(a, read_wav(tmp_path / "b" / "duo" / "short" / f"{source}.wav"))
    # A float segment is the chunk size: other than the bag's 1.5 s, other outputs.
    run_main([*common[:-1], "1.5", "-o", str(tmp_path / "c")])
    c = read_wav(tmp_path / "c" / "duo" / "short" / "drums.wav")
    assert not torch.equal(c, read_wav(tmp_path / "a" / "duo" / "short" / "drums.wav"))


def test_single_model_has_no_bag_notice(setup: Setup, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = run_capture(capsys, "--repo", str(setup.repo), "-n", "tinyd", str(setup.short),
                      "-o", str(tmp_path), "--two-stems", "bass", "--other-method", "none")
    assert run.code == 0 and "bag of" not in run.out


def test_segment_longer_than_allowed(setup: Setup, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A v4 Transformer (trained on 0.5 s) refuses longer segments, alone or in a bag."""
    torch.manual_seed(0)
    model = HTDemucs(SOURCES, samplerate=8000, segment=0.5, channels=8, nfft=2048, t_layers=2)
    repo = tmp_path / "repo"
    save_with_checksum(serialize_model(model, {}), repo / "tinyht.th")
    (repo / "htbag.yaml").write_text("models: [tinyht]\n")
    for name in ["tinyht", "htbag"]:
        line = demucs_error(capsys, "--repo", str(repo), "-n", name, str(setup.short),
                            "-o", str(tmp_path), "--segment", "0.75")
        assert_mentions(line, "--segment", "0.75", "maximum segment is 0.5 s")
    assert not (tmp_path / "tinyht").exists()
    run_main(["--repo", str(repo), "-n", "htbag", str(setup.short), "-o", str(tmp_path),
              "--segment", "0.25", "--two-stems", "bass", "--other-method", "none"])
    info = soundfile.info(str(tmp_path / "htbag" / "short" / "bass.wav"))
    assert (info.samplerate, info.frames) == (8000, 8000)


def test_name_is_a_package_or_bag_path(setup: Setup, tmp_path: Path) -> None:
    package = next(setup.repo.glob("tinyhd-*.th"))
    by_name = vocals_only(setup, tmp_path / "name", "--float32")
    run_main(["-n", str(package), str(setup.short), "-o", str(tmp_path / "path"), "--shifts",
              "0", "--two-stems", "vocals", "--other-method", "none", "--float32", "-d", "cpu"])
    by_path = tmp_path / "path" / "tinyhd" / "short" / "vocals.wav"
    assert torch.equal(read_wav(by_name), read_wav(by_path))
    # A bag file elsewhere: its models come from --repo.
    bag = tmp_path / "bags" / "my_duo.yaml"
    bag.parent.mkdir()
    shutil.copy(setup.repo / "duo.yaml", bag)
    out = tmp_path / "bag"
    run_main(["-n", str(bag), "--repo", str(setup.repo), str(setup.short), "-o", str(out),
              "--two-stems", "drums", "--other-method", "none"])
    assert (out / "my_duo" / "short" / "drums.wav").is_file()


def test_list_models(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(setup.repo, repo)
    (repo / "solo.yaml").write_text("models: [tinyd]\n")
    (repo / "broken.yaml").write_text("models: [tinyd\n")
    run = run_capture(capsys, "--list-models", "--repo", str(repo))
    assert run.code == 0, run.err
    lines = [" ".join(line.split()) for line in run.out.splitlines()]
    assert lines[0] == "Bags of models:"
    assert lines[1].startswith("broken invalid bag (") and "broken.yaml" in lines[1]
    assert lines[2:] == ["duo bag of 2 models", "solo bag of 1 model", "Single models:",
                         "tinyd single model", "tinyhd single model"]


def test_list_remote_models(capsys: pytest.CaptureFixture[str]) -> None:
    run = run_capture(capsys, "--list-models")
    assert run.code == 0, run.err
    lines = {" ".join(line.split()) for line in run.out.splitlines()}
    for line in ["htdemucs bag of 1 model", "htdemucs_ft bag of 4 models",
                 "htdemucs_6s bag of 1 model", "hdemucs_mmi bag of 1 model",
                 "mdx_extra_q bag of 4 models", "955717e8 single model"]:
        assert line in lines
    assert "demucs: error: " in run_capture(capsys, "--list-models", "--repo",
                                            "/nonexistent").err


# ---------------------------------------------------------------------------------------
# Batch robustness: each bad track in one call with a good one


def bad_tracks(root: Path, out: Path) -> dict[str, Path]:
    """One track per way of failing, keyed by what the error line must say."""
    root.mkdir(parents=True, exist_ok=True)
    notes = root / "notes.mp3"
    notes.write_text("not audio\n" * 100)
    (root / "empty.wav").touch()
    no_frames = write_wav_frames(root / "no_frames.wav", 0)
    tiny = write_wav_frames(root / "tiny.wav", 5)
    (root / "folder.wav").mkdir()
    blocked = write_wav_frames(root / "blocked.wav", SR // 2)
    (out / "tinyd" / "blocked" / "drums.wav").mkdir(parents=True)  # a folder in the way
    return {"does not exist": root / "missing.wav", "notes.mp3": notes,
            "empty (0 bytes)": root / "empty.wav", "0 samples": no_frames,
            "5 samples": tiny, "is a directory": root / "folder.wav",
            "Cannot write": blocked}


def write_wav_frames(path: Path, frames: int) -> Path:
    soundfile.write(str(path), 0.1 * torch.ones(frames, 2).numpy(), SR, subtype="FLOAT")
    return path


def test_bad_tracks_do_not_stop_the_batch(setup: Setup, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    bad = bad_tracks(tmp_path / "in", out)
    tracks = [str(bad["does not exist"]), str(setup.short), *map(str, list(bad.values())[1:])]
    run = run_capture(capsys, "--repo", str(setup.repo), "-n", "tinyd", *tracks, "-o",
                      str(out), "--shifts", "0")
    assert run.code == 1
    assert "Traceback" not in run.err
    folder = out / "tinyd" / "short"
    assert sorted(p.stem for p in folder.iterdir()) == sorted(SOURCES)
    lines = error_lines(run.err)
    assert len(lines) == len(bad) + 1
    for cause, path in bad.items():  # missing, folder, empty: reported before the model loads
        assert len([line for line in lines[:-1] if path.name in line and cause in line]) == 1
    failed = ", ".join(str(path) for path in bad.values())
    assert lines[-1] == f"demucs: error: separated 1 of {len(bad) + 1} tracks; failed: {failed}"


@pytest.mark.parametrize("options, fix", [([], "lower --segment"),
                                          (["--no-split"], "drop --no-split")])
def test_out_of_memory_track_does_not_stop_the_batch(
        setup: Setup, tmp_path: Path, options: list[str], fix: str,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A track that runs out of device memory (PyTorch's error as on a GPU) gets one line
    saying what takes less memory; the next track is still separated."""
    big = tmp_path / "big.wav"
    shutil.copy(setup.short, big)
    real = separate.Separator.separate_stream

    def out_of_memory_on_big(self: tp.Any, mix: tp.Any) -> tp.Any:
        if Path(mix.path).name == "big.wav":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity "
                "of 11.76 GiB of which 2.10 GiB is free. Of the allocated memory ...")
        return real(self, mix)

    monkeypatch.setattr(separate.Separator, "separate_stream", out_of_memory_on_big)
    out = tmp_path / "out"
    run = run_capture(capsys, "--repo", str(setup.repo), "-n", "tinyd", str(big),
                      str(setup.short), "-o", str(out), "--shifts", "0", *options)
    assert run.code == 1 and "Traceback" not in run.err
    assert error_lines(run.err)[0] == (
        f"demucs: error: {big}: out of memory (CUDA out of memory. Tried to allocate 9.00 "
        f"GiB): {fix}{' (or set --segment)' if options else ''}, or separate on the CPU "
        "(-d cpu).")
    assert sorted(p.stem for p in (out / "tinyd" / "short").iterdir()) == sorted(SOURCES)


def test_bad_track_traceback_with_verbose(setup: Setup, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.wav"
    notes.write_text("not audio\n" * 100)
    run = run_capture(capsys, "-v", "--repo", str(setup.repo), "-n", "tinyd", str(notes),
                      str(setup.short), "-o", str(tmp_path / "out"), "--two-stems", "bass")
    assert run.code == 1
    assert "Traceback" in run.err and "AudioError" in run.err
    assert (tmp_path / "out" / "tinyd" / "short" / "bass.wav").is_file()


def test_only_missing_tracks_load_no_model(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = run_capture(capsys, "-n", "nope", str(tmp_path / "a.wav"), str(tmp_path / "b.wav"),
                      "-o", str(tmp_path / "out"))
    assert run.code == 1
    lines = error_lines(run.err)
    assert len(lines) == 3 and "'nope'" not in run.err
    assert lines[-1].startswith("demucs: error: separated 0 of 2 tracks; failed: ")
    assert not (tmp_path / "out").exists()


def test_same_output_twice_is_refused(setup: Setup, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other" / "short.wav"
    other.parent.mkdir()
    shutil.copy(setup.short, other)
    # The model is never loaded: the unknown name is not what is reported.
    line = demucs_error(capsys, "-n", "nope", str(setup.short), str(other), "-o",
                        str(tmp_path / "out"))
    assert_mentions(line, str(setup.short), str(other), "short")
    line = demucs_error(capsys, "-n", "nope", str(setup.short), str(setup.mix),
                        "--filename", "{stem}.{ext}", "-o", str(tmp_path / "out"))
    assert_mentions(line, str(setup.short), str(setup.mix))
    line = demucs_error(capsys, "-n", "nope", str(setup.short), str(setup.short), "-o",
                        str(tmp_path / "out"))
    assert line.count(str(setup.short)) >= 2
    assert not (tmp_path / "out").exists()
    # Different extensions tell them apart with {trackext}.
    flac = tmp_path / "short.flac"
    save_audio(make_mix(0.5), flac, SR)
    run_main(["--repo", str(setup.repo), "-n", "tinyd", str(setup.short), str(flac), "-o",
              str(tmp_path / "out"), "--filename", "{track}.{trackext}/{stem}.{ext}",
              "--two-stems", "bass", "--other-method", "none"])
    assert sorted(p.name for p in (tmp_path / "out" / "tinyd").iterdir()) == \
        ["short.flac", "short.wav"]


def test_output_over_an_input_is_refused(setup: Setup, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    track = tmp_path / "tinyd" / "bass.wav"
    track.parent.mkdir()
    shutil.copy(setup.short, track)
    line = demucs_error(capsys, "--repo", str(setup.repo), "-n", "tinyd", str(track), "-o",
                        str(tmp_path), "--filename", "{stem}.{ext}")
    assert_mentions(line, "overwrite", str(track))


@pytest.mark.parametrize("option,message", [
    (["--filename", "{track}/{bad}.{ext}"], "--filename"),
    (["--filename", "{track}.{ext}"], "same file"),
    (["--filename", "{track}/{stem}.ogg"], "'.ogg'"),
    (["--filename", "/abs/{stem}.{ext}"], "relative"),
    (["--mp3", "--filename", "{track}/{stem}.wav"], "--mp3"),
    (["--flac", "--float32"], "--float32"),
    (["--mp3", "--mp3-bitrate", "500"], "--mp3-bitrate"),
    (["--mp3", "--mp3-preset", "9"], "--mp3-preset"),
    (["--segment", "0"], "--segment"),
    (["--overlap", "1.5"], "--overlap"),
    (["--shifts", "-1"], "--shifts"),
    (["-j", "-1"], "--jobs"),
    (["-d", "gpu"], "gpu"),
])
def test_checked_before_the_model_loads(setup: Setup, tmp_path: Path, option: list[str],
                                        message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    line = demucs_error(capsys, "-n", "nope", str(setup.short), "-o", str(tmp_path / "out"),
                        *option)
    assert_mentions(line, "demucs: error: ", message)
    assert "'nope'" not in line
    assert not (tmp_path / "out").exists()


def test_output_folder_is_a_file(setup: Setup, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = demucs_error(capsys, "-n", "nope", str(setup.short), "-o", str(blocker / "out"))
    assert_mentions(line, str(blocker), "not a directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    line = demucs_error(capsys, "-n", "nope", str(setup.mix), "-d", "cuda")
    assert_mentions(line, "CUDA is not available")


def test_no_tracks(capsys: pytest.CaptureFixture[str]) -> None:
    assert_mentions(demucs_error(capsys), "tracks", "--list-models")


# ---------------------------------------------------------------------------------------
# Errors of the whole command: one line on stderr, exit status 1. In process (fast); the
# subprocess test checks what a shell sees: no traceback unless -v.
def assert_mentions(line: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.slow
def test_user_error_has_no_traceback_unless_verbose(setup: Setup, tmp_path: Path) -> None:
    args = ["--repo", str(setup.repo), "-n", "nope", str(setup.mix), "-o", str(tmp_path)]
    quiet = run_cli(*args)
    assert quiet.returncode == 1
    assert_mentions(one_line(quiet.stderr), "demucs: error: ", "'nope'")
    verbose = run_cli("-v", *args)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "ModelLoadingError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_unknown_model(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = demucs_error(capsys, "--repo", str(setup.repo), "-n", "nope", str(setup.mix),
                        "-o", str(tmp_path / "out"))
    assert_mentions(line, "'nope'", "duo", "tinyhd", "tinyd")


def test_corrupt_package(setup: Setup, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    good = next(setup.repo.glob("tinyhd-*.th"))
    (repo / "broken.th").write_bytes(good.read_bytes()[:2000])
    line = demucs_error(capsys, "--repo", str(repo), "-n", "broken", str(setup.mix),
                        "-o", str(tmp_path))
    assert_mentions(line, "broken.th")
    # Same content under a checksummed name: the checksum catches it first.
    (repo / "broken.th").rename(repo / f"bad-{good.stem.rsplit('-', 1)[1]}.th")
    line = demucs_error(capsys, "--repo", str(repo), "-n", "bad", str(setup.mix),
                        "-o", str(tmp_path))
    assert_mentions(line, "bad-", "Checksum mismatch")
    line = demucs_error(capsys, "-n", str(repo / "nothere.th"), str(setup.mix))
    assert_mentions(line, "nothere.th", "not found")


def test_bad_stem(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = demucs_error(capsys, "--repo", str(setup.repo), "-n", "tinyhd", "--two-stems",
                        "guitar", str(setup.mix), "-o", str(tmp_path / "out"))
    assert_mentions(line, "guitar", "drums, bass, other, vocals")


@pytest.mark.parametrize("name", ["tinyhd", "tinyd"])
def test_silent_track_gives_silent_stems(setup: Setup, tmp_path: Path, name: str) -> None:
    """Zero std: the command does not divide by it, and each model scales its output by
    the (zero) std of its input, so every stem is exactly silent."""
    silent = tmp_path / "silence.wav"
    save_audio(torch.zeros(2, SR), silent, SR)
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", name, str(silent), "-o", str(out), "--float32"])
    folder = out / name / "silence"
    assert sorted(p.stem for p in folder.iterdir()) == sorted(SOURCES)
    for source in SOURCES:
        assert torch.equal(read_wav(folder / f"{source}.wav"), torch.zeros(2, SR)), source


# Streaming: the command reads by blocks and writes as the segments complete
def write_whole(argv: list[str], track: Path) -> None:
    """The files the command wrote before it streamed: the whole track separated, then
    each stem saved."""
    run = separate.Run.from_args(separate.get_parser().parse_args(argv))
    separator = separate.load_separator(run)
    origin, stems = separator.separate_audio_file(track)
    for name, wav in separate.stems_to_write(run.output, origin, stems).items():
        save_audio(wav, run.path(track, name), separator.samplerate, **run.output.save_kwargs())


FORMAT_FLAGS = {"wav16": [], "wav24": ["--int24"], "float32": ["--float32"],
                "flac16": ["--flac"], "flac24": ["--flac", "--int24"],
                "mp3": ["--mp3", "--mp3-bitrate", "128", "--mp3-preset", "7"]}


@pytest.fixture(scope="module")
def loud(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s whose stems peak above 1 (rescale and clamp change them), as a wav file."""
    path = tmp_path_factory.mktemp("loud") / "loud.wav"
    save_audio(4 * make_mix(2), path, SR, as_float=True, clip="none")
    return path


@pytest.mark.parametrize("clip", ["rescale", "clamp", "none"])
@pytest.mark.parametrize("fmt", list(FORMAT_FLAGS))
def test_streamed_files_are_those_of_the_whole_track(
        setup: Setup, loud: Path, tmp_path: Path, fmt: str, clip: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte for byte, in every format and clip mode; 0.5 s segments (6 pieces of output)
    and a rescale pass of several blocks."""
    monkeypatch.setattr(separate.AudioWriter, "BLOCK", 20000)
    argv = ["--repo", str(setup.repo), "-n", "tinyhd", "--segment", "0.5", "--clip-mode",
            clip, *FORMAT_FLAGS[fmt], str(loud)]
    random.seed(7)
    write_whole(argv + ["-o", str(tmp_path / "whole")], loud)
    random.seed(7)
    run_main(argv + ["-o", str(tmp_path / "streamed")])
    whole = sorted((tmp_path / "whole").rglob("*.*"))
    streamed = sorted((tmp_path / "streamed").rglob("*.*"))
    assert [p.name for p in whole] == [p.name for p in streamed] and len(whole) == 4
    for a, b in zip(whole, streamed):
        assert file_bytes(a) == file_bytes(b), a.name


@pytest.mark.parametrize("name,options", [
    ("tinyhd", ["--two-stems", "vocals"]),
    ("tinyhd", ["--two-stems", "vocals", "--other-method", "minus", "--int24"]),
    ("tinyd", ["--two-stems", "drums", "--other-method", "minus", "--shifts", "2"]),
    ("duo", ["--shifts", "1", "--overlap", "0.5"]),
    ("duo", ["--two-stems", "bass", "--clip-mode", "clamp", "-j", "2", "--shifts", "0"])])
def test_streamed_two_stems_and_bags_are_those_of_the_whole_track(
        setup: Setup, loud: Path, tmp_path: Path, name: str, options: list[str]) -> None:
    argv = ["--repo", str(setup.repo), "-n", name, *options, str(loud)]
    random.seed(8)
    write_whole(argv + ["-o", str(tmp_path / "whole")], loud)
    random.seed(8)
    run_main(argv + ["-o", str(tmp_path / "streamed")])
    whole = sorted((tmp_path / "whole").rglob("*.*"))
    streamed = sorted((tmp_path / "streamed").rglob("*.*"))
    assert [p.name for p in whole] == [p.name for p in streamed] and whole
    for a, b in zip(whole, streamed):
        assert file_bytes(a) == file_bytes(b), a.name


def test_failed_separation_writes_no_stem(setup: Setup, loud: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A track that fails after some of its stems were streamed leaves no file behind
    (nor their temporary files); the other tracks are still written."""
    real = separate.Separator.separate_stream

    def fails_half_way(self: tp.Any, mix: tp.Any) -> tp.Any:
        for index, piece in enumerate(real(self, mix)):
            if index == 2 and Path(mix.path).name == "loud.wav":
                raise RuntimeError("the model broke")
            yield piece

    monkeypatch.setattr(separate.Separator, "separate_stream", fails_half_way)
    out = tmp_path / "out"
    run = run_capture(capsys, "--repo", str(setup.repo), "-n", "tinyhd", "--segment", "0.5",
                      str(loud), str(setup.short), "-o", str(out))
    assert run.code == 1 and "the model broke" in run.err
    assert [p.name for p in (out / "tinyhd").iterdir()] != [] and \
        list((out / "tinyhd" / "loud").iterdir()) == []
    assert sorted(p.stem for p in (out / "tinyhd" / "short").iterdir()) == sorted(SOURCES)


@pytest.mark.slow
def test_command_on_a_long_track(setup: Setup, tmp_path: Path) -> None:
    """`python -m demucs` on 150 s: read by blocks, written as it goes; the stem and the
    rest add up to the mix over the whole track (float32, no clipping)."""
    track = tmp_path / "long.flac"
    seconds = 150
    with soundfile.SoundFile(str(track), "w", SR, 2, "PCM_16", format="FLAC") as f:
        for second in range(0, seconds, 10):
            f.write(0.5 * make_mix(10).t().numpy() * (1 + second / seconds))
    proc = run_cli("--repo", str(setup.repo), "-n", "tinyhd", "--two-stems", "vocals",
                   "--other-method", "minus", "--float32", "--clip-mode", "none",
                   "--shifts", "0", str(track), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "out" / "tinyhd" / "long"
    assert sorted(p.name for p in folder.iterdir()) == ["minus_vocals.wav", "vocals.wav"]
    vocals, rest = read_wav(folder / "vocals.wav"), read_wav(folder / "minus_vocals.wav")
    mix = read_wav(track)
    assert vocals.shape == rest.shape == mix.shape == (2, seconds * SR)
    assert torch.allclose(vocals + rest, mix, atol=1e-6)
    assert vocals.abs().max() > 0 and vocals[:, -SR:].abs().max() > 0
