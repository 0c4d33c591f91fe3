"""Build the automix fine-tuning dataset: musically plausible remixes of MusDB-HQ tracks.

    MUSDB_PATH=/data/musdbhq AUTOMIX_MUSDB_PATH=/data/automix python -m tools.automix
    python -m tools.automix --musdb /data/musdbhq --out /data/automix --workers 8

For every track of `MUSDB/train`, the stems are analysed (`tools.automix_analysis`): the
tempo, the beats and the downbeats from the onsets of the drums (of the sum of the stems
when the drums are silent), and the key from the chroma of the pitched stems (every source
but drums). Each remix then keeps
one stem of a "target" track and borrows each other stem from a DIFFERENT track whose tempo
is within `--max-tempo` percent and whose key is within `--max-pitch` semitones (drums: tempo
only). Borrowed stems are time-stretched and pitch-shifted with soundstretch
(`demucs.repitch.repitch`, vocals with its speech setting) to the target's tempo and key, and
every stem starts on a downbeat (every fourth beat from the first one), so that the beats line
up. Remixes last `--segment` seconds (less when the tracks are shorter).

Splits: the official MusDB validation tracks (the list `demucs.wav` validates on) never lend
a stem to a training remix. The other tracks are remixed among themselves into
`OUT/train/`; the validation tracks are remixed among themselves into `OUT/valid/` (the wav
dataset needs both folders, and training concatenates them to MusDB's own sets).

The output is a `dset.wav` dataset, the one `conf/dset/auto_mus.yaml` reads:
`OUT/{train,valid}/<remix>/{mixture,drums,bass,other,vocals}.wav`, float32 by default. With
`--int16`, a remix whose mixture or any stem would exceed full scale is scaled down as a whole
(all stems and the mixture by the same gain, so that the mixture stays the sum of the stems)
instead of clipping or wrapping around. `OUT/remixes.json` is the provenance manifest: for each
remix folder (`train/NAME`), for each stem, the source track, `offset_seconds` in it,
`tempo_factor` (speed factor, > 1 is faster) and `pitch_semitones`, and the remix `gain`.
`OUT/automix.json` records the settings and the analysis of each track.

The output folder is never wiped. A non-empty OUT is refused unless `--overwrite` is given;
then remixes already written with the same plan are kept (so rerunning an interrupted run
with `--overwrite` resumes it), others of the same name are replaced, nothing else is
deleted; the manifest keeps the entries of every remix folder present. Each remix is written
to a hidden temporary folder, then renamed into place; both json files are written
atomically. The analysis of each track is kept in `OUT/.automix-analysis/` as soon as it is
done and read back by later runs while the stems are unchanged. The output only depends on
the input tracks and the options (the seed included).

With `--workers N` (N > 1), tracks are analysed and remixed in N spawned processes
(`tools.automix_workers`), one track at a time each; a worker that dies is reported as one
line naming the track it was on, and the work already done is kept for the rerun.
Errors are one line on stderr (exit status 1); `-v` adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import typing as tp
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from demucs.errors import ConfigError, DatasetError, report_errors
from demucs.repitch import find_soundstretch, repitch
from demucs.utils import atomic_path
from demucs.wav import musdb_valid_tracks
from tools.automix_analysis import (EXT, SOURCES, SPLITS, RemixPlan, Settings, StemPlan,
                                    TrackAnalysis, analyse_track, plan_all, read_stem,
                                    stem_path, track_names)
from tools.automix_workers import Workers

PROG = "tools.automix"
VOICE = ("vocals",)  # sources stretched with soundstretch's speech setting
MIXTURE = "mixture"
PLAN_FILE = ".automix.json"  # inside each remix folder: the plan it was made from
SUMMARY_FILE = "automix.json"
MANIFEST_FILE = "remixes.json"
TMP_PREFIX = ".automix-tmp-"
ANALYSIS_DIR = ".automix-analysis"  # inside OUT: one json per analysed track
ANALYSIS_VERSION = 2  # bump when the analysis changes: cached analyses are then redone
MARGIN = 0.5  # extra seconds of source audio given to soundstretch
HEADROOM = 0.99  # peak of the loudest 16-bit file, relative to full scale


# ---------------------------------------------------------------------------------------
# Splits

def validation_tracks() -> set[str]:
    """The official MusDB validation tracks, as the datasets of `demucs.wav` use them."""
    return set(musdb_valid_tracks())


def split_names(root: Path, names: tp.Sequence[str],
                sources: tp.Sequence[str]) -> dict[str, list[str]]:
    """The tracks of each split: valid holds the official validation tracks, train the
    others. Each split needs one track per source (a remix takes each stem elsewhere)."""
    valid = validation_tracks()
    splits = {"train": [name for name in names if name not in valid],
              "valid": [name for name in names if name in valid]}
    kinds = {"train": "tracks besides the official MusDB validation tracks",
             "valid": "official MusDB validation tracks"}
    for split, members in splits.items():
        if len(members) < len(sources):
            raise DatasetError(
                f"{root} holds {len(members)} {kinds[split]}, which are remixed among "
                f"themselves into {split}/: each remix needs {len(sources)} of them (one per "
                "source); --musdb must be a MusDB-HQ folder.")
    return splits


# ---------------------------------------------------------------------------------------
# Rendering

def render_stem(root: Path, stem: StemPlan, length: int, channels: int) -> np.ndarray:
    """The (C, length) audio of `stem`, stretched, shifted and cut."""
    info = sf.info(str(stem_path(root, stem.track, stem.source)))
    start = int(round(stem.offset_seconds * info.samplerate))
    seconds = length / info.samplerate * stem.tempo_factor + MARGIN
    wav, samplerate = read_stem(root, stem.track, stem.source, start,
                                int(math.ceil(seconds * info.samplerate)))
    if stem.tempo_factor != 1. or stem.pitch_semitones != 0:
        out = repitch(torch.from_numpy(wav), stem.pitch_semitones, stem.tempo_percent,
                      voice=stem.source in VOICE, samplerate=samplerate)
        wav = out.numpy()
    if wav.shape[0] != channels:
        wav = np.repeat(wav.mean(axis=0, keepdims=True), channels, axis=0)
    wav = wav[:, :length]
    return np.pad(wav, ((0, 0), (0, length - wav.shape[-1])))


def int16_gain(stems: dict[str, np.ndarray]) -> float:
    """The gain (at most 1) that brings the loudest of the stems and their sum to
    `HEADROOM` of full scale: one gain for the whole remix keeps mixture = sum of stems."""
    mix = np.sum(list(stems.values()), axis=0)
    peak = max(float(np.abs(wav).max(initial=0.)) for wav in [mix, *stems.values()])
    return min(1., HEADROOM / peak) if peak > 0 else 1.


def _as_int16(stems: dict[str, np.ndarray], gain: float) -> dict[str, np.ndarray]:
    """The stems scaled by `gain` in 16 bits, and their exact sum as the mixture."""
    # 2 ** 15 steps per unit, the scale readers divide by (as the original's `i16_pcm`).
    out = {name: np.round(wav * gain * 2 ** 15).astype(np.int16) for name, wav in stems.items()}
    total = np.sum([wav.astype(np.int32) for wav in out.values()], axis=0)
    # With HEADROOM, rounding (at most half a step per stem) cannot reach full scale.
    out[MIXTURE] = np.clip(total, -32768, 32767).astype(np.int16)
    return out


def write_track(folder: Path, stems: dict[str, np.ndarray], samplerate: int,
                int16: bool) -> float:
    """Write the (C, T) stems and their sum as `mixture.wav` in `folder`; returns the gain
    applied to all of them (1 in float32, where nothing clips)."""
    if int16:
        gain = int16_gain(stems)
        data, subtype = _as_int16(stems, gain), "PCM_16"
    else:
        gain, subtype = 1., "FLOAT"
        data = {**stems, MIXTURE: np.sum(list(stems.values()), axis=0)}
    for name, wav in data.items():
        sf.write(str(folder / (name + EXT)), np.asarray(wav).T, samplerate, subtype=subtype)
    return gain


def _record(plan: RemixPlan, int16: bool) -> dict[str, tp.Any]:
    """What a remix folder records of how it was made (its gain is added once written)."""
    return {"plan": plan.to_dict(), "int16": int16}


def read_record(folder: Path) -> dict[str, tp.Any] | None:
    """The record of the remix in `folder`, None when there is none (or unreadable)."""
    try:
        record = json.loads((folder / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(folder: Path, plan: RemixPlan, int16: bool) -> bool:
    """True when `folder` was written from exactly `plan`, in the same format."""
    record = read_record(folder)
    return record is not None and {k: record.get(k) for k in ("plan", "int16")} == \
        _record(plan, int16)


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
    folder = out / plan.folder
    if is_complete(folder, plan, int16):
        return False
    tmp = folder.with_name(f"{TMP_PREFIX}{folder.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    stems = {stem.source: render_stem(root, stem, plan.length_samples, channels)
             for stem in plan.stems}
    gain = write_track(tmp, stems, samplerate, int16)
    record = {**_record(plan, int16), "gain": gain, "samplerate": samplerate}
    (tmp / PLAN_FILE).write_text(json.dumps(record, indent=1))
    _move_into_place(tmp, folder)
    return True


def render_target(root: Path, out: Path, plans: list[RemixPlan], samplerate: int,
                  channels: int, int16: bool) -> int:
    """Render the remixes of one target track; returns how many were written."""
    torch.set_num_threads(1)
    return sum(render_remix(root, out, plan, samplerate, channels, int16) for plan in plans)


# ---------------------------------------------------------------------------------------
# Analysis, cached per track

def _stamps(root: Path, track: str, sources: tp.Sequence[str]) -> dict[str, list[int]]:
    """Size and modification time of each stem of `track`: what its analysis depends on."""
    stamps = {}
    for source in sources:
        stat = stem_path(root, track, source).stat()
        stamps[source] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _analysis_path(out: Path, track: str) -> Path:
    return out / ANALYSIS_DIR / f"{track}.json"


def cached_analysis(root: Path, out: Path, track: str,
                    sources: tp.Sequence[str]) -> TrackAnalysis | None:
    """The analysis of `track` saved by an earlier run, None unless its stems, sources
    and analysis version are the same."""
    try:
        record = json.loads(_analysis_path(out, track).read_text())
        if record["version"] == ANALYSIS_VERSION and record["sources"] == list(sources) \
                and record["stems"] == _stamps(root, track, sources):
            return TrackAnalysis(**record["analysis"])
    except (OSError, ValueError, KeyError, TypeError, DatasetError):
        pass
    return None


def save_analysis(root: Path, out: Path, analysis: TrackAnalysis,
                  sources: tp.Sequence[str]) -> None:
    """Keep `analysis` in OUT, so that a rerun (after an interruption) does not redo it."""
    record = {"version": ANALYSIS_VERSION, "sources": list(sources),
              "stems": _stamps(root, analysis.name, sources), "analysis": asdict(analysis)}
    path = _analysis_path(out, analysis.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record))


def analyse_all(root: Path, out: Path, names: tp.Sequence[str], sources: tp.Sequence[str],
                workers: Workers) -> tuple[list[TrackAnalysis], int]:
    """The analysis of each track of `names` (those cached in OUT are read back), each
    saved as soon as done; also returns how many were read back."""
    tracks = [cached_analysis(root, out, name, sources) for name in names]
    todo = [index for index, track in enumerate(tracks) if track is None]

    def done(job: int, analysis: TrackAnalysis) -> None:
        save_analysis(root, out, analysis, sources)
        tracks[todo[job]] = analysis

    workers.run(analyse_track, [(root, names[index], sources) for index in todo],
                [f"analysing track {names[index]!r}" for index in todo], done, "analysis")
    return tp.cast(list[TrackAnalysis], tracks), len(names) - len(todo)


# ---------------------------------------------------------------------------------------
# Manifest and summary

def manifest_entry(record: dict[str, tp.Any]) -> dict[str, tp.Any]:
    """The provenance of one remix, from the record its folder holds."""
    plan = record["plan"]
    stems = {stem["source"]: {key: stem[key] for key in
                              ("track", "offset_seconds", "tempo_factor", "pitch_semitones")}
             for stem in plan["stems"]}
    return {"split": plan["split"], "target": plan["target"],
            "length_samples": plan["length_samples"], "samplerate": record.get("samplerate"),
            "format": "int16" if record.get("int16") else "float32",
            "gain": record.get("gain"), "stems": stems}


def read_manifest(out: Path) -> dict[str, tp.Any]:
    """The manifest of `out`, empty when there is none yet."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise DatasetError(f"Cannot read {out / MANIFEST_FILE} ({error}); remove it, it is "
                           "rebuilt from the remix folders.") from error
    return manifest if isinstance(manifest, dict) else {}


