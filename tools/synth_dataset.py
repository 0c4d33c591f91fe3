"""A small, deterministic, MusDB-HQ-shaped dataset of synthetic music.

    python -m tools.synth_dataset OUT --tracks 8 --seconds 12

writes `OUT/train/<track>/{mixture,drums,bass,other,vocals}.wav` and `OUT/test/<track>/...`
(stereo, 16-bit by default). Each track has a tempo, a key and a chord progression: the
drums play kick, snare and hi-hat patterns, the bass plays the chord roots, `other` plays
the chords and `vocals` a vibrato melody. Other source names get an arpeggio with their own
timbre. The mixture is the exact sum of the stems (as written to disk), kept below full
scale. The first train tracks are named after MusDB validation tracks, so that the MusDB
train/valid split of `demucs.wav.get_musdb_wav_datasets` gives a non-empty valid set.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf

SOURCES = ("drums", "bass", "other", "vocals")
# A few of the official MusDB validation tracks (see musdb's configs/mus.yaml).
VALID_NAMES = ("Actions - One Minute Smile", "Clara Berry And Wooldog - Waltz For My Victims",
               "Johnny Lokke - Promises & Lies", "Patrick Talbot - A Reason To Leave")
PEAK = 0.9  # peak level of the mixture
MAJOR = np.array([0, 2, 4, 5, 7, 9, 11, 12])
PROGRESSIONS = ([0, 5, 3, 4], [0, 3, 4, 4], [5, 3, 0, 4], [0, 4, 5, 3])  # scale degrees
# Drum patterns of `Song(pattern=...)`: sixteenth-note positions in the bar of the kicks,
# snares and hi-hats. Without a pattern, the drums play the original groove (kick on beats
# 1 and 3, snare on 2 and 4, hi-hat on every eighth note).
PATTERNS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "rock": ((0, 8), (4, 12), (0, 2, 4, 6, 8, 10, 12, 14)),
    "dotted": ((0, 3, 6, 10), (4, 12), (0, 2, 4, 6, 8, 10, 12, 14)),  # 3+3+2 kicks
    "sixteenths": ((0, 7, 8, 10), (4, 12), tuple(range(16))),
    "offbeat": ((0, 8, 11), (4, 12), (2, 6, 10, 14)),  # hi-hat on the "and"s only
    "four": ((0, 4, 8, 12), (4, 12), (2, 6, 10, 14)),  # four on the floor
    "quarters": ((0, 8), (4, 12), (0, 4, 8, 12)),
}


class Song:
    """The musical plan of a track: tempo, key, chords and pan positions.

    By default the tempo is drawn in [90, 140] BPM, the drums play the original groove and
    the track starts on a downbeat. `tempo` (BPM) sets the tempo, `pattern` (a key of
    `PATTERNS`) the drum pattern, and `offset` (seconds, less than a bar) cuts the start
    of the first bar off, so that the first downbeat comes at `first_downbeat`. The random
    draws are the same whatever these options.
    """

    def __init__(self, rng: np.random.Generator, seconds: float, samplerate: int,
                 tempo: float | None = None, pattern: str | None = None,
                 offset: float = 0.):
        self.rng = rng
        self.samplerate = samplerate
        self.length = int(seconds * samplerate)
        self.beat = 60 / rng.uniform(90, 140)  # seconds per beat
        self.root = 40 + int(rng.integers(0, 12))  # MIDI note of the key (E2 to D#3)
        self.progression = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
        if tempo is not None:
            self.beat = 60 / tempo
        if pattern is not None and pattern not in PATTERNS:
            raise ValueError(f"Unknown drum pattern {pattern!r}, use one of {list(PATTERNS)}")
        if not 0 <= offset < 4 * self.beat:
            raise ValueError(f"offset {offset} must be in [0, {4 * self.beat}) (one bar)")
        self.pattern = pattern
        self.offset = offset  # seconds of the first bar before the track starts

    @property
    def tempo(self) -> float:
        """Beats per minute."""
        return 60 / self.beat

    @property
    def key(self) -> int:
        """Pitch class (0 = C) of the major key."""
        return self.root % 12

    @property
    def first_downbeat(self) -> float:
        """Time in seconds of the first bar start in the track."""
        return (4 * self.beat - self.offset) % (4 * self.beat)

    def bars(self) -> range:
        return range(int((self.length / self.samplerate + self.offset) / (4 * self.beat)) + 1)

    def chord(self, bar: int) -> list[int]:
        """MIDI notes (a triad, relative to the key's root) of `bar`."""
        degree = self.progression[bar % len(self.progression)]
        return [int(MAJOR[(degree + step) % 7] + 12 * ((degree + step) // 7))
                for step in (0, 2, 4)]


def midi_hz(note: float) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def _add(out: np.ndarray, start: float, sound: np.ndarray, samplerate: int) -> None:
    """Add `sound` (T,) into `out` (T_out,) at `start` seconds, cut at both ends of `out`."""
    if start < 0:  # the part of the sound before the track start is cut
        sound = sound[int(-start * samplerate):]
        start = 0.
    offset = int(start * samplerate)
    if offset >= len(out):
        return
    sound = sound[:len(out) - offset]
    out[offset:offset + len(sound)] += sound


@functools.lru_cache(maxsize=256)
def _tone(freq: float, duration: float, samplerate: int, harmonics: int = 4,
          decay: float = 3., vibrato: float = 0.) -> np.ndarray:
    """A note of `duration` seconds with `harmonics` partials and an exponential decay.

    Notes repeat a lot, hence the cache: the result must not be modified.
    """
    t = np.arange(int(duration * samplerate)) / samplerate
    phase = 2 * np.pi * freq * t
    if vibrato:
        phase += vibrato * np.sin(2 * np.pi * 5.5 * t)
    # sin(k x) for k = 1, 2, ... by the recurrence sin((k+1)x) = 2 cos(x) sin(kx) - sin((k-1)x)
    two_cos = 2 * np.cos(phase)
    previous, current = np.zeros_like(phase), np.sin(phase)
    wave = current.copy()
    for k in range(2, harmonics + 1):
        previous, current = current, two_cos * current - previous
        wave += current / k ** 1.5
    attack = np.minimum(1., t / 0.01)
    release = np.clip((duration - t) / 0.02, 0, 1)
    wave *= np.exp(-decay * t) * attack * release
    wave.flags.writeable = False
    return wave


def _drums(song: Song) -> np.ndarray:
    """Kick on beats 1 and 3, snare on 2 and 4, hi-hat on every eighth note (or the
    song's pattern)."""
    sr, rng = song.samplerate, song.rng
    out = np.zeros(song.length)
    t = np.arange(int(0.25 * sr)) / sr
    kick = np.sin(2 * np.pi * (45 * t + 60 * (1 - np.exp(-t * 30)) / 30)) * np.exp(-t * 18)
    snare = (rng.standard_normal(len(t)) * 0.6 + np.sin(2 * np.pi * 190 * t)) * np.exp(-t * 25)
    hat_noise = np.diff(rng.standard_normal(int(0.06 * sr) + 1))  # crude high-pass
    hat = 0.25 * hat_noise * np.exp(-np.arange(len(hat_noise)) / sr * 70)
    if song.pattern is not None:
        return 0.5 * _pattern(song, kick, 0.7 * snare, hat)
    n_beats = int((song.length / sr + song.offset) / song.beat) + 1
    for beat in range(n_beats):
        start = beat * song.beat - song.offset
        _add(out, start, kick if beat % 2 == 0 else 0.7 * snare, sr)
        for half in (0., 0.5):
            _add(out, start + half * song.beat, hat * rng.uniform(0.6, 1.), sr)
    return 0.5 * out


def _pattern(song: Song, kick: np.ndarray, snare: np.ndarray, hat: np.ndarray) -> np.ndarray:
    """The drums of `song.pattern`, bar after bar."""
    kicks, snares, hats = PATTERNS[song.pattern or "rock"]
    out = np.zeros(song.length)
    sixteenth = song.beat / 4
    for bar in song.bars():
        start = bar * 4 * song.beat - song.offset
        for step in range(16):
            at = start + step * sixteenth
            if step in kicks:
                _add(out, at, kick, song.samplerate)
            if step in snares:
                _add(out, at, snare, song.samplerate)
            if step in hats:
                level = song.rng.uniform(0.6, 1.) * (1. if step % 4 == 0 else 0.7)
                _add(out, at, hat * level, song.samplerate)
    return out


def _bass(song: Song) -> np.ndarray:
    """The root of each chord in eighth notes, an octave below the key."""
    out = np.zeros(song.length)
    for bar in song.bars():
        root = song.root - 12 + song.chord(bar)[0]
        for eighth in range(8):
            start = (bar * 4 + eighth / 2) * song.beat - song.offset
            note = root + (12 if eighth == 7 else 0)
            _add(out, start, _tone(midi_hz(note), song.beat / 2, song.samplerate, 6, 4.),
                 song.samplerate)
    return 0.4 * out


def _other(song: Song) -> np.ndarray:
    """Sustained chords, one per bar, with a softer restrike on beat 3."""
    out = np.zeros(song.length)
    for bar in song.bars():
        for beat in (0, 2):
            start = (bar * 4 + beat) * song.beat - song.offset
            for note in song.chord(bar):
                tone = _tone(midi_hz(song.root + 12 + note), 2 * song.beat, song.samplerate,
                             3, 1.)
                _add(out, start, tone * (1. if beat == 0 else 0.6), song.samplerate)
    return 0.15 * out


def _melody(song: Song, octave: int, step: float, harmonics: int,
            vibrato: float) -> np.ndarray:
    """A line of chord and scale notes, one every `step` beats, with some rests."""
    rng, sr = song.rng, song.samplerate
    out = np.zeros(song.length)
    n_notes = int((song.length / sr + song.offset) / (step * song.beat)) + 1
    for index in range(n_notes):
        if rng.random() < 0.2:
            continue  # a rest
        start = index * step * song.beat
        chord = song.chord(int(start / (4 * song.beat)))
        start -= song.offset
        note = chord[int(rng.integers(3))] + int(rng.choice([0, 0, 2, -1]))
        tone = _tone(midi_hz(song.root + 12 * octave + note), step * song.beat * 0.95, sr,
                     harmonics, 1.5, vibrato)
        _add(out, start, tone, sr)
    return 0.3 * out


def _stem(song: Song, source: str) -> np.ndarray:
    """The mono signal (T,) of `source`."""
    if source == "drums":
        return _drums(song)
    if source == "bass":
        return _bass(song)
    if source == "other":
        return _other(song)
    if source == "vocals":
        return _melody(song, octave=2, step=1., harmonics=5, vibrato=0.6)
    # Any other instrument: an arpeggio whose register and timbre depend on the name.
    digest = int(hashlib.sha1(source.encode()).hexdigest()[:4], 16)
    return _melody(song, octave=1 + digest % 2, step=0.5, harmonics=2 + digest % 5,
                   vibrato=0.)


def _stereo(mono: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pan `mono` (T,) to a random position and delay one side slightly: (T, 2)."""
    pan = rng.uniform(0.2, 0.8)
    delay = int(rng.integers(0, 20))
    right = np.concatenate([np.zeros(delay), mono[:len(mono) - delay]])
    return np.stack([mono * np.sqrt(1 - pan), right * np.sqrt(pan)], axis=1)


def synth_song(seed: int, seconds: float, samplerate: int = 44100,
               sources: tp.Sequence[str] = SOURCES, tempo: float | None = None,
               pattern: str | None = None,
               offset: float = 0.) -> tuple[Song, dict[str, np.ndarray]]:
    """The plan of one track (its tempo, key and first downbeat are known) and its stems
    (T, 2) float64, scaled so that their sum peaks at PEAK. See `Song` for the options."""
    rng = np.random.default_rng(seed)
    song = Song(rng, seconds, samplerate, tempo, pattern, offset)
    stems = {source: _stereo(_stem(song, source), rng) for source in sources}
    peak = max(np.abs(sum(stems.values())).max(), 1e-9)  # type: ignore[union-attr]
    return song, {source: stem * (PEAK / peak) for source, stem in stems.items()}


def synth_track(seed: int, seconds: float, samplerate: int = 44100,
                sources: tp.Sequence[str] = SOURCES) -> dict[str, np.ndarray]:
    """The stems (T, 2) float64 of one track, scaled so that their sum peaks at PEAK."""
    return synth_song(seed, seconds, samplerate, sources)[1]


def write_track(folder: Path, stems: dict[str, np.ndarray], samplerate: int,
                float_wav: bool = False) -> None:
    """Write each stem and their sum as `mixture.wav` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if float_wav:
        stems = {name: stem.astype(np.float32) for name, stem in stems.items()}
        mixture = sum(stems.values())
        subtype = "FLOAT"
    else:  # quantise first, so that the mixture is exactly the sum of the files
        stems = {name: np.round(stem * 32767).astype(np.int16) for name, stem in stems.items()}
        total = sum(stem.astype(np.int32) for stem in stems.values())
        mixture = np.clip(total, -32768, 32767).astype(np.int16)
        subtype = "PCM_16"
    for name, stem in {**stems, "mixture": mixture}.items():
        sf.write(str(folder / f"{name}.wav"), stem, samplerate, subtype=subtype)


def track_names(tracks: int, n_valid: int) -> list[str]:
    """`tracks` names, the first `n_valid` being MusDB validation track names."""
    n_valid = min(n_valid, len(VALID_NAMES), tracks)
    return list(VALID_NAMES[:n_valid]) + [f"synth_{k:03d}" for k in range(n_valid, tracks)]


def generate_dataset(out: str | Path, tracks: int = 8, seconds: float = 12.,
                     samplerate: int = 44100, seed: int = 0,
                     sources: tp.Sequence[str] = SOURCES, test_tracks: int = 2,
                     valid_tracks: int | None = None, float_wav: bool = False) -> Path:
    """Write the dataset under `out` and return `out`.

    `train/` gets `tracks` tracks (by default a quarter of them, at least one, named as
    MusDB validation tracks) and `test/` gets `test_tracks` tracks. The content only
    depends on the arguments.
    """
    out = Path(out)
    n_valid = max(1, tracks // 4) if valid_tracks is None else valid_tracks
    splits = {"train": track_names(tracks, n_valid),
              "test": [f"synth_test_{k:03d}" for k in range(test_tracks)]}
    index = 0
    for split, names in splits.items():
        for name in names:
            stems = synth_track(seed * 1000 + index, seconds, samplerate, sources)
            write_track(out / split / name, stems, samplerate, float_wav)
            index += 1
    return out


def main(argv: tp.Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.synth_dataset",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (gets train/ and test/)")
    parser.add_argument("--tracks", type=int, default=8, help="number of train tracks")
    parser.add_argument("--test-tracks", type=int, default=2, help="number of test tracks")
    parser.add_argument("--seconds", type=float, default=12., help="duration of each track")
    parser.add_argument("--samplerate", type=int, default=44100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES),
                        help="stem names (mixture.wav is always written)")
    parser.add_argument("--float", action="store_true", help="32-bit float wav files")
    args = parser.parse_args(argv)
    if args.tracks < 1 or args.seconds <= 0:
        parser.error("--tracks must be at least 1 and --seconds positive.")
    if "mixture" in args.sources:
        parser.error("`mixture` is written anyway; do not list it in --sources.")
    generate_dataset(args.out, args.tracks, args.seconds, args.samplerate, args.seed,
                     args.sources, args.test_tracks, float_wav=args.float)
    print(f"Wrote {args.tracks} train and {args.test_tracks} test tracks to {args.out}")


if __name__ == "__main__":
    main()
