"""Audio I/O: ffmpeg and soundfile reading agree, conversions, atomic saving, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from demucs import audio
from demucs.audio import (AudioFile, convert_audio, convert_audio_channels, prevent_clip,
                          read_audio, save_audio)
from demucs.errors import AudioError, MissingProgramError

from helpers import needs_ffmpeg, tones, write_wav

SR = 44100


def stereo(seconds: float = 2.0, samplerate: int = SR) -> torch.Tensor:
    """440 Hz on the left, 220 Hz (quieter) on the right, (2, T)."""
    return tones([440, 220], seconds, samplerate, [0.5, 0.3])


@needs_ffmpeg
def test_ffprobe_info(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", stereo(2.0), SR)
    file = AudioFile(path)
    assert len(file) == 1
    assert file.channels() == 2
    assert file.samplerate() == SR
    assert file.duration() == pytest.approx(2.0, abs=1e-3)


@needs_ffmpeg
@pytest.mark.parametrize("suffix,subtype", [(".wav", "PCM_16"), (".wav", "PCM_24"),
                                            (".wav", "FLOAT"), (".flac", "PCM_16")])
def test_soundfile_fast_path_matches_ffmpeg(tmp_path: Path, suffix: str, subtype: str) -> None:
    path = write_wav(tmp_path / f"a{suffix}", stereo(2.0), SR, subtype=subtype)
    file = AudioFile(path)
    fast = file.read()
    slow, rate = file._read_ffmpeg(0, None, None, None)
    assert rate == SR
    assert fast.shape == slow.shape == (2, 2 * SR)
    assert torch.equal(fast, slow)
    fast = file.read(seek_time=0.5, duration=1.0)
    slow, _ = file._read_ffmpeg(0, 0.5, 1.0, None)
    assert fast.shape == (2, SR)
    assert torch.equal(fast, slow[:, :SR])


def test_read_is_16_bit_accurate(tmp_path: Path) -> None:
    wav = stereo(1.0)
    path = write_wav(tmp_path / "a.wav", wav, SR)
    read = AudioFile(path).read()
    assert read.dtype == torch.float32
    assert (read - wav).abs().max() <= 1 / 2 ** 15


@needs_ffmpeg
def test_resample_with_ffmpeg(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", stereo(2.0), SR, subtype="FLOAT")
    read = AudioFile(path).read(samplerate=22050)
    assert read.shape == (2, 44100)
    expected = stereo(2.0, 22050)
    # Away from the edges, resampling a 440 Hz sine gives the same sine.
    assert (read[:, 1000:-1000] - expected[:, 1000:-1000]).abs().max() < 1e-2


def test_duration_pads_and_trims(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", stereo(1.0), SR)
    read = AudioFile(path).read(seek_time=0.5, duration=1.0)
    assert read.shape == (2, SR)
    assert read[:, SR // 2 + 10:].abs().max() == 0
    assert read[:, :SR // 2 - 10].abs().max() > 0.1


@pytest.mark.parametrize("src,dst", [(1, 2), (2, 1), (3, 2), (2, 2)])
def test_read_channels(tmp_path: Path, src: int, dst: int) -> None:
    wav = tones([110 * (i + 1) for i in range(src)], 0.5, SR)
    path = write_wav(tmp_path / "a.wav", wav, SR, subtype="FLOAT")
    read = AudioFile(path).read(channels=dst)
    assert read.shape == (dst, wav.shape[-1])
    if src == 1:
        assert torch.equal(read[0], read[1])
    elif dst == 1:
        assert torch.allclose(read[0], wav.mean(0), atol=1e-6)
    else:
        assert torch.equal(read, wav[:dst])


@needs_ffmpeg
def test_read_mp3_and_resample_channels(tmp_path: Path) -> None:
    wav = stereo(2.0)
    save_audio(wav, tmp_path / "a.mp3", SR)
    file = AudioFile(tmp_path / "a.mp3")
    assert file.samplerate() == SR
    read = file.read(samplerate=SR, channels=1)
    assert read.shape[0] == 1
    assert abs(read.shape[-1] - 2 * SR) < 0.05 * SR  # the encoder adds some padding
    read = file.read(samplerate=SR, channels=2, streams=[0])
    assert read.shape[:2] == (1, 2)
    # mp3 has a delay: compare spectra rather than samples.
    spectrum = torch.fft.rfft(read[0, 0]).abs()
    peak_hz = spectrum.argmax().item() * SR / read.shape[-1]
    assert peak_hz == pytest.approx(440, abs=2)


def test_convert_audio_channels() -> None:
    mono = torch.randn(1, 100)
    assert torch.equal(convert_audio_channels(mono, 2), mono.expand(2, 100))
    many = torch.randn(3, 4, 100)
    assert torch.equal(convert_audio_channels(many, 2), many[:, :2])
    assert torch.allclose(convert_audio_channels(many, 1), many.mean(1, keepdim=True))
    with pytest.raises(AudioError, match="3 channels"):
        convert_audio_channels(torch.randn(2, 10), 3)


def test_convert_audio_resamples_with_julius() -> None:
    wav = stereo(1.0)
    out = convert_audio(wav, SR, 22050, 1)
    assert out.shape == (1, 22050)
    assert torch.equal(convert_audio(wav, SR, SR, 2), wav)


def test_prevent_clip() -> None:
    loud = torch.tensor([[2.0, -1.0, 0.5]])
    assert prevent_clip(loud, "rescale").abs().max().item() == pytest.approx(1 / 1.01)
    quiet = torch.tensor([[0.5, -0.2]])
    assert torch.equal(prevent_clip(quiet, "rescale"), quiet)
    assert torch.equal(prevent_clip(loud, "clamp"), torch.tensor([[0.99, -0.99, 0.5]]))
    with pytest.raises(AudioError, match="clip mode"):
        prevent_clip(loud, "fold")


@pytest.mark.parametrize("bits,as_float,subtype", [(16, False, "PCM_16"), (24, False, "PCM_24"),
                                                   (16, True, "FLOAT")])
def test_save_wav_formats(tmp_path: Path, bits: int, as_float: bool, subtype: str) -> None:
    wav = stereo(0.5)
    path = tmp_path / "out" / "a.wav"
    save_audio(wav, path, SR, bits_per_sample=bits, as_float=as_float)
    info = soundfile.info(str(path))
    assert info.subtype == subtype
    assert info.samplerate == SR and info.channels == 2 and info.frames == wav.shape[-1]
    data, _ = soundfile.read(str(path), dtype="float32")
    tolerance = 1e-7 if as_float else 2 ** -(bits - 1)
    assert np.abs(data.T - wav.numpy()).max() <= tolerance
    assert [p.name for p in path.parent.iterdir()] == ["a.wav"]  # no temporary file left


def test_save_rescales_loud_audio(tmp_path: Path) -> None:
    wav = stereo(0.5) * 4  # peak 2
    save_audio(wav, tmp_path / "a.wav", SR, as_float=True)
    data, _ = soundfile.read(str(tmp_path / "a.wav"), dtype="float32")
    assert np.abs(data).max() == pytest.approx(1 / 1.01, abs=1e-3)
    save_audio(wav, tmp_path / "b.wav", SR, clip="clamp", as_float=True)
    data, _ = soundfile.read(str(tmp_path / "b.wav"), dtype="float32")
    assert np.abs(data).max() == pytest.approx(0.99)


def test_save_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="bits_per_sample"):
        save_audio(stereo(0.1), tmp_path / "a.wav", SR, bits_per_sample=12)
    with pytest.raises(AudioError, match="extension"):
        save_audio(stereo(0.1), tmp_path / "a.ogg", SR)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    save_audio(stereo(1.0), path, SR)
    save_audio(stereo(0.5), path, SR)
    assert soundfile.info(str(path)).frames == SR // 2


@needs_ffmpeg
def test_save_mp3(tmp_path: Path) -> None:
    save_audio(stereo(1.0), tmp_path / "a.mp3", SR, bitrate=128)
    file = AudioFile(tmp_path / "a.mp3")
    assert file.info["streams"][0]["codec_name"] == "mp3"
    assert int(file.info["format"]["bit_rate"]) == pytest.approx(128000, rel=0.1)
    assert file.channels() == 2


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav"):
        AudioFile(missing).read()
    with pytest.raises(AudioError, match="nope.wav"):
        read_audio(missing, SR, 2)


@needs_ffmpeg
def test_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "notes.mp3"
    bad.write_text("this is not audio\n" * 10)
    with pytest.raises(AudioError, match="notes.mp3"):
        AudioFile(bad).read()
    bad_wav = tmp_path / "broken.wav"
    bad_wav.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioError, match="broken.wav"):
        read_audio(bad_wav, SR, 2)


def test_without_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    path = write_wav(tmp_path / "a.wav", stereo(1.0), SR, subtype="FLOAT")
    # wav/flac still load, resampled with julius.
    assert read_audio(path, SR, 2).shape == (2, SR)
    assert read_audio(path, 22050, 1).shape == (1, 22050)
    mp3 = tmp_path / "song.mp3"
    mp3.write_bytes(b"\xff\xfb" + bytes(1000))
    with pytest.raises(MissingProgramError, match=r"song\.mp3.*ffmpeg.*apt-get install"):
        read_audio(mp3, SR, 2)


@pytest.mark.parametrize("bits,subtype", [(16, "PCM_16"), (24, "PCM_24")])
def test_save_flac(tmp_path: Path, bits: int, subtype: str) -> None:
    wav = stereo(0.5)
    save_audio(wav, tmp_path / "a.flac", SR, bits_per_sample=bits)
    info = soundfile.info(str(tmp_path / "a.flac"))
    assert (info.format, info.subtype, info.samplerate, info.frames) == \
        ("FLAC", subtype, SR, wav.shape[-1])
    data, _ = soundfile.read(str(tmp_path / "a.flac"), dtype="float32")
    assert np.abs(data.T - wav.numpy()).max() <= 2 ** -(bits - 1)


def test_flac_float_and_bad_mp3_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="flac cannot store float32"):
        save_audio(stereo(0.1), tmp_path / "a.flac", SR, as_float=True)
    with pytest.raises(AudioError, match="bitrate 500 kbps is out of range, use 8 to 320"):
        save_audio(stereo(0.1), tmp_path / "a.mp3", SR, bitrate=500)
    with pytest.raises(AudioError, match="preset 1 is out of range, use 2"):
        save_audio(stereo(0.1), tmp_path / "a.mp3", SR, preset=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bitrate,preset", [(64, 2), (320, 7)])
def test_save_mp3_keeps_the_sample_rate(tmp_path: Path, bitrate: int, preset: int) -> None:
    save_audio(stereo(1.0), tmp_path / "a.mp3", SR, bitrate=bitrate, preset=preset)
    info = soundfile.info(str(tmp_path / "a.mp3"))
    assert (info.format, info.samplerate, info.channels) == ("MP3", SR, 2)


def test_write_failure_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "taken.wav").mkdir()  # a folder where the file should go
    with pytest.raises(AudioError, match=r"Cannot write .*taken\.wav"):
        save_audio(stereo(0.1), tmp_path / "taken.wav", SR)
    (tmp_path / "file").write_text("")
    with pytest.raises(AudioError, match=r"Cannot write .*file/a\.flac"):
        save_audio(stereo(0.1), tmp_path / "file" / "a.flac", SR)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken.wav"]
