"""Benchmark of the automix analysis: quality on tracks of known tempo, key and downbeat,
memory, and the throughput of `tools.automix`.

    python bench/bench_automix.py --tracks 32 --seconds 30 [-v]
    python bench/bench_automix.py --no-quality --memory --throughput

Quality: `tools.synth_dataset` songs with a random tempo (60 to 180 BPM), drum pattern,
key and start (the first downbeat anywhere in the first bar) are analysed, then the same
songs with silent drums; each report gives the share of tempos within 4 %, the tempo
confusions by ratio (2:1, 3:2, 4:3, both ways), the share of exact keys (the major key of
the scale) and of first downbeats within 50 ms (`-v`: one line per track).

`--memory` analyses a four-minute track in a fresh process and reports its peak memory
above the imports. `--throughput` runs the analysis and the remixing of `tools.automix`
with 1 and 2 workers and reports analysis seconds per minute of audio and remixes per
minute, extrapolated to a MusDB-sized run (100 tracks of 4 minutes, 6 remixes each); with
one worker, also from the CPU time, which does not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import tempfile
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


from demucs.utils import peak_memory
from tools import automix, automix_analysis
from tools.automix_analysis import Settings, plan_all
from tools.automix_workers import Workers
from tools.synth_dataset import PATTERNS, Song, generate_dataset, synth_song, write_track

RATIOS = {"2:1": 2., "3:2": 1.5, "4:3": 4 / 3}
TEMPO_TOLERANCE = 0.04
DOWNBEAT_TOLERANCE = 0.05  # seconds
STYLES: list[str | None] = [None, *PATTERNS]
MUSDB_TRACKS, MUSDB_MINUTES, MUSDB_MIXES = 100, 4., 6  # the run to extrapolate to


@dataclass
class Truth:
    name: str
    tempo: float
    key: int
    downbeat: float
    style: str


def make_song(folder: Path, index: int, seconds: float, samplerate: int,
              rng: np.random.Generator, drums: bool = True) -> Truth:
    """Write a random song of known tempo, key and first downbeat into `folder` (with
    silent drums unless `drums`)."""
    tempo = float(np.exp(rng.uniform(np.log(60.), np.log(180.))))
    style = STYLES[index % len(STYLES)]
    offset = float(rng.uniform(0., 4 * 60 / tempo))
    if offset < 2 * DOWNBEAT_TOLERANCE:  # a bar starting right before the track starts
        offset = 0.
    song: Song
    song, stems = synth_song(1000 + index, seconds, samplerate, tempo=tempo, pattern=style,
                             offset=offset)
    if not drums:
        stems["drums"] = np.zeros_like(stems["drums"])
    write_track(folder, stems, samplerate)
    return Truth(folder.name, song.tempo, song.key, song.first_downbeat, style or "groove")


def tempo_class(estimate: float, truth: float) -> str:
    """`ok` within 4 %, else the confusion ratio (`2:1`, `3:2`, `4:3`), else `other`."""
    ratio = estimate / truth if truth > 0 else 0.
    for name, value in {"ok": 1., **RATIOS}.items():
        for candidate in {value, 1 / value}:
            if ratio > 0 and abs(ratio / candidate - 1) <= TEMPO_TOLERANCE:
                return name
    return "other"


def bench_quality(tracks: int, seconds: float, samplerate: int, seed: int, drums: bool,
                  verbose: bool) -> None:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="bench_automix_") as tmp:
        root = Path(tmp)
        truths = [make_song(root / f"song_{k:03d}", k, seconds, samplerate, rng, drums)
                  for k in range(tracks)]
        begin = time.perf_counter()
        analyses = [automix_analysis.analyse_track(root, truth.name, automix.SOURCES)
                    for truth in truths]
        elapsed = time.perf_counter() - begin
    classes: dict[str, int] = {}
    keys = downbeats = 0
    for truth, analysis in zip(truths, analyses, strict=True):
        label = tempo_class(analysis.tempo, truth.tempo)
        classes[label] = classes.get(label, 0) + 1
        keys += analysis.key == truth.key
        found = analysis.downbeats()[0]
        downbeats += abs(found - truth.downbeat) <= DOWNBEAT_TOLERANCE
        if verbose:
            print(f"{truth.name} {truth.style:>10} tempo {truth.tempo:6.1f} -> "
                  f"{analysis.tempo:6.1f} ({label}), key {truth.key:2d} -> {analysis.key:2d}, "
                  f"downbeat {truth.downbeat:5.2f} -> {found:5.2f}")
    confusions = ", ".join(f"{name} {classes.get(name, 0)}" for name in [*RATIOS, "other"])
    print(f"analysis of {tracks} synthetic tracks of {seconds:g} s"
          f"{'' if drums else ' with silent drums'}: tempo within 4% "
          f"{classes.get('ok', 0) / tracks:.0%} (confusions: {confusions}), exact key "
          f"{keys / tracks:.0%}, first downbeat within 50 ms {downbeats / tracks:.0%}; "
          f"{elapsed / (tracks * seconds / 60):.2f} s per minute of audio")


def peak_mb() -> float:
    """Peak resident memory of this process in MiB (Linux: VmHWM, which unlike ru_maxrss
    does not count what a spawned process's parent held before the exec)."""
    peak = peak_memory(torch.device("cpu"))
    return float("nan") if peak is None else peak * 1024


def _analyse_one(root: Path, name: str, results: tp.Any) -> None:
    """In a fresh process: the peak memory of the analysis of one track above imports."""
    before = peak_mb()
    begin = time.perf_counter()
    automix_analysis.analyse_track(root, name, automix.SOURCES)
    results.put((before, peak_mb(), time.perf_counter() - begin))


def bench_memory(minutes: float, samplerate: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_automix_") as tmp:
        write_track(Path(tmp) / "long", synth_song(0, 60 * minutes, samplerate)[1], samplerate)
        audio = sum(f.stat().st_size for f in (Path(tmp) / "long").glob("*.wav")) / 2 ** 20
        before, after, seconds = _in_process(_analyse_one, Path(tmp), "long")
    print(f"analysis memory of a {minutes:g} min track ({samplerate} Hz, stems {audio:.0f} MB "
          f"as 16-bit wav): peak {after:.0f} MB, {after - before:.0f} MB above the imports "
          f"({before:.0f} MB); {seconds:.1f} s")


def _in_process(fn: tp.Callable[..., None], *args: tp.Any) -> tp.Any:
    """fn(*args, queue) in a spawned process; returns what it put in the queue."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=fn, args=(*args, results))
    process.start()
    value = results.get()
    process.join()
    return value


@dataclass
class Run:
    """What one `tools.automix` run measured (seconds; CPU: this process and the processes
    it waited for, i.e. all of it when there are no workers)."""
    start: float  # workers' start
    analysis: float
    analysis_cpu: float
    render: float
    render_cpu: float
    remixes: int
    peak_mb: float  # this process and its workers together


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn: tp.Callable[[], tp.Any]) -> tuple[float, float, tp.Any]:
    wall, cpu = time.perf_counter(), _cpu()
    result = fn()
    return time.perf_counter() - wall, _cpu() - cpu, result


def _run(musdb: Path, out: Path, workers: int, mixes: int, results: tp.Any) -> None:
    """In a fresh process: the analysis and the remixes of `tools.automix` with
    `workers`, timed, and the peak memory of this process and of its workers."""
    root = musdb / "train"
    settings = Settings(sources=list(automix.SOURCES), mixes_per_track=mixes, max_tempo=60,
                        max_pitch=6)
    splits = automix.split_names(root, automix.track_names(root), settings.sources)
    names = [name for members in splits.values() for name in members]
    with Workers(workers) as pool:
        start, _, _ = _timed(lambda: pool.run(time.time, [()] * workers, ["starting"] * workers,
                                              lambda *_: None, "start"))
        analysis, analysis_cpu, (tracks, _) = _timed(
            lambda: automix.analyse_all(root, out, names, settings.sources, pool))
        plans = plan_all(tracks, settings, splits["valid"])
        automix.prepare_output(out, plans)
        render, render_cpu, _ = _timed(
            lambda: automix.render_all(root, out, plans, tracks, False, pool))
        peaks: list[float] = []  # one job per worker: each reports its own peak
        pool.run(peak_mb, [()] * workers, ["measuring"] * workers,
                 lambda _, peak: peaks.append(peak), "peaks")
    memory = peak_mb() + (sum(peaks) if workers > 1 else 0.)
    results.put(Run(start, analysis, analysis_cpu, render, render_cpu, len(plans), memory))


def _musdb_minutes(analysis_per_minute: float, seconds_per_remix: float) -> float:
    """Minutes of a MusDB-sized run at these rates."""
    return MUSDB_TRACKS * (MUSDB_MINUTES * analysis_per_minute +
                           MUSDB_MIXES * seconds_per_remix) / 60


def bench_throughput(tracks: int, seconds: float, samplerate: int, mixes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_automix_") as tmp:
        musdb = generate_dataset(Path(tmp) / "musdb", tracks=tracks, seconds=seconds,
                                 samplerate=samplerate, test_tracks=0,
                                 valid_tracks=tracks // 2)
        minutes = tracks * seconds / 60
        for workers in (1, 2):
            out = Path(tmp) / f"out{workers}"
            run: Run = _in_process(_run, musdb, out, workers, mixes)
            shutil.rmtree(out)
            print(f"automix with {workers} worker(s), {tracks} tracks of {seconds:g} s: "
                  f"analysis {run.analysis / minutes:.2f} s per minute of audio, "
                  f"{run.remixes / run.render * 60:.1f} remixes of 30 s per minute, peak "
                  f"memory {run.peak_mb:.0f} MB (workers' start {run.start:.1f} s); a "
                  f"MusDB-sized run ({MUSDB_TRACKS} x {MUSDB_MINUTES:g} min, {MUSDB_MIXES} "
                  f"remixes each): about "
                  f"{_musdb_minutes(run.analysis / minutes, run.render / run.remixes):.0f} min")
            if workers == 1:  # all the work is in this process: CPU time is load-free
                cpu = _musdb_minutes(run.analysis_cpu / minutes, run.render_cpu / run.remixes)
                print(f"  CPU time: analysis {run.analysis_cpu / minutes:.2f} s per minute of "
                      f"audio, {run.render_cpu / run.remixes:.2f} s per remix; a MusDB-sized "
                      f"run on 2 idle cores: about {cpu / 2:.0f} min")


def main(argv: tp.Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=30.)
    parser.add_argument("--samplerate", type=int, default=44100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per track")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of the analysis of a 4 min track")
    parser.add_argument("--throughput", action="store_true",
                        help="tools.automix with 1 and 2 workers")
    parser.add_argument("--run-tracks", type=int, default=8, help="tracks of --throughput")
    parser.add_argument("--run-seconds", type=float, default=60.,
                        help="track length of --throughput")
    parser.add_argument("--mixes", type=int, default=2, help="remixes per track, --throughput")
    parser.add_argument("--no-quality", action="store_true", help="skip the quality part")
    args = parser.parse_args(argv)
    if not args.no_quality:
        for drums in (True, False):
            bench_quality(args.tracks, args.seconds, args.samplerate, args.seed, drums,
                          args.verbose)
    if args.memory:
        bench_memory(MUSDB_MINUTES, args.samplerate)
    if args.throughput:
        bench_throughput(args.run_tracks, args.run_seconds, args.samplerate, args.mixes)


if __name__ == "__main__":
    main()
