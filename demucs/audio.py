"""Audio input and output without torchaudio.

Reading goes through the `ffmpeg` program, which decodes anything it knows to float32
and resamples with its own `-ar` resampler; channels are converted afterwards in torch
(mono to stereo duplicates, stereo to mono averages, more channels keep the first ones).
`.wav` and `.flac` files that need no resampling are read directly with soundfile, which
gives the same samples as ffmpeg's float32 decoding.

Writing: `.wav` (16 or 24 bit integer, or float32) and `.flac` (16 or 24 bit) through
soundfile, `.mp3` through lameenc. Every file is written to a temporary file next to its
destination and then moved into place, so that an interrupted run never leaves a truncated
file behind.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import typing as tp
from pathlib import Path

import julius
import numpy as np
import soundfile
import torch

from .errors import AudioError, MissingProgramError
from .utils import atomic_path

PathLike = tp.Union[str, Path]
SOUNDFILE_SUFFIXES = (".wav", ".flac")
INSTALL_FFMPEG = ("install it with `apt-get install ffmpeg` (Debian/Ubuntu), "
                  "`brew install ffmpeg` (macOS) or `conda install -c conda-forge ffmpeg`")


def _require_program(name: str, path: PathLike) -> str:
    """Return the full path of `name`, or raise `MissingProgramError` about `path`."""
    found = shutil.which(name)
    if found is None:
        raise MissingProgramError(
            f"Cannot read {path}: the `{name}` program is not on the PATH; {INSTALL_FFMPEG}.")
    return found


def _run(command: tp.List[str], path: PathLike) -> bytes:
    """Run an ffmpeg/ffprobe command and return its stdout, or raise `AudioError`."""
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise AudioError(f"Cannot read {path}: {Path(command[0]).name} failed ({reason}). "
                         "Is it an audio file ffmpeg supports?")
    return proc.stdout


class AudioFile:
    """An audio file read through ffmpeg (or soundfile for plain `.wav`/`.flac`).

    `info` comes from `ffprobe` and is only queried when needed.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._info: tp.Optional[tp.Dict[str, tp.Any]] = None

    def __repr__(self) -> str:
        return f"AudioFile({str(self.path)!r})"

    # Information, through ffprobe
    @property
    def info(self) -> tp.Dict[str, tp.Any]:
        if self._info is None:
            self._info = self._probe()
        return self._info

    def _probe(self) -> tp.Dict[str, tp.Any]:
        self._check_exists()
        ffprobe = _require_program("ffprobe", self.path)
        out = _run([ffprobe, "-loglevel", "error", "-print_format", "json",
                    "-show_format", "-show_streams", str(self.path)], self.path)
        info = json.loads(out.decode() or "{}")
        if not [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]:
            raise AudioError(f"Cannot read {self.path}: it holds no audio stream.")
        return info

    @property
    def _audio_streams(self) -> tp.List[tp.Dict[str, tp.Any]]:
        return [s for s in self.info["streams"] if s.get("codec_type") == "audio"]

    def __len__(self) -> int:
        """Number of audio streams."""
        return len(self._audio_streams)

    def channels(self, stream: int = 0) -> int:
        return int(self._audio_streams[stream]["channels"])

    def samplerate(self, stream: int = 0) -> int:
        return int(self._audio_streams[stream]["sample_rate"])

    def duration(self) -> float:
        """Duration in seconds."""
        return float(self.info["format"]["duration"])

    # Reading
    def read(self, seek_time: tp.Optional[float] = None, duration: tp.Optional[float] = None,
             streams: tp.Union[int, tp.Sequence[int]] = 0,
             samplerate: tp.Optional[int] = None,
             channels: tp.Optional[int] = None) -> torch.Tensor:
        """Read the file as float32, shape `(C, T)`, or `(len(streams), C, T)` for a list.

        Args:
            seek_time: start reading at this time, in seconds.
            duration: read this many seconds (the result is padded with zeros or trimmed to
                exactly `int(samplerate * duration)` samples).
            streams: index of the audio stream to read, or a list of them.
            samplerate: resample to this rate (with ffmpeg's resampler), default: the
                file's own rate.
            channels: convert to this many channels, default: the file's own count.
        """
        self._check_exists()
        indexes = [streams] if isinstance(streams, int) else list(streams)
        wavs = [self._read_stream(stream, seek_time, duration, samplerate) for stream in indexes]
        if channels is not None:
            wavs = [convert_audio_channels(wav, channels) for wav in wavs]
        if isinstance(streams, int):
            return wavs[0]
        return torch.stack(wavs)

    def _check_exists(self) -> None:
        if not self.path.is_file():
            raise AudioError(f"Cannot read {self.path}: no such file.")

    def _read_stream(self, stream: int, seek_time: tp.Optional[float],
                     duration: tp.Optional[float],
                     samplerate: tp.Optional[int]) -> torch.Tensor:
        wav = None
        if stream == 0:
            wav = self._read_soundfile(seek_time, duration, samplerate)
        if wav is None:
            wav, rate = self._read_ffmpeg(stream, seek_time, duration, samplerate)
        else:
            rate = samplerate or soundfile.info(str(self.path)).samplerate
        if duration is not None:
            wav = _fit_length(wav, int(rate * duration))
        return wav

    def _read_soundfile(self, seek_time: tp.Optional[float], duration: tp.Optional[float],
                        samplerate: tp.Optional[int]) -> tp.Optional[torch.Tensor]:
        """Fast path for .wav/.flac that need no resampling; None when not applicable."""
        if self.path.suffix.lower() not in SOUNDFILE_SUFFIXES:
            return None
        try:
            info = soundfile.info(str(self.path))
        except RuntimeError:
            return None
        if samplerate is not None and samplerate != info.samplerate:
            return None
        start = int(round((seek_time or 0.) * info.samplerate))
        frames = -1 if duration is None else int(round(duration * info.samplerate))
        try:
            data, _ = soundfile.read(str(self.path), start=min(start, info.frames),
                                     frames=frames, dtype="float32", always_2d=True)
        except RuntimeError:
            return None
        return torch.from_numpy(np.ascontiguousarray(data.T))

    def _read_ffmpeg(self, stream: int, seek_time: tp.Optional[float],
                     duration: tp.Optional[float],
                     samplerate: tp.Optional[int]) -> tp.Tuple[torch.Tensor, int]:
        ffmpeg = _require_program("ffmpeg", self.path)
        if stream >= len(self):
            raise AudioError(f"Cannot read {self.path}: it has {len(self)} audio stream(s), "
                             f"stream {stream} was asked for.")
        rate = samplerate or self.samplerate(stream)
        command = [ffmpeg, "-nostdin", "-loglevel", "error"]
        if seek_time:
            command += ["-ss", str(seek_time)]
        command += ["-i", str(self.path), "-threads", "1", "-map", f"0:a:{stream}"]
        if duration is not None:
            command += ["-t", str(duration)]
        command += ["-f", "f32le", "-ar", str(rate), "-"]
        raw = _run(command, self.path)
        channels = self.channels(stream)
        data = np.frombuffer(raw, dtype=np.float32).reshape(-1, channels)
        return torch.from_numpy(data.T.copy()), rate


