"""Analysis of multitrack songs for `tools.automix`: tempo, beats, downbeats and key.

Tempo and beats come from librosa's beat tracker on the drums (on the sum of the stems when
the drums are silent); the first downbeat is the beat, among the first four, with the most
kick-band energy every fourth beat; the key is the best match of the pitched stems' chroma
with the Krumhansl-Kessler major and minor profiles (a minor key stored as its relative
major). `tempo_ratio` and `pitch_shift` say how to bring one track to another's tempo and key.
"""
from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from demucs.errors import DatasetError

SOURCES = ("drums", "bass", "other", "vocals")
UNPITCHED = ("drums",)  # sources that are time-stretched but never pitch-shifted
EXT = ".wav"
SILENCE_DB = -50.  # a stem whose RMS is below this (dB full scale) counts as silent
LOW_HZ = 150.  # upper frequency of the kick band used to find downbeats
# Krumhansl-Kessler key profiles, tonic first, matched against the chroma.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


@dataclass
class TrackAnalysis:
    """Tempo, beats and key of a track.

    `key` is the pitch class (0 = C) of the major key with the same scale (a minor key is
    given as its relative major), which is what pitch shifts align. `beats` are in seconds.
    """
    name: str
    samplerate: int
    channels: int
    length: int  # samples
    tempo: float  # beats per minute
    beats: list[float]
    key: int
    minor: bool
    phase: int = 0  # index of the first downbeat in `beats`
    silent: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.length / self.samplerate

    def downbeats(self) -> list[float]:
        """Every fourth beat from the first downbeat (the track start without beats)."""
        return self.beats[self.phase::4] or [0.]


# ---------------------------------------------------------------------------------------
# Reading tracks

def track_names(root: Path) -> list[str]:
    """Sorted names of the track folders of `root`."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetError(f"{root} holds no track folder; expected {root}/<track>/drums.wav...")
    return names


def stem_path(root: Path, track: str, source: str) -> Path:
    path = root / track / (source + EXT)
    if not path.is_file():
        raise DatasetError(f"Track {track!r}: stem {path} is missing; every track needs "
                           f"{', '.join(s + EXT for s in SOURCES)} (or those of --sources).")
    return path


def read_stem(root: Path, track: str, source: str, start: int = 0,
              frames: int = -1) -> tuple[np.ndarray, int]:
    """`frames` samples (all with -1) of a stem from `start`: ((C, T) float32, samplerate)."""
    path = stem_path(root, track, source)
    try:
        wav, samplerate = sf.read(str(path), start=start, frames=frames, dtype="float32",
                                  always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as error:
        raise DatasetError(f"Track {track!r}: cannot read {path} ({error}).") from error
    return np.ascontiguousarray(wav.T), samplerate


# ---------------------------------------------------------------------------------------
# Analysis

def is_silent(wav: np.ndarray) -> bool:
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.
    return 20 * math.log10(rms + 1e-12) < SILENCE_DB


def estimate_beats(mono: np.ndarray, samplerate: int) -> tuple[float, list[float]]:
    """(tempo in BPM, beat times in seconds) of `mono` (T,) with librosa's beat tracker."""
    import librosa
    tempo, frames = librosa.beat.beat_track(y=mono, sr=samplerate, hop_length=512)
    times = librosa.frames_to_time(frames, sr=samplerate, hop_length=512)
    return float(np.atleast_1d(tempo)[0]), [round(float(t), 6) for t in times]


def complete_beats(beats: list[float]) -> list[float]:
    """`beats` with the beats the tracker missed at the start (at most a bar) put back."""
    if len(beats) < 2:
        return beats
    period = float(np.median(np.diff(beats)))
    beats = list(beats)
    for _ in range(4):
        if beats[0] - period < -0.1 * period:
            break
        beats.insert(0, round(max(0., beats[0] - period), 6))
    return beats