def write_manifest(out: Path) -> dict[str, tp.Any]:
    """Write `remixes.json`: an entry for each remix folder of `out`, from the record the
    folder holds, else from the previous manifest (folders of neither are not ours)."""
    previous = read_manifest(out)
    manifest: dict[str, tp.Any] = {}
    for split in SPLITS:
        folders = sorted((out / split).iterdir()) if (out / split).is_dir() else []
        for folder in folders:
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            key = f"{split}/{folder.name}"
            record = read_record(folder)
            if record is not None and "plan" in record:
                manifest[key] = manifest_entry(record)
            elif key in previous:
                manifest[key] = previous[key]
    with atomic_path(out / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


def write_summary(out: Path, settings: Settings, tracks: tp.Sequence[TrackAnalysis],
                  splits: dict[str, list[str]]) -> None:
    """Write `automix.json`: the settings, the tracks of each split and their analysis."""
    analyses = {t.name: {k: v for k, v in asdict(t).items() if k != "beats"} for t in tracks}
    for track in tracks:
        analyses[track.name]["first_beat"] = track.beats[0] if track.beats else None
    summary = {"settings": asdict(settings), "splits": splits, "tracks": analyses}
    with atomic_path(out / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))


# ---------------------------------------------------------------------------------------
# Command line

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
    names = {plan.folder for plan in plans}
    unknown = 0
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        for folder in (out / split).iterdir():
            if folder.name.startswith(TMP_PREFIX):
                shutil.rmtree(folder)
            elif not folder.name.startswith(".") and f"{split}/{folder.name}" not in names:
                unknown += 1
    if unknown:
        print(f"Warning: {out} holds {unknown} track folders that this run does not make; "
              "they are kept and will be part of the dataset.", file=sys.stderr)


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
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes (0 or 1: work in this process)")
    parser.add_argument("--int16", action="store_true",
                        help="16-bit wav instead of float32 (loud remixes are scaled down)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder (resumes a run)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the traceback of errors")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.mixes_per_track < 1 or args.segment <= 0 or args.max_tempo < 0 or args.max_pitch < 0:
        raise ConfigError("--mixes-per-track must be at least 1, --segment positive and "
                          "--max-tempo / --max-pitch non-negative.")
    if MIXTURE in args.sources or len(set(args.sources)) != len(args.sources):
        raise ConfigError(f"--sources must be distinct stem names, without {MIXTURE}.")
    return Settings(sources=list(args.sources), seed=args.seed,
                    mixes_per_track=args.mixes_per_track, segment=args.segment,
                    max_tempo=args.max_tempo, max_pitch=args.max_pitch, int16=args.int16)