def _fit_length(wav: torch.Tensor, length: int) -> torch.Tensor:
    """Trim or zero-pad the last dimension of `wav` to `length`."""
    if wav.shape[-1] >= length:
        return wav[..., :length]
    return torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))


def read_audio(path: PathLike, samplerate: int, channels: int) -> torch.Tensor:
    """Read a whole file as `(channels, T)` float32 at `samplerate`.

    Uses ffmpeg when available. Without ffmpeg, files soundfile can read (wav, flac, ogg)
    still load, resampled with julius instead.
    """
    path = Path(path)
    try:
        return AudioFile(path).read(streams=0, samplerate=samplerate, channels=channels)
    except MissingProgramError:
        try:
            data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except RuntimeError:
            raise MissingProgramError(
                f"Cannot read {path}: this format needs the `ffmpeg` program; "
                f"{INSTALL_FFMPEG}.") from None
        wav = torch.from_numpy(np.ascontiguousarray(data.T))
        return convert_audio(wav, rate, samplerate, channels)


# Conversions
def convert_audio_channels(wav: torch.Tensor, channels: int = 2) -> torch.Tensor:
    """Convert `wav` of shape `(..., C, T)` to `channels` channels, as the original does.

    Mono to many duplicates (a view), many to mono averages, more channels than needed
    keep the first ones; upmixing anything but mono raises `AudioError`. The one channel
    conversion of the project: separation, evaluation and the datasets all use it.
    """
    *shape, src_channels, length = wav.shape
    if src_channels == channels:
        return wav
    if channels == 1:
        return wav.mean(dim=-2, keepdim=True)
    if src_channels == 1:
        return wav.expand(*shape, channels, length)
    if src_channels >= channels:
        return wav[..., :channels, :]
    raise AudioError(f"Cannot convert audio with {src_channels} channels to {channels} "
                     "channels: only mono input can be upmixed.")


def convert_audio(wav: torch.Tensor, from_samplerate: float, to_samplerate: float,
                  channels: int) -> torch.Tensor:
    """Convert `wav` (..., C, T) to `channels` channels and resample it with julius."""
    wav = convert_audio_channels(wav, channels)
    if from_samplerate == to_samplerate:
        return wav
    return julius.resample_frac(wav, int(from_samplerate), int(to_samplerate))


