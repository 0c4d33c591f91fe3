"""Pitch and tempo augmentation through the `soundstretch` program (SoundTouch).

`soundstretch` ships with the Debian/Ubuntu package `soundstretch`
(`apt-get install soundstretch`) and with SoundTouch builds for other systems.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .errors import AudioError, MissingProgramError

PROGRAM = "soundstretch"
_HEADROOM = 0.5  # peak level of the file given to soundstretch, which clips beyond 1


def find_soundstretch() -> str:
    """Path of `soundstretch`, or a MissingProgramError saying how to install it."""
    program = shutil.which(PROGRAM)
    if program is None:
        raise MissingProgramError(
            f"Pitch/tempo augmentation needs the `{PROGRAM}` program, which is not on the "
            f"PATH: install it (e.g. `apt-get install {PROGRAM}`) or disable it with "
            "augment.repitch.proba=0.")
    return program


def _command(program: str, src: Path, dst: Path, pitch: float, tempo: float, voice: bool,
             quick: bool, anti_alias: bool) -> list[str]:
    command = [program, str(src), str(dst), f"-pitch={pitch}", f"-tempo={tempo:.6f}"]
    if quick:
        command.append("-quick")
    if not anti_alias:
        command.append("-naa")
    if voice:
        command.append("-speech")
    return command


def repitch(wav: torch.Tensor, pitch: float, tempo: float, voice: bool = False,
            quick: bool = False, samplerate: int = 44100,
            anti_alias: bool = True) -> torch.Tensor:
    """Change the pitch (in semitones) and the tempo (in percent) of `wav` (C, T).

    The output (C, T') has T' close to T / (1 + tempo / 100). `voice` tunes the algorithm
    for speech, `quick` uses the quick seek and `anti_alias=False` skips the anti-alias
    filter. The signal is rescaled around the call so that soundstretch never clips it
    (it goes through 32-bit PCM files: soundstretch misreads float wav files).
    """
    program = find_soundstretch()
    data = wav.detach().cpu().float()  # (C, T)
    scale = float(data.abs().max()) / _HEADROOM or 1.
    with tempfile.TemporaryDirectory(prefix="demucs_repitch_") as tmp:
        src, dst = Path(tmp) / "in.wav", Path(tmp) / "out.wav"
        sf.write(str(src), (data / scale).numpy().T, samplerate, subtype="PCM_32")
        command = _command(program, src, dst, pitch, tempo, voice, quick, anti_alias)
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode != 0:
            raise AudioError(f"{PROGRAM} failed (exit {result.returncode}) on "
                             f"{' '.join(command[3:])}: {result.stderr.decode(errors='replace')}")
        out, out_rate = sf.read(str(dst), dtype="float32", always_2d=True)  # (T', C)
    if out_rate != samplerate:
        raise AudioError(f"{PROGRAM} returned {out_rate} Hz audio instead of {samplerate} Hz.")
    return torch.from_numpy(np.ascontiguousarray(out.T)).to(wav) * scale


class RepitchedWrapper(torch.utils.data.Dataset):
    """Wrap a dataset of (S, C, T) examples with random pitch and tempo changes.

    Every example is cropped to `int((1 - 0.01 * max_tempo) * T)` samples, so that all of
    them have the same length whatever the tempo change. With probability `proba`, the
    sources are first repitched by a random number of semitones in [-max_pitch, max_pitch]
    and a random tempo change in percent (gaussian with std `tempo_std`, clamped to
    ±max_tempo); the same change for all sources when `same`, one draw per source otherwise.
    Sources whose index is in `vocals` use soundstretch's speech setting.
    """

    def __init__(self, dataset: tp.Any, proba: float = 0.2, max_pitch: int = 2,
                 max_tempo: float = 12, tempo_std: float = 5,
                 vocals: tp.Sequence[int] = (3,), same: bool = True, quick: bool = False,
                 samplerate: int = 44100):
        if proba > 0:
            find_soundstretch()  # fail now, not in a data loader worker
        self.dataset = dataset
        self.proba = proba
        self.max_pitch = max_pitch
        self.max_tempo = max_tempo
        self.tempo_std = tempo_std
        self.vocals = list(vocals)
        self.same = same
        self.quick = quick
        self.samplerate = samplerate

    def __len__(self) -> int:
        return len(self.dataset)

    def _draw(self) -> tuple[int, float]:
        """A random (pitch in semitones, tempo change in percent)."""
        delta_pitch = random.randint(-self.max_pitch, self.max_pitch)
        delta_tempo = random.gauss(0, self.tempo_std)
        return delta_pitch, min(max(-self.max_tempo, delta_tempo), self.max_tempo)

    def __getitem__(self, index: int) -> torch.Tensor:
        streams = self.dataset[index]  # (S, C, T)
        out_length = int((1 - 0.01 * self.max_tempo) * streams.shape[-1])
        if random.random() >= self.proba:
            return streams[..., :out_length]
        outs = []
        pitch, tempo = 0, 0.
        for idx, stream in enumerate(streams):
            if idx == 0 or not self.same:
                pitch, tempo = self._draw()
            out = repitch(stream, pitch, tempo, voice=idx in self.vocals, quick=self.quick,
                          samplerate=self.samplerate)
            outs.append(out[:, :out_length])
        return torch.stack(outs)  # (S, C, out_length)


def wrap_repitch(dataset: tp.Any, repitch_cfg: tp.Any, sources: tp.Sequence[str],
                 samplerate: int = 44100) -> tp.Any:
    """`dataset` wrapped as the config's `augment.repitch` section says (as is if proba 0).

    The source named `vocals`, when present, gets soundstretch's speech setting.
    """
    if not repitch_cfg.proba:
        return dataset
    vocals = [index for index, name in enumerate(sources) if name == "vocals"]
    items = repitch_cfg.items() if hasattr(repitch_cfg, "items") else vars(repitch_cfg).items()
    kwargs = dict(items)  # proba, max_tempo and any other RepitchedWrapper argument
    return RepitchedWrapper(dataset, vocals=vocals, samplerate=samplerate, **kwargs)