def automix(musdb: Path, out: Path, settings: Settings, workers: int = 1,
            overwrite: bool = False) -> list[RemixPlan]:
    """Analyse `musdb/train`, write the remixes under `out`; returns their plans."""
    root = musdb / "train"
    if not root.is_dir():
        raise DatasetError(f"{root} does not exist: --musdb (or $MUSDB_PATH) must be the "
                           "MusDB-HQ folder holding train/.")
    find_soundstretch()
    splits = split_names(root, track_names(root), settings.sources)
    check_output(out, overwrite)
    names = [name for members in splits.values() for name in members]
    with Workers(workers) as pool:
        tracks, cached = analyse_all(root, out, names, settings.sources, pool)
        print(f"Analysed {len(tracks)} tracks ({cached} read back from {out / ANALYSIS_DIR}).")
        plans = plan_all(tracks, settings, splits["valid"])
        prepare_output(out, plans)
        read_manifest(out)  # an unreadable manifest stops us before the long part
        written = render_all(root, out, plans, tracks, settings.int16, pool)
    write_summary(out, settings, tracks, splits)
    write_manifest(out)
    targets = len({plan.target for plan in plans})
    print(f"{len(plans)} remixes of {targets} tracks in {out} "
          f"({written} written, {len(plans) - written} already there).")
    return plans


def render_all(root: Path, out: Path, plans: tp.Sequence[RemixPlan],
               tracks: tp.Sequence[TrackAnalysis], int16: bool, workers: Workers) -> int:
    """Write the remixes of `plans`, those of one target track per job; returns how many
    were written (the others were already there)."""
    by_target: dict[str, list[RemixPlan]] = {}
    for plan in plans:
        by_target.setdefault(plan.target, []).append(plan)
    channels = max(track.channels for track in tracks)
    jobs = [(root, out, target_plans, tracks[0].samplerate, channels, int16)
            for target_plans in by_target.values()]
    written = [0]

    def done(_: int, count: int) -> None:
        written[0] += count

    workers.run(render_target, jobs, [f"remixing track {target!r}" for target in by_target],
                done, "remixes")
    return written[0]


def main(argv: tp.Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with report_errors(PROG, args.verbose):
        musdb = _path(args.musdb, "MUSDB_PATH", "--musdb")
        out = _path(args.out, "AUTOMIX_MUSDB_PATH", "--out")
        automix(musdb, out, settings_from(args), args.workers, args.overwrite)


if __name__ == "__main__":
    main()
