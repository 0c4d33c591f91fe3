"""Benchmark of the dataset pipeline: metadata scan time and loader throughput.

    python bench/bench_dataset.py --tracks 32 --seconds 30 --num-workers 4

Generates a synthetic MusDB-HQ-shaped dataset (or uses `--data`), then reports:
- the metadata scan time with no cache (cold), with the cache (warm) and after one track
  changed;
- examples per second from a torch DataLoader over the train set (segment and shift of the
  base config by default), with `--num-workers` workers, optionally through the repitch
  augmentation (`--repitch PROBA`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import typing as tp
from pathlib import Path

import torch
from omegaconf import OmegaConf


from demucs.repitch import wrap_repitch
from demucs.wav import get_musdb_wav_datasets
from tools.synth_dataset import SOURCES, generate_dataset


def timed(fn: tp.Callable[[], tp.Any]) -> tuple[float, tp.Any]:
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


def bench_scan(dset: tp.Any) -> tp.Any:
    """Print the cold, warm and one-changed-track scan times; return the datasets."""
    shutil.rmtree(dset.metadata, ignore_errors=True)
    cold, _ = timed(lambda: get_musdb_wav_datasets(dset))
    warm, sets = timed(lambda: get_musdb_wav_datasets(dset))
    track = sets[0].get_file(sets[0].tracks[0], "mixture")
    track.touch()  # a new mtime: this track is rescanned
    changed, sets = timed(lambda: get_musdb_wav_datasets(dset))
    n_tracks = len(sets[0].tracks) + len(sets[1].tracks)
    print(f"metadata scan of {n_tracks} tracks: cold {cold:.3f}s "
          f"({n_tracks / cold:.1f} tracks/s), warm (cache) {warm:.3f}s, "
          f"one changed track {changed:.3f}s")
    return sets


def bench_loader(dataset: tp.Any, batch_size: int, num_workers: int, batches: int) -> None:
    """Print the examples per second of a shuffled DataLoader over `dataset`."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=num_workers, drop_last=True)
    iterator = iter(loader)
    next(iterator)  # start the workers
    count = 0
    begin = time.perf_counter()
    for _ in range(batches):
        try:
            count += len(next(iterator))
        except StopIteration:
            break
    elapsed = time.perf_counter() - begin
    print(f"loader: {count} examples of shape {tuple(dataset[0].shape)} in {elapsed:.2f}s with "
          f"{num_workers} workers: {count / elapsed:.1f} examples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="an existing MusDB-HQ-shaped folder")
    parser.add_argument("--tracks", type=int, default=32, help="synthetic train tracks")
    parser.add_argument("--seconds", type=float, default=30.)
    parser.add_argument("--samplerate", type=int, default=44100)
    parser.add_argument("--segment", type=float, default=11.)
    parser.add_argument("--shift", type=float, default=1.)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repitch", type=float, default=0., help="repitch probability")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_dataset_") as tmp:
        data = args.data
        if data is None:
            gen, data = timed(lambda: generate_dataset(Path(tmp) / "synth", args.tracks,
                                                       args.seconds, args.samplerate,
                                                       test_tracks=0))
            print(f"generated {args.tracks} tracks of {args.seconds}s in {gen:.2f}s")
        dset = OmegaConf.create({
            "musdb": str(data), "metadata": str(Path(tmp) / "metadata"),
            "sources": list(SOURCES), "segment": args.segment, "shift": args.shift,
            "samplerate": args.samplerate, "channels": 2, "normalize": True,
            "train_valid": False, "full_cv": True})
        train_set, _ = bench_scan(dset)
        repitch = OmegaConf.create({"proba": args.repitch, "max_tempo": 12})
        train_set = wrap_repitch(train_set, repitch, SOURCES, args.samplerate)
        bench_loader(train_set, args.batch_size, args.num_workers, args.batches)


if __name__ == "__main__":
    main()
