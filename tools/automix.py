"""Build the automix fine-tuning dataset: musically plausible remixes of MusDB-HQ tracks.

    MUSDB_PATH=/data/musdbhq AUTOMIX_MUSDB_PATH=/data/automix python -m tools.automix
    python -m tools.automix --musdb /data/musdbhq --out /data/automix --workers 8

For every track of `MUSDB/train`, the stems are analysed: the tempo and the beats with
librosa's beat tracker on the drums (on the sum of the stems when the drums are silent), and
the key from the chroma of the pitched stems (every source but drums). Each remix then keeps
one stem of a "target" track and borrows each other stem from a DIFFERENT track whose tempo
is within `--max-tempo` percent and whose key is within `--max-pitch` semitones (drums: tempo
only). Borrowed stems are time-stretched and pitch-shifted with soundstretch
(`demucs.repitch.repitch`, vocals with its speech setting) to the target's tempo and key, and
every stem starts on a downbeat (every fourth beat from the first one), so that the beats line
up. Remixes last `--segment` seconds (less when the tracks are shorter).

The output is a `dset.wav` dataset, the one `conf/dset/auto_mus.yaml` reads:
`OUT/train/<remix>/{mixture,drums,bass,other,vocals}.wav`, and `OUT/valid/<remix>/...` for the
remixes of `--valid-tracks` target tracks. `OUT/automix.json` records the analysis of each
track and, for each remix, the source track, start, tempo change and pitch shift of each stem.

The output folder is never wiped. A non-empty OUT is refused unless `--overwrite` is given;
then remixes already written with the same plan are kept (so rerunning an interrupted run
with `--overwrite` resumes it), others of the same name are replaced, nothing else is
deleted. Each remix is written to a hidden temporary folder, then renamed into place. The
output only depends on the input tracks and the options (the seed included).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import typing as tp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from demucs.errors import ConfigError, DatasetError, DemucsError
from demucs.repitch import find_soundstretch, repitch
from tools.automix_analysis import (EXT, SOURCES, UNPITCHED, TrackAnalysis, analyse_track,
                                    pitch_shift, read_stem, stem_path, tempo_ratio,
                                    track_names)

VOICE = ("vocals",)  # sources stretched with soundstretch's speech setting
MIXTURE = "mixture"
PLAN_FILE = ".automix.json"  # inside each remix folder: the plan it was made from
SUMMARY_FILE = "automix.json"
TMP_PREFIX = ".automix-tmp-"
ATTEMPTS = 20  # random tries per remix before giving up on finding compatible stems
MARGIN = 0.5  # extra seconds of source audio given to soundstretch


@dataclass
class StemPlan:
    """Where a stem of a remix comes from and how it is transformed."""
    source: str
    track: str
    start: float  # seconds, in the original track
    stretch: float  # speed factor: the output lasts 1 / stretch times the input
    pitch: int  # semitones

    @property
    def tempo(self) -> float:
        """The tempo change in percent, as soundstretch takes it."""
        return 100. * (self.stretch - 1.)


@dataclass
class RemixPlan:
    name: str
    split: str  # train or valid
    target: str
    length: int  # samples
    stems: list[StemPlan]

    def to_dict(self) -> dict[str, tp.Any]:
        data = asdict(self)
        for stem, plan in zip(data["stems"], self.stems):
            stem["tempo"] = round(plan.tempo, 6)
        return data


@dataclass
class Settings:
    """The options that decide the remixes (everything but paths and workers)."""
    sources: list[str]
    seed: int = 42
    mixes_per_track: int = 6
    segment: float = 30.
    max_tempo: float = 15.  # percent
    max_pitch: int = 2  # semitones
    valid_tracks: int = 4
    int16: bool = False


# ---------------------------------------------------------------------------------------
# Planning
def _donors(target: TrackAnalysis, source: str, tracks: tp.Sequence[TrackAnalysis],
            used: set[str], settings: Settings) -> list[tuple[TrackAnalysis, float, int]]:
    """(track, stretch, pitch) of the tracks that can lend `source` to a remix of `target`."""
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
        stem.start = _pick_start(track, stem.stretch, settings.segment, rng)
        seconds = min(seconds, (track.duration - stem.start) / stem.stretch)
    return max(0, int(seconds * by_name[stems[0].track].samplerate))


def plan_track(target: TrackAnalysis, tracks: tp.Sequence[TrackAnalysis], split: str,
               settings: Settings) -> list[RemixPlan]:
    """Up to `settings.mixes_per_track` distinct remixes of `target`."""
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


def valid_targets(names: tp.Sequence[str], settings: Settings) -> set[str]:
    """The target tracks whose remixes go to valid/ (a seeded choice)."""
    if not 1 <= settings.valid_tracks < len(names):
        raise ConfigError(f"--valid-tracks must be between 1 and the number of tracks minus "
                          f"one ({len(names) - 1}), got {settings.valid_tracks}.")
    return set(random.Random(settings.seed).sample(sorted(names), settings.valid_tracks))


def plan_all(tracks: tp.Sequence[TrackAnalysis], settings: Settings) -> list[RemixPlan]:
    rates = {track.samplerate for track in tracks}
    if len(rates) > 1:
        raise DatasetError(f"Tracks have different sample rates {sorted(rates)}; resample them.")
    valid = valid_targets([track.name for track in tracks], settings)
    plans = []
    for target in tracks:
        split = "valid" if target.name in valid else "train"
        plans.extend(plan_track(target, tracks, split, settings))
    if not any(plan.split == "valid" for plan in plans):
        raise DatasetError("No compatible stems for the valid remixes: use more tracks or "
                           "wider --max-tempo / --max-pitch.")
    return plans


# ---------------------------------------------------------------------------------------
# Rendering

def render_stem(root: Path, stem: StemPlan, length: int, channels: int) -> np.ndarray:
    """The (C, length) audio of `stem`, stretched, shifted and cut."""
    info = sf.info(str(stem_path(root, stem.track, stem.source)))
    start = int(round(stem.start * info.samplerate))
    frames = int(math.ceil((length / info.samplerate * stem.stretch + MARGIN) * info.samplerate))
    wav, samplerate = read_stem(root, stem.track, stem.source, start, frames)
    if stem.stretch != 1. or stem.pitch != 0:
        out = repitch(torch.from_numpy(wav), stem.pitch, stem.tempo,
                      voice=stem.source in VOICE, samplerate=samplerate)
        wav = out.numpy()
    if wav.shape[0] != channels:
        wav = np.repeat(wav.mean(axis=0, keepdims=True), channels, axis=0)
    wav = wav[:, :length]
    return np.pad(wav, ((0, 0), (0, length - wav.shape[-1])))


def _as_int16(stems: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """16-bit stems whose sum does not clip, the mixture being the sum of the files."""
    peak = float(np.abs(np.sum(list(stems.values()), axis=0)).max())
    scale = 32767 * min(1., 0.99 / peak) if peak > 0 else 32767
    out = {name: np.round(wav * scale).astype(np.int16) for name, wav in stems.items()}
    total = sum(wav.astype(np.int32) for wav in out.values())
    out[MIXTURE] = np.clip(total, -32768, 32767).astype(np.int16)  # type: ignore[arg-type]
    return out


def write_track(folder: Path, stems: dict[str, np.ndarray], samplerate: int,
                int16: bool) -> None:
    """Write the (C, T) stems and their sum as `mixture.wav` in `folder`."""
    if int16:
        data, subtype = _as_int16(stems), "PCM_16"
    else:
        data = {**stems, MIXTURE: np.sum(list(stems.values()), axis=0)}
        subtype = "FLOAT"
    for name, wav in data.items():
        sf.write(str(folder / (name + EXT)), np.asarray(wav).T, samplerate, subtype=subtype)


def _record(plan: RemixPlan, int16: bool) -> dict[str, tp.Any]:
    """What a remix folder records of how it was made."""
    return {"plan": plan.to_dict(), "int16": int16}


def is_complete(folder: Path, plan: RemixPlan, int16: bool) -> bool:
    """True when `folder` was written from exactly `plan`, in the same format."""
    try:
        return json.loads((folder / PLAN_FILE).read_text()) == _record(plan, int16)
    except (OSError, ValueError):
        return False


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Replace `folder` (if any) by `tmp`, with renames only."""
    if folder.exists():
        old = folder.with_name(f"{TMP_PREFIX}old-{folder.name}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def render_remix(root: Path, out: Path, plan: RemixPlan, samplerate: int, channels: int,
                 int16: bool) -> bool:
    """Write the remix `plan` under `out/<split>/<name>`; False when already there."""
    folder = out / plan.split / plan.name
    if is_complete(folder, plan, int16):
        return False
    tmp = folder.with_name(f"{TMP_PREFIX}{folder.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    stems = {stem.source: render_stem(root, stem, plan.length, channels) for stem in plan.stems}
    write_track(tmp, stems, samplerate, int16)
    (tmp / PLAN_FILE).write_text(json.dumps(_record(plan, int16), indent=1))
    _move_into_place(tmp, folder)
    return True


def render_target(root: Path, out: Path, plans: list[RemixPlan], samplerate: int,
                  channels: int, int16: bool) -> int:
    """Render the remixes of one target track; returns how many were written."""
    torch.set_num_threads(1)
    return sum(render_remix(root, out, plan, samplerate, channels, int16) for plan in plans)


# ---------------------------------------------------------------------------------------
# Command line

def run_jobs(fn: tp.Callable[..., tp.Any], jobs: tp.Sequence[tuple[tp.Any, ...]],
             workers: int, desc: str) -> list[tp.Any]:
    """`fn(*job)` for each job, in a pool of `workers` processes, with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, unit="track", file=sys.stderr, leave=False)
    results: list[tp.Any] = [None] * len(jobs)
    with bar:
        if workers <= 1:
            for index, job in enumerate(jobs):
                results[index] = fn(*job)
                bar.update()
            return results
        with ProcessPoolExecutor(workers) as executor:
            futures = {executor.submit(fn, *job): index for index, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    return results


def _path(value: Path | None, variable: str, flag: str) -> Path:
    if value is None:
        if not os.environ.get(variable):
            raise ConfigError(f"No {flag} given and ${variable} is not set: give the path "
                              f"with {flag} PATH or set {variable}.")
        value = Path(os.environ[variable])
    return value.expanduser()


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` without `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Output {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"Output folder {out} is not empty: pass --overwrite to write into "
                          "it (finished remixes with the same plan are kept, e.g. to resume "
                          "an interrupted run; nothing else is deleted).")


def prepare_output(out: Path, plans: tp.Sequence[RemixPlan]) -> None:
    """Create the split folders, remove our stale temporary folders and warn about
    remixes of an earlier run that the current plan does not have (they are kept)."""
    names = {(plan.split, plan.name) for plan in plans}
    unknown = 0
    for split in ("train", "valid"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for folder in (out / split).iterdir():
            if folder.name.startswith(TMP_PREFIX):
                shutil.rmtree(folder)
            elif not folder.name.startswith(".") and (split, folder.name) not in names:
                unknown += 1
    if unknown:
        print(f"Warning: {out} holds {unknown} track folders that this run does not make; "
              "they are kept and will be part of the dataset.", file=sys.stderr)


def write_summary(out: Path, settings: Settings, tracks: tp.Sequence[TrackAnalysis],
                  plans: tp.Sequence[RemixPlan]) -> None:
    analyses = {t.name: {k: v for k, v in asdict(t).items() if k != "beats"} for t in tracks}
    for track in tracks:
        analyses[track.name]["first_beat"] = track.beats[0] if track.beats else None
    summary = {"settings": asdict(settings), "tracks": analyses,
               "remixes": [plan.to_dict() for plan in plans]}
    tmp = out / (TMP_PREFIX + SUMMARY_FILE)
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / SUMMARY_FILE)


def parse_args(argv: tp.Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.automix",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--musdb", type=Path, help="MusDB-HQ folder (default $MUSDB_PATH)")
    parser.add_argument("--out", type=Path, help="output folder (default $AUTOMIX_MUSDB_PATH)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--mixes-per-track", type=int, default=6)
    parser.add_argument("--segment", type=float, default=30., help="remix length in seconds")
    parser.add_argument("--max-tempo", type=float, default=15., help="max tempo change, %%")
    parser.add_argument("--max-pitch", type=int, default=2, help="max shift in semitones")
    parser.add_argument("--valid-tracks", type=int, default=4,
                        help="target tracks whose remixes go to valid/")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--int16", action="store_true", help="16-bit wav instead of float32")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder (resumes a run)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.mixes_per_track < 1 or args.segment <= 0 or args.max_tempo < 0 or args.max_pitch < 0:
        raise ConfigError("--mixes-per-track must be at least 1, --segment positive and "
                          "--max-tempo / --max-pitch non-negative.")
    if MIXTURE in args.sources or len(set(args.sources)) != len(args.sources):
        raise ConfigError(f"--sources must be distinct stem names, without {MIXTURE}.")
    return Settings(sources=list(args.sources), seed=args.seed,
                    mixes_per_track=args.mixes_per_track, segment=args.segment,
                    max_tempo=args.max_tempo, max_pitch=args.max_pitch,
                    valid_tracks=args.valid_tracks, int16=args.int16)


def automix(musdb: Path, out: Path, settings: Settings, workers: int = 1,
            overwrite: bool = False) -> list[RemixPlan]:
    """Analyse `musdb/train`, write the remixes under `out`; returns their plans."""
    root = musdb / "train"
    if not root.is_dir():
        raise DatasetError(f"{root} does not exist: --musdb (or $MUSDB_PATH) must be the "
                           "MusDB-HQ folder holding train/.")
    find_soundstretch()
    names = track_names(root)
    valid_targets(names, settings)  # check --valid-tracks before the long analysis
    check_output(out, overwrite)
    jobs = [(root, name, settings.sources) for name in names]
    tracks: list[TrackAnalysis] = run_jobs(analyse_track, jobs, workers, "analysis")
    plans = plan_all(tracks, settings)
    prepare_output(out, plans)
    by_target: dict[str, list[RemixPlan]] = {}
    for plan in plans:
        by_target.setdefault(plan.target, []).append(plan)
    channels = max(track.channels for track in tracks)
    render_jobs = [(root, out, target_plans, tracks[0].samplerate, channels, settings.int16)
                   for target_plans in by_target.values()]
    written = sum(run_jobs(render_target, render_jobs, workers, "remixes"))
    write_summary(out, settings, tracks, plans)
    print(f"{len(plans)} remixes of {len(by_target)} tracks in {out} "
          f"({written} written, {len(plans) - written} already there).")
    return plans


def main(argv: tp.Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        musdb = _path(args.musdb, "MUSDB_PATH", "--musdb")
        out = _path(args.out, "AUTOMIX_MUSDB_PATH", "--out")
        automix(musdb, out, settings_from(args), args.workers, args.overwrite)
    except DemucsError as error:
        print(f"automix: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
