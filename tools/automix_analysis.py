"""Analysis of multitrack songs for `tools.automix` (tempo, beats, downbeats and key), and
the planning of remixes from it.

Tempo and beats come from librosa's beat tracker on the drums (on the sum of the stems when
the drums are silent); the first downbeat is the beat, among the first four, with the most
kick-band energy every fourth beat; the key is the best match of the pitched stems' chroma
with the Krumhansl-Kessler major and minor profiles (a minor key stored as its relative
major). `tempo_ratio` and `pitch_shift` say how to bring one track to another's tempo and key;
`plan_all` chooses the stems of each remix, among the tracks of its split only.
"""
from __future__ import annotations

import math
import random
import typing as tp
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from demucs.errors import DatasetError

SOURCES = ("drums", "bass", "other", "vocals")
SPLITS = ("train", "valid")
UNPITCHED = ("drums",)  # sources that are time-stretched but never pitch-shifted
EXT = ".wav"
SILENCE_DB = -50.  # a stem whose RMS is below this (dB full scale) counts as silent
LOW_HZ = 150.  # upper frequency of the kick band used to find downbeats
ATTEMPTS = 20  # random tries per remix before giving up on finding compatible stems
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


# ---------------------------------------------------------------------------------------
# Remix plans

@dataclass
class StemPlan:
    """Where a stem of a remix comes from and how it is transformed."""
    source: str
    track: str
    offset_seconds: float  # start in the original track
    tempo_factor: float  # speed factor: the output lasts 1 / tempo_factor times the input
    pitch_semitones: int

    @property
    def tempo_percent(self) -> float:
        """The tempo change in percent, as soundstretch takes it."""
        return 100. * (self.tempo_factor - 1.)


@dataclass
class RemixPlan:
    name: str
    split: str  # train or valid
    target: str
    length_samples: int
    stems: list[StemPlan]

    @property
    def folder(self) -> str:
        """The remix folder, relative to the output folder (its key in the manifest)."""
        return f"{self.split}/{self.name}"

    def to_dict(self) -> dict[str, tp.Any]:
        return asdict(self)


@dataclass
class Settings:
    """The options that decide the remixes (everything but paths and workers)."""
    sources: list[str]
    seed: int = 42
    mixes_per_track: int = 6
    segment: float = 30.
    max_tempo: float = 15.  # percent
    max_pitch: int = 2  # semitones
    int16: bool = False


def _donors(target: TrackAnalysis, source: str, tracks: tp.Sequence[TrackAnalysis],
            used: set[str], settings: Settings) -> list[tuple[TrackAnalysis, float, int]]:
    """(track, tempo factor, pitch) of the tracks that can lend `source` to a remix of
    `target`."""
    out = []
    for donor in tracks:
        if donor.name in used or source in donor.silent:
            continue
        stretch = tempo_ratio(target, donor, settings.max_tempo)
        pitch = 0 if source in UNPITCHED else pitch_shift(target, donor)
        if stretch is not None and abs(pitch) <= settings.max_pitch:
            out.append((donor, stretch, pitch))
    return out


def _pick_start(track: TrackAnalysis, stretch: float, segment: float,
                rng: random.Random) -> float:
    """A random downbeat leaving `segment` seconds (after stretching), else the first one."""
    downbeats = track.downbeats()
    fitting = [t for t in downbeats if (track.duration - t) / stretch >= segment]
    return rng.choice(fitting) if fitting else downbeats[0]


def _try_remix(target: TrackAnalysis, tracks: tp.Sequence[TrackAnalysis],
               settings: Settings, rng: random.Random) -> list[StemPlan] | None:
    """One random remix of `target`, None when some source finds no compatible track."""
    playing = [s for s in settings.sources if s not in target.silent]
    if not playing:
        return None
    kept = rng.choice(playing)
    stems = [StemPlan(kept, target.name, 0., 1., 0)]
    used = {target.name}
    for source in rng.sample(settings.sources, len(settings.sources)):
        if source == kept:
            continue
        donors = _donors(target, source, tracks, used, settings)
        if not donors:
            return None
        donor, stretch, pitch = rng.choice(donors)
        used.add(donor.name)
        stems.append(StemPlan(source, donor.name, 0., stretch, pitch))
    return sorted(stems, key=lambda stem: settings.sources.index(stem.source))


def _place(stems: list[StemPlan], by_name: dict[str, TrackAnalysis], settings: Settings,
           rng: random.Random) -> int:
    """Choose the start downbeat of each stem; returns the remix length in samples."""
    seconds = settings.segment
    for stem in stems:
        track = by_name[stem.track]
        stem.offset_seconds = _pick_start(track, stem.tempo_factor, settings.segment, rng)
        seconds = min(seconds, (track.duration - stem.offset_seconds) / stem.tempo_factor)
    return max(0, int(seconds * by_name[stems[0].track].samplerate))


def plan_track(target: TrackAnalysis, tracks: tp.Sequence[TrackAnalysis], split: str,
               settings: Settings) -> list[RemixPlan]:
    """Up to `settings.mixes_per_track` distinct remixes of `target`, its other stems
    borrowed from `tracks`."""
    rng = random.Random(f"{settings.seed}:{target.name}")
    by_name = {track.name: track for track in tracks}
    plans: list[RemixPlan] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for _ in range(settings.mixes_per_track * ATTEMPTS):
        if len(plans) == settings.mixes_per_track:
            break
        stems = _try_remix(target, tracks, settings, rng)
        if stems is None or tuple((s.source, s.track) for s in stems) in seen:
            continue
        seen.add(tuple((s.source, s.track) for s in stems))
        length = _place(stems, by_name, settings, rng)
        if length > 0:
            name = f"{target.name} - mix{len(plans):02d}"
            plans.append(RemixPlan(name, split, target.name, length, stems))
    return plans


def plan_split(tracks: tp.Sequence[TrackAnalysis], split: str,
               settings: Settings) -> list[RemixPlan]:
    """The remixes of each of `tracks`, borrowing stems only among `tracks`."""
    plans = [plan for target in tracks for plan in plan_track(target, tracks, split, settings)]
    if not plans:
        raise DatasetError(f"No compatible stems for the {split} remixes among its "
                           f"{len(tracks)} tracks: use wider --max-tempo / --max-pitch.")
    return plans


def plan_all(tracks: tp.Sequence[TrackAnalysis], settings: Settings,
             valid: tp.Collection[str]) -> list[RemixPlan]:
    """The remixes of both splits: tracks named in `valid` only mix among themselves, the
    others too."""
    rates = {track.samplerate for track in tracks}
    if len(rates) > 1:
        raise DatasetError(f"Tracks have different sample rates {sorted(rates)}; resample them.")
    plans = []
    for split in SPLITS:
        pool = [track for track in tracks if (track.name in valid) == (split == "valid")]
        plans.extend(plan_split(pool, split, settings))
    return plans
