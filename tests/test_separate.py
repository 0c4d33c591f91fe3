"""The `demucs` command end to end, on tiny random-weights models exported to a temp repo."""
from __future__ import annotations

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
from demucs.states import load_model, save_with_checksum, serialize_model

from helpers import (SOURCES, main_error, needs_ffmpeg, noise, one_line, read_wav,
                     skip_or_fail, tiny_demucs, tiny_hdemucs, tones)

SR = 44100
SECONDS = 3


class Setup(tp.NamedTuple):
    repo: Path
    mix: Path
    mix_wav: torch.Tensor


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
    return Setup(repo, root / "mix.wav", mix_wav)


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
              "--shifts", "0", "--float32", "--clip-mode", "clamp", "--two-stems", "vocals"])
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


# Errors: one line on stderr naming the culprit, exit status 1, nothing written. In process
# (fast); the subprocess test checks what a shell sees: no traceback unless -v.
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


def test_missing_track(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = demucs_error(capsys, "--repo", str(setup.repo), "-n", "tinyhd",
                        str(tmp_path / "nope.wav"), "-o", str(tmp_path / "out"))
    assert_mentions(line, "demucs: error: ", "nope.wav", "does not exist")
    assert not (tmp_path / "out").exists()


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


def test_unreadable_track_and_bad_stem(setup: Setup, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.mp3"
    notes.write_text("not audio\n" * 100)
    line = demucs_error(capsys, "--repo", str(setup.repo), "-n", "tinyhd", str(notes),
                        "-o", str(tmp_path / "out"))
    assert_mentions(line, "notes.mp3")
    line = demucs_error(capsys, "--repo", str(setup.repo), "-n", "tinyhd", "--two-stems",
                        "guitar", str(setup.mix), "-o", str(tmp_path / "out"))
    assert_mentions(line, "guitar", "drums, bass, other, vocals")


@pytest.mark.parametrize("option", [["--segment", "0"], ["--overlap", "1.5"], ["--shifts", "-1"]])
def test_bad_options(setup: Setup, option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = demucs_error(capsys, "--repo", str(setup.repo), "-n", "tinyhd", str(setup.mix),
                        *option)
    assert_mentions(line, option[0])


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    line = demucs_error(capsys, "--repo", str(setup.repo), "-n", "tinyhd", str(setup.mix),
                        "-d", "cuda")
    assert_mentions(line, "CUDA is not available")
