"""The `demucs` command end to end, on tiny random-weights models exported to a temp repo."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

from demucs import separate
from demucs.apply import apply_model
from demucs.audio import AudioFile, save_audio
from demucs.demucs import Demucs
from demucs.hdemucs import HDemucs
from demucs.states import load_model, save_with_checksum, serialize_model

SOURCES = ["drums", "bass", "other", "vocals"]
SR = 44100
SECONDS = 3
# Skipped without ffmpeg, except in CI (`.ci/run` installs it, so it must be there).
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None and not os.environ.get("CI"),
                                  reason="ffmpeg is not installed (.ci/run installs it)")


class Setup(tp.NamedTuple):
    repo: Path
    mix: Path
    mix_wav: torch.Tensor


def make_mix(seconds: float = SECONDS, samplerate: int = SR, channels: int = 2) -> torch.Tensor:
    time = torch.arange(int(seconds * samplerate), dtype=torch.float64) / samplerate
    tones = [0.3 * torch.sin(2 * math.pi * f * time) for f in (110, 440, 1320)[:channels]]
    noise = torch.Generator().manual_seed(0)
    wav = torch.stack(tones).float() + 0.05 * torch.randn(channels, len(time), generator=noise)
    return wav


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("separate")
    repo = root / "release_models"
    torch.manual_seed(0)
    hdemucs = HDemucs(sources=SOURCES, channels=4, segment=2)
    demucs = Demucs(sources=SOURCES, channels=4, depth=4, segment=2)
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
    return subprocess.run([sys.executable, "-m", "demucs", *args], capture_output=True,
                          text=True, timeout=300)


def read(path: Path) -> torch.Tensor:
    data, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy())


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


def test_console_script_default_output(setup, tmp_path):
    demucs_bin = Path(sys.executable).parent / "demucs"
    if not demucs_bin.exists():
        pytest.skip("the demucs console script is not installed (pip install -e .)")
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
def test_outputs_are_the_model_estimates(setup, tmp_path, name):
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", name, str(setup.mix), "-o", str(out),
              "--shifts", "0", "--float32", "--clip-mode", "clamp", "-d", "cpu"])
    expected = expected_sources(setup, name, shifts=0, split=True, overlap=0.25)
    expected = expected.clamp(-0.99, 0.99)
    for index, source in enumerate(SOURCES):
        got = read(out / name / "mix" / f"{source}.wav")
        assert got.shape == (2, SECONDS * SR)
        assert torch.allclose(got, expected[index], atol=1e-5), source


def test_two_stems(setup, tmp_path):
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyhd", str(setup.mix), "-o", str(out),
              "--shifts", "0", "--float32", "--clip-mode", "clamp", "--two-stems", "vocals"])
    folder = out / "tinyhd" / "mix"
    assert sorted(p.name for p in folder.iterdir()) == ["no_vocals.wav", "vocals.wav"]
    expected = expected_sources(setup, "tinyhd", shifts=0)
    assert torch.allclose(read(folder / "vocals.wav"), expected[3].clamp(-0.99, 0.99), atol=1e-5)
    rest = expected[:3].sum(0).clamp(-0.99, 0.99)
    assert torch.allclose(read(folder / "no_vocals.wav"), rest, atol=1e-5)


def test_formats_filename_and_options(setup, tmp_path):
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "duo", str(setup.mix), "-o", str(out),
              "--int24", "--filename", "{stem}-{track}.{trackext}.{ext}", "--segment", "2",
              "--overlap", "0.1", "-j", "2"])
    names = sorted(p.name for p in (out / "duo").iterdir())
    assert names == sorted(f"{s}-mix.wav.wav" for s in SOURCES)
    assert soundfile.info(str(out / "duo" / "drums-mix.wav.wav")).subtype == "PCM_24"


def test_no_split_and_resampled_mono_input(setup, tmp_path):
    mono = tmp_path / "mono song.wav"
    save_audio(make_mix(2, 22050, channels=1), mono, 22050)
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyd", str(mono), "-o", str(out), "--no-split"])
    info = soundfile.info(str(out / "tinyd" / "mono song" / "bass.wav"))
    assert (info.samplerate, info.channels) == (SR, 2)
    assert abs(info.frames - 2 * SR) <= 2


@needs_ffmpeg
def test_mp3_output(setup, tmp_path):
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyhd", str(setup.mix), "-o", str(out),
              "--mp3", "--mp3-bitrate", "128", "--two-stems", "drums"])
    folder = out / "tinyhd" / "mix"
    assert sorted(p.name for p in folder.iterdir()) == ["drums.mp3", "no_drums.mp3"]
    file = AudioFile(folder / "drums.mp3")
    assert file.info["streams"][0]["codec_name"] == "mp3"
    assert file.samplerate() == SR and file.channels() == 2
    assert file.duration() == pytest.approx(SECONDS, abs=0.1)


# Errors: one line on stderr naming the culprit, non-zero exit, nothing written.
def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_user_error_has_no_traceback_unless_verbose(setup: Setup, tmp_path: Path) -> None:
    args = ["--repo", str(setup.repo), "-n", "nope", str(setup.mix), "-o", str(tmp_path)]
    quiet = run_cli(*args)
    assert_one_line_error(quiet, "demucs: error: ", "'nope'")
    assert "Traceback" not in quiet.stderr
    verbose = run_cli("-v", *args)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "ModelLoadingError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_missing_track(setup, tmp_path):
    proc = run_cli("--repo", str(setup.repo), "-n", "tinyhd", str(tmp_path / "nope.wav"),
                   "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "nope.wav", "does not exist")
    assert not (tmp_path / "out").exists()


def test_unknown_model(setup, tmp_path):
    proc = run_cli("--repo", str(setup.repo), "-n", "nope", str(setup.mix),
                   "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "'nope'", "duo", "tinyhd", "tinyd")


def test_corrupt_package(setup, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    good = next(setup.repo.glob("tinyhd-*.th"))
    (repo / "broken.th").write_bytes(good.read_bytes()[:2000])
    proc = run_cli("--repo", str(repo), "-n", "broken", str(setup.mix), "-o", str(tmp_path))
    assert_one_line_error(proc, "broken.th")
    # Same content under a checksummed name: the checksum catches it first.
    (repo / "broken.th").rename(repo / f"bad-{good.stem.rsplit('-', 1)[1]}.th")
    proc = run_cli("--repo", str(repo), "-n", "bad", str(setup.mix), "-o", str(tmp_path))
    assert_one_line_error(proc, "bad-", "Checksum mismatch")


def test_unreadable_track_and_bad_stem(setup, tmp_path):
    notes = tmp_path / "notes.mp3"
    notes.write_text("not audio\n" * 100)
    proc = run_cli("--repo", str(setup.repo), "-n", "tinyhd", str(notes),
                   "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "notes.mp3")
    proc = run_cli("--repo", str(setup.repo), "-n", "tinyhd", "--two-stems", "guitar",
                   str(setup.mix), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "guitar", "drums, bass, other, vocals")


@pytest.mark.parametrize("option", [["--segment", "0"], ["--overlap", "1.5"], ["--shifts", "-1"]])
def test_bad_options(setup, tmp_path, option, capsys):
    with pytest.raises(SystemExit) as info:
        separate.main(["--repo", str(setup.repo), "-n", "tinyhd", str(setup.mix), *option])
    assert info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option[0] in err[0]


def test_silent_track_gives_silent_stems(setup, tmp_path):
    silent = tmp_path / "silence.wav"
    save_audio(torch.zeros(2, SR), silent, SR)
    out = tmp_path / "out"
    run_main(["--repo", str(setup.repo), "-n", "tinyhd", str(silent), "-o", str(out),
              "--float32"])
    data = read(out / "tinyhd" / "silence" / "drums.wav")
    assert np.isfinite(data.numpy()).all()  # no division by a zero std


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(setup, capsys):
    with pytest.raises(SystemExit) as info:
        separate.main(["--repo", str(setup.repo), "-n", "tinyhd", str(setup.mix), "-d", "cuda"])
    assert info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
