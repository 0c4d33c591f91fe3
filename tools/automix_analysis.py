"""Analysis of multitrack songs for `tools.automix` (tempo, beats, downbeats and key), and
the planning of remixes from it.

The stems are read a block at a time (`StemReader`) and reduced at once to a few features
(`tools.automix_features`): onset band energies of the drums (of the sum of the stems when
the drums are silent) give the tempo and the beats; the first downbeat is the beat, among
the first four, whose every fourth beat carries the most kick onsets and harmony changes;
the key is the best match of the pitched stems' chroma with the Krumhansl-Kessler major
and minor profiles (a minor key stored as its relative major). The memory an analysis
takes thus does not grow with the track, beyond a few floats per frame.

`tempo_ratio` and `pitch_shift` say how to bring one track to another's tempo and key;
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
from tools import automix_features as features

SOURCES = ("drums", "bass", "other", "vocals")
SPLITS = ("train", "valid")
UNPITCHED = ("drums",)  # sources that are time-stretched but never pitch-shifted
EXT = ".wav"
SILENCE_DB = -50.  # a stem whose RMS is below this (dB full scale) counts as silent
EARLY = 0.02  # seconds: a beat this close before the track start counts as at the start
BLOCK = 1 << 16  # frames read at a time from each stem
ATTEMPTS = 20  # random tries per remix before giving up on finding compatible stems


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

class StemReader:
    """The stems of a track, read together a block at a time: (C, N) float32 each."""

    def __init__(self, root: Path, track: str, sources: tp.Sequence[str]):
        self.track = track
        self.paths = {source: stem_path(root, track, source) for source in sources}
        self.files: dict[str, sf.SoundFile] = {}

    def __enter__(self) -> StemReader:
        try:
            for source, path in self.paths.items():
                self.files[source] = sf.SoundFile(str(path))
        except (RuntimeError, sf.LibsndfileError) as error:
            self.close()
            raise DatasetError(f"Track {self.track!r}: cannot read {path} ({error}).") from error
        lengths = {f.frames for f in self.files.values()}
        if len(lengths) > 1:
            self.close()
            raise DatasetError(f"Track {self.track!r}: stems have different lengths "
                               f"{sorted(lengths)}.")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    @property
    def samplerate(self) -> int:
        return next(iter(self.files.values())).samplerate

    @property
    def channels(self) -> int:
        return next(iter(self.files.values())).channels

    @property
    def length(self) -> int:
        return next(iter(self.files.values())).frames

    def blocks(self, frames: int = BLOCK) -> tp.Iterator[dict[str, np.ndarray]]:
        """The successive blocks of every stem, (C, frames) float32 (the last shorter)."""
        for file in self.files.values():
            file.seek(0)
        while True:
            try:
                block = {source: np.ascontiguousarray(
                         file.read(frames, dtype="float32", always_2d=True).T)
                         for source, file in self.files.items()}
            except (RuntimeError, sf.LibsndfileError) as error:
                raise DatasetError(f"Track {self.track!r}: cannot read its stems "
                                   f"({error}).") from error
            if next(iter(block.values())).shape[-1] == 0:
                return
            yield block


def _mono(block: dict[str, np.ndarray], sources: tp.Sequence[str]) -> np.ndarray:
    """The mono sum (N,) of the `sources` of `block`."""
    return np.sum([block[source] for source in sources], axis=0).mean(axis=0)


def _level_db(energy: float, count: int) -> float:
    rms = math.sqrt(energy / count) if count else 0.
    return 20 * math.log10(rms + 1e-12)


def estimate_beats(mono: np.ndarray, samplerate: int) -> tuple[float, list[float]]:
    """(tempo in BPM, beat times in seconds) of `mono` (T,)."""
    bands, fps = features.features_of(mono, samplerate, features.onset_spectrum)
    tempo, times = features.estimate_beats(bands, fps)
    return tempo, [round(float(t), 6) for t in times]


def complete_beats(beats: list[float]) -> list[float]:
    """`beats` with the beats the tracker missed at the start (at most a bar) put back."""
    if len(beats) < 2:
        return beats
    period = float(np.median(np.diff(beats)))
    beats = list(beats)
    for _ in range(4):
        if beats[0] - period < -EARLY:
            break
        beats.insert(0, round(max(0., beats[0] - period), 6))
    return beats


def _scan(stems: StemReader, rhythm: list[str], pitched: list[str]) -> tuple[
        features.BlockSpectrum, features.BlockSpectrum, dict[str, float]]:
    """One pass over the stems: onset bands of `rhythm`, chroma of `pitched`, energies."""
    onsets = features.onset_spectrum(stems.samplerate)
    chroma = features.chroma_spectrum(stems.samplerate)
    energy = dict.fromkeys(stems.paths, 0.)
    for block in stems.blocks():
        for source, wav in block.items():
            energy[source] += float(np.sum(np.square(wav, dtype=np.float64)))
        onsets.feed(_mono(block, rhythm))
        chroma.feed(_mono(block, pitched))
    return onsets, chroma, energy


def _onset_bands(stems: StemReader) -> features.BlockSpectrum:
    """Onset bands of the sum of all the stems (a second pass)."""
    onsets = features.onset_spectrum(stems.samplerate)
    for block in stems.blocks():
        onsets.feed(_mono(block, list(block)))
    return onsets


def analyse_track(root: Path, track: str, sources: tp.Sequence[str]) -> TrackAnalysis:
    """Read the stems of `track` block by block and estimate its tempo, beats and key.

    Rhythm comes from the unpitched stems (the drums), from all the stems when those are
    silent; the key from the pitched ones (all of them when there are none)."""
    rhythm = [source for source in sources if source in UNPITCHED] or list(sources)
    pitched = [source for source in sources if source not in UNPITCHED] or list(sources)
    with StemReader(root, track, sources) as stems:
        onsets, chroma, energy = _scan(stems, rhythm, pitched)
        count = stems.length * stems.channels
        silent = [s for s in sources if _level_db(energy[s], count) < SILENCE_DB]
        drums = any(s in UNPITCHED and s not in silent for s in rhythm)
        if not drums and rhythm != list(sources):
            onsets = _onset_bands(stems)
        samplerate, channels, length = stems.samplerate, stems.channels, stems.length
    bands, chromas = onsets.finish(), chroma.finish()
    onset_fps, chroma_fps = onsets.frame_rate(samplerate), chroma.frame_rate(samplerate)
    tempo, times = features.estimate_beats(bands, onset_fps, drums)
    beats = complete_beats([round(float(t), 6) for t in times])
    phase = features.downbeat_phase(features.band_flux(bands), onset_fps, chromas,
                                    chroma_fps, np.asarray(beats))
    key, minor = features.estimate_key(chromas)
    return TrackAnalysis(name=track, samplerate=samplerate, channels=channels, length=length,
                         tempo=tempo, beats=beats, key=key, minor=minor, phase=phase,
                         silent=silent)


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