def downbeat_phase(mono: np.ndarray, samplerate: int, beats: tp.Sequence[float]) -> int:
    """Which of the first four beats starts the bars: the one whose beats carry the most
    low-frequency (kick) energy, every fourth beat."""
    if len(beats) < 4:
        return 0
    hop = 512
    spec = np.abs(np.fft.rfft(np.lib.stride_tricks.sliding_window_view(
        np.pad(mono, (0, 2048)), 2048)[::hop] * np.hanning(2048), axis=-1))  # (frames, F)
    low = spec[:, :max(2, int(LOW_HZ * 2048 / samplerate))].sum(axis=-1)  # (frames,)
    low = np.maximum(0, np.diff(low, prepend=low[0]))  # low-band onsets
    frames = np.minimum((np.asarray(beats) * samplerate / hop).astype(int), len(low) - 1)
    window = np.stack([low[np.clip(frames + d, 0, len(low) - 1)] for d in range(-2, 3)])
    strength = window.max(axis=0)  # (beats,)
    return int(np.argmax([strength[p::4].mean() for p in range(4)]))


def estimate_key(mono: np.ndarray, samplerate: int) -> tuple[int, bool]:
    """(pitch class of the relative major key, minor?) from the chroma of `mono` (T,)."""
    import librosa
    chroma = librosa.feature.chroma_cqt(y=mono, sr=samplerate,
                                        hop_length=4096).mean(axis=1)  # (12,)
    if not np.any(chroma > 0):
        return 0, False
    scores = [(float(np.corrcoef(chroma, np.roll(profile, tonic))[0, 1]), tonic, minor)
              for minor, profile in ((False, MAJOR_PROFILE), (True, MINOR_PROFILE))
              for tonic in range(12)]
    _, tonic, minor = max(scores)
    return (tonic + 3) % 12 if minor else tonic, minor


def analyse_track(root: Path, track: str, sources: tp.Sequence[str]) -> TrackAnalysis:
    """Read the stems of `track` and estimate its tempo, beats and key."""
    stems: dict[str, np.ndarray] = {}
    samplerate = 0
    for source in sources:
        stems[source], samplerate = read_stem(root, track, source)
    lengths = {wav.shape[-1] for wav in stems.values()}
    if len(lengths) > 1:
        raise DatasetError(f"Track {track!r}: stems have different lengths {sorted(lengths)}.")
    silent = [source for source, wav in stems.items() if is_silent(wav)]
    rhythm = [wav for source, wav in stems.items() if source in UNPITCHED and source not in silent]
    pitched = [wav for source, wav in stems.items() if source not in UNPITCHED]
    drums = np.sum(rhythm or list(stems.values()), axis=0).mean(axis=0)  # (T,)
    tempo, beats = estimate_beats(drums, samplerate)
    beats = complete_beats(beats)
    phase = downbeat_phase(drums, samplerate, beats)
    key, minor = estimate_key(np.sum(pitched or list(stems.values()), axis=0).mean(axis=0),
                              samplerate)
    first = next(iter(stems.values()))
    return TrackAnalysis(name=track, samplerate=samplerate, channels=first.shape[0],
                         length=first.shape[-1], tempo=tempo, beats=beats, key=key,
                         minor=minor, phase=phase, silent=silent)



def tempo_ratio(target: TrackAnalysis, donor: TrackAnalysis, max_tempo: float) -> float | None:
    """The speed factor bringing `donor` to the tempo of `target` (or to half or double
    of it, to cope with the beat tracker's octave errors), None if beyond `max_tempo` %."""
    if target.tempo <= 0 or donor.tempo <= 0:
        return None
    ratio = target.tempo / donor.tempo
    best = min((ratio, 2 * ratio, ratio / 2), key=lambda r: abs(math.log(r)))
    return best if abs(best - 1) <= max_tempo / 100 + 1e-9 else None


def pitch_shift(target: TrackAnalysis, donor: TrackAnalysis) -> int:
    """Semitones (in [-5, 6]) that bring the key of `donor` to that of `target`."""
    return (target.key - donor.key + 5) % 12 - 5
