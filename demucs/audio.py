"""Audio input and output without torchaudio.

Reading goes through the `ffmpeg` program, which decodes anything it knows to float32
and resamples with its own `-ar` resampler; channels are converted afterwards in torch
(mono to stereo duplicates, stereo to mono averages, more channels keep the first ones).
`.wav` and `.flac` files that need no resampling are read directly with soundfile, which
gives the same samples as ffmpeg's float32 decoding.

`AudioBlocks` reads a track by blocks instead (the same samples): `.wav`/`.flac` in
place, anything else decoded once by ffmpeg into a temporary file of float32 samples.

Writing: `.wav` (16 or 24 bit integer, or float32) and `.flac` (16 or 24 bit) through
soundfile, `.mp3` through lameenc, whole (`save_audio`) or block by block as a separation
produces them (`AudioWriter`, the same bytes). Every file is written to a temporary file
next to its destination and then moved into place, so that an interrupted run never
leaves a truncated file behind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import typing as tp
import weakref
from contextlib import contextmanager
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


def _run(command: tp.List[str], path: PathLike, stdout: tp.Any = subprocess.PIPE) -> bytes:
    """Run an ffmpeg/ffprobe command and return its stdout (or write it to the file
    `stdout`), or raise `AudioError`."""
    proc = subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE)
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
        command, rate = self._ffmpeg_command(stream, seek_time, duration, samplerate)
        raw = _run(command, self.path)
        channels = self.channels(stream)
        data = np.frombuffer(raw, dtype=np.float32).reshape(-1, channels)
        return torch.from_numpy(data.T.copy()), rate

    def _ffmpeg_command(self, stream: int, seek_time: tp.Optional[float] = None,
                        duration: tp.Optional[float] = None,
                        samplerate: tp.Optional[int] = None) -> tp.Tuple[tp.List[str], int]:
        """The ffmpeg command decoding `stream` to raw float32 on its stdout, and its rate."""
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
        return command + ["-f", "f32le", "-ar", str(rate), "-"], rate


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


class AudioBlocks:
    """A track read by blocks, `(channels, T)` float32 at `samplerate`: the samples of
    `read_audio`, without the whole track in memory.

    `.wav`/`.flac` files at that rate are read in place with soundfile; anything else is
    decoded once by ffmpeg (resampled by its `-ar`) into a temporary file of raw float32
    samples (in the system's temporary folder, `TMPDIR`), read back by slices. Without
    ffmpeg, a file soundfile reads is loaded whole and resampled with julius, as
    `read_audio` does. It is a `Track` for `apply.apply_model_stream`: `blocks[...,
    start:end]` is a `(channels, end - start)` tensor (reads are serialised: the threads
    of a separation may ask at once). `close()` (or leaving a `with` block) deletes the
    temporary file.
    """

    def __init__(self, path: PathLike, samplerate: int, channels: int) -> None:
        self.path = Path(path)
        self.samplerate = samplerate
        self.channels = channels
        self.device = torch.device("cpu")
        self._lock = threading.Lock()
        self._sound: tp.Optional[soundfile.SoundFile] = None
        self._raw: tp.Optional[Path] = None
        self._whole: tp.Optional[torch.Tensor] = None
        self._source_channels = 0
        length = self._open()
        self.shape: tp.Tuple[int, int] = (channels, length)

    def _open(self) -> int:
        """Open the file (decode it if needed); its length in samples."""
        audio = AudioFile(self.path)
        audio._check_exists()
        length = self._open_soundfile()
        if length is not None:
            return length
        try:
            command, _ = audio._ffmpeg_command(0, samplerate=self.samplerate)
        except MissingProgramError:
            self._whole = read_audio(self.path, self.samplerate, self.channels)
            return self._whole.shape[-1]
        self._source_channels = audio.channels(0)
        fd, name = tempfile.mkstemp(prefix="demucs_", suffix=".f32")
        self._raw = Path(name)
        self._finalizer = weakref.finalize(self, self._raw.unlink, missing_ok=True)
        try:
            with os.fdopen(fd, "wb") as raw:
                _run(command, self.path, stdout=raw)
        except BaseException:
            self._finalizer()
            raise
        return self._raw.stat().st_size // (4 * self._source_channels)

    def _open_soundfile(self) -> tp.Optional[int]:
        """The fast path of `AudioFile`: `.wav`/`.flac` at the right rate; None otherwise."""
        if self.path.suffix.lower() not in SOUNDFILE_SUFFIXES:
            return None
        try:
            sound = soundfile.SoundFile(str(self.path))
        except (RuntimeError, soundfile.LibsndfileError):
            return None
        if sound.samplerate != self.samplerate:
            sound.close()
            return None
        self._sound = sound
        self._source_channels = sound.channels
        return int(sound.frames)

    def __getitem__(self, index: tp.Any) -> torch.Tensor:
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
                and isinstance(index[1], slice) and index[1].step in (None, 1)):
            raise TypeError(f"AudioBlocks are read by slices [..., start:end], not {index!r}.")
        start, end, _ = index[1].indices(self.shape[-1])
        end = max(start, end)
        if self._whole is not None:
            return self._whole[..., start:end]
        with self._lock:
            data = self._read(start, end)
        wav = torch.from_numpy(np.ascontiguousarray(data.T))
        return convert_audio_channels(wav, self.channels)

    def _read(self, start: int, end: int) -> np.ndarray:
        """Frames `[start, end)` as `(frames, source channels)` float32."""
        if self._sound is not None:
            self._sound.seek(start)
            try:
                return self._sound.read(end - start, dtype="float32", always_2d=True)
            except RuntimeError as error:
                raise AudioError(f"Cannot read {self.path}: {error}.") from None
        assert self._raw is not None
        channels = self._source_channels
        data = np.fromfile(self._raw, dtype=np.float32, count=(end - start) * channels,
                           offset=start * channels * 4)
        return data.reshape(-1, channels)

    def close(self) -> None:
        if self._sound is not None:
            self._sound.close()
        if self._raw is not None:
            self._finalizer()

    def __enter__(self) -> "AudioBlocks":
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.close()


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
def prevent_clip(wav: torch.Tensor, mode: str = "rescale",
                 peak: tp.Optional[float] = None) -> torch.Tensor:
    """Keep `wav` inside [-1, 1]: 'rescale' scales the whole file down, 'clamp' clips.

    `peak`: the largest absolute sample of the whole file, when `wav` is a block of it
    (default: `wav`'s own).
    """
    if mode == "rescale":
        if peak is None:
            peak = wav.abs().max().item()
        return wav / max(1.01 * peak, 1.)
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


def _mp3_encoder(channels: int, samplerate: int, bitrate: int, preset: int) -> tp.Any:
    import lameenc

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
    return encoder


def _mp3_pcm(wav: torch.Tensor) -> bytes:
    """`wav` (C, T) as interleaved 16-bit samples, as LAME takes them."""
    pcm = (wav.clamp(-1, 1) * (2 ** 15 - 1)).round().to(torch.int16)
    return pcm.t().contiguous().numpy().tobytes()


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


class _Encoder:
    """Blocks `(C, n)` of float samples, already clipped, into the file `path` in the
    format of `suffix` (the same bytes whatever the blocks: soundfile and LAME buffer)."""

    def __init__(self, path: Path, suffix: str, samplerate: int, channels: int, subtype: str,
                 bitrate: int, preset: int) -> None:
        self.sound: tp.Optional[soundfile.SoundFile] = None
        self.mp3: tp.Any = None
        self.file: tp.Optional[tp.BinaryIO] = None
        if suffix == ".mp3":
            self.mp3 = _mp3_encoder(channels, samplerate, bitrate, preset)
            self.file = open(path, "wb")
        else:
            audio_format = "FLAC" if suffix == ".flac" else "WAV"
            self.sound = soundfile.SoundFile(str(path), "w", samplerate, channels,
                                             subtype=subtype, format=audio_format)

    def write(self, wav: torch.Tensor) -> None:
        if self.sound is not None:
            self.sound.write(wav.t().numpy())
        else:
            assert self.file is not None
            self.file.write(bytes(self.mp3.encode(_mp3_pcm(wav))))

    def close(self, complete: bool = True) -> None:
        if self.sound is not None:
            self.sound.close()
        if self.file is not None:
            if complete:
                self.file.write(bytes(self.mp3.flush()))
            self.file.close()


class AudioWriter:
    """A file written block by block, as `save_audio` writes a whole signal: the same
    arguments, the same bytes.

    `write(block)` takes `(C, n)` blocks in order; `close()` completes the file, which
    appears at `path` only then (written next to it and moved into place); `abort()`, or
    an exception in a `with` block, removes what was written. 'rescale' needs the peak of
    the whole signal before the first sample is encoded: the blocks go to a float32
    temporary file next to `path` first, and are encoded from it at `close()`, unless the
    `peak` is given. Failures raise `AudioError` naming `path`.
    """

    BLOCK = 2 ** 18  # frames per block of the second pass

    def __init__(self, path: PathLike, samplerate: int, channels: int, bitrate: int = 320,
                 clip: str = "rescale", bits_per_sample: int = 16, as_float: bool = False,
                 preset: int = 2, peak: tp.Optional[float] = None) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in SAVE_SUFFIXES:
            raise AudioError(f"Cannot save {self.path}: unsupported extension {suffix!r}, "
                             f"use {', '.join(SAVE_SUFFIXES)}.")
        if clip not in ("rescale", "clamp", "none"):
            raise AudioError(f"Unknown clip mode {clip!r}, use rescale, clamp or none.")
        subtype = "" if suffix == ".mp3" else pcm_subtype(suffix, bits_per_sample, as_float)
        self.samplerate, self.channels, self.clip, self.peak = samplerate, channels, clip, peak
        self._max: tp.Optional[torch.Tensor] = None  # the peak so far, when it is not given
        self._atomic: tp.Any = atomic_path(self.path)
        self._spill: tp.Any = None  # the float32 samples of 'rescale', until close()
        self._encoder: tp.Optional[_Encoder] = None
        with self._errors():
            tmp = self._atomic.__enter__()
            try:
                if clip == "rescale" and peak is None:
                    self._spill = tempfile.NamedTemporaryFile(
                        dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".f32.tmp")
                else:
                    self._encoder = _Encoder(tmp, suffix, samplerate, channels, subtype,
                                             bitrate, preset)
            except BaseException as error:
                self._atomic.__exit__(type(error), error, error.__traceback__)
                raise
        self._encoding = (tmp, suffix, subtype, bitrate, preset)

    def write(self, wav: torch.Tensor) -> None:
        """Append `wav` `(C, n)`."""
        wav = wav.detach().cpu().float()
        if wav.dim() != 2 or wav.shape[0] != self.channels:
            raise AudioError(f"Cannot save {self.path}: expected ({self.channels}, T) blocks, "
                             f"got {tuple(wav.shape)}.")
        with self._errors():
            if self._spill is not None:
                block_max = wav.abs().max()
                self._max = block_max if self._max is None else torch.maximum(self._max,
                                                                             block_max)
                self._spill.write(wav.t().contiguous().numpy().tobytes())
            else:
                assert self._encoder is not None
                self._encoder.write(prevent_clip(wav, self.clip, self.peak))

    def close(self) -> None:
        """Complete the file and move it into place."""
        try:
            with self._errors():
                if self._spill is not None:
                    self._encode_spill()
                assert self._encoder is not None
                self._encoder.close()
                self._encoder = None
        except BaseException as error:
            self._abort(error)
            raise
        with self._errors():
            self._atomic.__exit__(None, None, None)

    def _encode_spill(self) -> None:
        """The second pass of 'rescale': the blocks written, divided by the peak's scale."""
        assert self._spill is not None
        tmp, suffix, subtype, bitrate, preset = self._encoding
        self._encoder = _Encoder(tmp, suffix, self.samplerate, self.channels, subtype,
                                 bitrate, preset)
        if self._max is None:
            raise AudioError(f"Cannot save {self.path}: no samples were written.")
        peak = self._max.item()
        spill, self._spill = self._spill, None
        with spill:
            spill.flush()
            spill.seek(0)
            while True:
                data = np.fromfile(spill, dtype=np.float32, count=self.BLOCK * self.channels)
                if not data.size:
                    break
                wav = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, self.channels).T))
                self._encoder.write(prevent_clip(wav, self.clip, peak))

    def abort(self) -> None:
        """Remove what was written; `path` is left as it was."""
        self._abort(AudioError(f"Writing {self.path} was abandoned."))

    def _abort(self, error: BaseException) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._encoder is not None:
            self._encoder.close(complete=False)
            self._encoder = None
        if self._atomic is not None:
            self._atomic.__exit__(type(error), error, error.__traceback__)
            self._atomic = None

    @contextmanager
    def _errors(self) -> tp.Iterator[None]:
        """OS and soundfile errors as `AudioError`s naming the file."""
        try:
            yield
        except OSError as error:
            raise AudioError(f"Cannot write {self.path}: {error.strerror or error}.") from None
        except soundfile.SoundFileRuntimeError as error:
            raise AudioError(f"Cannot write {self.path}: {error}.") from None

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, exc_type: tp.Any, exc: tp.Any, tb: tp.Any) -> None:
        if exc is None:
            self.close()
        else:
            self._abort(exc)


def save_audio(wav: torch.Tensor, path: PathLike, samplerate: int, bitrate: int = 320,
               clip: str = "rescale", bits_per_sample: int = 16,
               as_float: bool = False, preset: int = 2) -> None:
    """Save `wav` of shape `(C, T)` to `path`; the suffix picks the format.

    `.wav` (16 or 24 bit integer, or float32 with `as_float`), `.flac` (16 or 24 bit),
    through soundfile; `.mp3` through lameenc at `bitrate` kbps with the LAME quality
    `preset` (2 best .. 7 fastest). `clip` is `rescale`, `clamp` or `none` (see
    `prevent_clip`). The file appears atomically: it is written next to `path` and then
    moved into place. Every failure, writing included, raises `AudioError` naming `path`.
    `AudioWriter` writes the same file block by block.
    """
    wav = wav.detach().cpu().float()
    wav = wav[None] if wav.dim() == 1 else wav  # mono
    peak = wav.abs().max().item() if clip == "rescale" else None
    with AudioWriter(path, samplerate, wav.shape[0], bitrate, clip, bits_per_sample,
                     as_float, preset, peak=peak) as writer:
        writer.write(wav)