# Writing
def prevent_clip(wav: torch.Tensor, mode: str = "rescale") -> torch.Tensor:
    """Keep `wav` inside [-1, 1]: 'rescale' scales the whole file down, 'clamp' clips."""
    if mode == "rescale":
        return wav / max(1.01 * wav.abs().max().item(), 1.)
    if mode == "clamp":
        return wav.clamp(-0.99, 0.99)
    if mode == "none":
        return wav
    raise AudioError(f"Unknown clip mode {mode!r}, use rescale, clamp or none.")


MP3_BITRATES = (8, 320)  # kbps, the range LAME encodes (it rounds to a standard rate)
MP3_PRESETS = (2, 7)  # LAME's quality presets: 2 is the best, 7 the fastest
SAVE_SUFFIXES = (".wav", ".flac", ".mp3")
MP3_SAMPLERATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


def check_mp3_options(bitrate: int, preset: int) -> None:
    """Raise `AudioError` unless `bitrate` (kbps) and `preset` are in LAME's ranges."""
    low, high = MP3_BITRATES
    if not low <= bitrate <= high:
        raise AudioError(f"mp3 bitrate {bitrate} kbps is out of range, use {low} to {high}.")
    low, high = MP3_PRESETS
    if not low <= preset <= high:
        raise AudioError(f"mp3 preset {preset} is out of range, use {low} (best quality) "
                         f"to {high} (fastest).")


def _encode_mp3(wav: torch.Tensor, samplerate: int, bitrate: int, preset: int) -> bytes:
    import lameenc

    channels = wav.shape[0]
    if channels not in (1, 2):
        raise AudioError(f"mp3 supports 1 or 2 channels, got {channels}.")
    check_mp3_options(bitrate, preset)
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate)
    encoder.set_in_sample_rate(samplerate)
    if samplerate in MP3_SAMPLERATES:  # else LAME picks one; it resamples at low bitrates
        encoder.set_out_sample_rate(samplerate)
    encoder.set_channels(channels)
    encoder.set_quality(preset)
    pcm = (wav.clamp(-1, 1) * (2 ** 15 - 1)).round().to(torch.int16)
    interleaved = pcm.t().contiguous().numpy().tobytes()
    return bytes(encoder.encode(interleaved)) + bytes(encoder.flush())


def pcm_subtype(suffix: str, bits_per_sample: int = 16, as_float: bool = False) -> str:
    """The soundfile subtype of a `.wav` or `.flac` file: `PCM_16`, `PCM_24` or `FLOAT`
    (wav only: flac stores integers)."""
    if as_float:
        if suffix == ".flac":
            raise AudioError("flac cannot store float32 samples, use 16 or 24 bits "
                             "(or a .wav file for float32).")
        return "FLOAT"
    if bits_per_sample not in (16, 24):
        raise AudioError(f"Unsupported bits_per_sample {bits_per_sample}, use 16 or 24.")
    return f"PCM_{bits_per_sample}"


def _write_soundfile(wav: torch.Tensor, path: Path, samplerate: int, suffix: str,
                     subtype: str) -> None:
    audio_format = "FLAC" if suffix == ".flac" else "WAV"
    soundfile.write(str(path), wav.t().numpy(), samplerate, subtype=subtype, format=audio_format)


def save_audio(wav: torch.Tensor, path: PathLike, samplerate: int, bitrate: int = 320,
               clip: str = "rescale", bits_per_sample: int = 16,
               as_float: bool = False, preset: int = 2) -> None:
    """Save `wav` of shape `(C, T)` to `path`; the suffix picks the format.

    `.wav` (16 or 24 bit integer, or float32 with `as_float`), `.flac` (16 or 24 bit),
    through soundfile; `.mp3` through lameenc at `bitrate` kbps with the LAME quality
    `preset` (2 best .. 7 fastest). `clip` is `rescale`, `clamp` or `none` (see
    `prevent_clip`). The file appears atomically: it is written next to `path` and then
    moved into place. Every failure, writing included, raises `AudioError` naming `path`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise AudioError(f"Cannot save {path}: unsupported extension {suffix!r}, "
                         f"use {', '.join(SAVE_SUFFIXES)}.")
    subtype = "" if suffix == ".mp3" else pcm_subtype(suffix, bits_per_sample, as_float)
    wav = prevent_clip(wav.detach().cpu().float(), mode=clip)
    try:
        with atomic_path(path) as tmp:
            if suffix == ".mp3":
                tmp.write_bytes(_encode_mp3(wav, samplerate, bitrate, preset))
            else:
                _write_soundfile(wav, tmp, samplerate, suffix, subtype)
    except OSError as error:
        raise AudioError(f"Cannot write {path}: {error.strerror or error}.") from None
    except soundfile.SoundFileRuntimeError as error:
        raise AudioError(f"Cannot write {path}: {error}.") from None
