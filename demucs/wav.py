"""Wav datasets: MusDB-HQ and custom folders of tracks, with a cached metadata scan.

A dataset folder holds one sub-folder per track, each with `mixture.wav` and one wav per
source (`drums.wav`, `bass.wav`, ...). Scanning a track reads its length, sample rate and
the mean and std of its (mono) mixture. The scan results are cached as JSON under
`dset.metadata`; the cache remembers each file's size and mtime so that changed tracks are
rescanned, and deleting the cache folder forces a full rescan.

Our cache files are named `demucs_musdb_<sig>.json` and `demucs_wav_<sig>.json`, apart from
the original's `musdb_<sig>.json` and `wav_<sig>.json` (a plain `{track: {...}}` format) so
that both can share a metadata folder; a file that is not in our format is ignored and
rewritten, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import typing as tp
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import julius
import numpy as np
import soundfile as sf
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .audio import convert_audio_channels
from .errors import AudioError, ConfigError, DatasetError
from .utils import atomic_path

MIXTURE = "mixture"
EXT = ".wav"
CACHE_VERSION = 1
CACHE_PREFIX = "demucs_"  # the original writes `musdb_<sig>.json`: never the same file
_BLOCK = 1 << 20  # frames read at once when computing the mixture statistics


@dataclass
class FileStamp:
    """Size and modification time of a file, to notice that it changed."""
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        stat = path.stat()
        return cls(size=stat.st_size, mtime_ns=stat.st_mtime_ns)


@dataclass
class TrackMeta:
    """What the datasets need to know about a track.

    `mean` and `std` are those of the channel-averaged mixture (None when the scan did not
    compute them, i.e. with `normalize=False`). `files` maps file names to their stamps.
    """
    length: int
    samplerate: int
    mean: float | None = None
    std: float | None = None
    files: dict[str, FileStamp] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: tp.Mapping[str, tp.Any]) -> TrackMeta:
        files = {name: FileStamp(**stamp) for name, stamp in data.get("files", {}).items()}
        return cls(length=int(data["length"]), samplerate=int(data["samplerate"]),
                   mean=data.get("mean"), std=data.get("std"), files=files)

    def is_fresh(self, folder: Path, names: tp.Sequence[str], normalize: bool) -> bool:
        """True when the cached entry still describes the files `names` in `folder`."""
        if normalize and (self.mean is None or self.std is None):
            return False
        for name in names:
            path = folder / name
            if name not in self.files or not path.is_file():
                return False
            if FileStamp.of(path) != self.files[name]:
                return False
        return True


Metadata = dict[str, TrackMeta]


# ---------------------------------------------------------------------------------------
# Scanning

def _file_names(sources: tp.Sequence[str], ext: str) -> list[str]:
    """File names of a track: the mixture first, then each source."""
    names = [MIXTURE] + [source for source in sources if source != MIXTURE]
    return [name + ext for name in names]


def _track_folders(path: Path) -> list[str]:
    """Track names (relative paths) of `path`: its non hidden leaf folders.

    Like the original, tracks come in the order of `os.walk` (the file system's order), which
    fixes the index of each example; the cache then keeps that order.
    """
    if not path.is_dir():
        raise DatasetError(f"Dataset folder {path} does not exist or is not a folder; "
                           "check the dataset path in the config (dset.musdb, dset.wav or "
                           "dset.wav2).")
    tracks = []
    for root, folders, _ in os.walk(path, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        if not folders and Path(root) != path:
            tracks.append(Path(root).relative_to(path).as_posix())
    if not tracks:
        raise DatasetError(f"Dataset folder {path} contains no track: expected one folder "
                           f"per track, e.g. {path}/<track>/mixture.wav; "
                           "check the dataset path or fill the folder.")
    return tracks


def _audio_info(path: Path, track: str) -> tp.Any:
    """soundfile's info of `path`, or a DatasetError naming the track and the file."""
    if not path.is_file():
        raise DatasetError(f"Track {track!r}: file {path} is missing; every track needs "
                           "the mixture and each source of dset.sources.")
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as error:
        raise DatasetError(f"Track {track!r}: cannot read {path} ({error}); "
                           "replace it with a valid wav file.") from error
    if info.frames == 0:
        raise DatasetError(f"Track {track!r}: {path} is empty (0 samples); "
                           "replace it or remove the track.")
    return info


def _mixture_stats(path: Path, track: str) -> tuple[float, float]:
    """Mean and (unbiased) std of the channel-averaged mixture, in float64."""
    count, mean, m2 = 0, 0.0, 0.0
    try:
        for block in sf.blocks(str(path), blocksize=_BLOCK, dtype="float32", always_2d=True):
            mono = block.mean(axis=1, dtype=np.float32).astype(np.float64)  # (T,)
            b_count, b_mean = len(mono), float(mono.mean())
            b_m2 = float(((mono - b_mean) ** 2).sum())
            delta = b_mean - mean
            total = count + b_count
            mean += delta * b_count / total
            m2 += b_m2 + delta ** 2 * count * b_count / total
            count = total
    except (RuntimeError, sf.LibsndfileError) as error:
        raise DatasetError(f"Track {track!r}: cannot read {path} ({error}); "
                           "replace it with a valid wav file.") from error
    std = math.sqrt(m2 / (count - 1)) if count > 1 else 0.0
    return mean, std


def _scan_track(folder: Path, track: str, names: tp.Sequence[str],
                normalize: bool) -> TrackMeta:
    """Read the metadata of one track folder, checking that its files agree."""
    mixture = folder / names[0]
    ref = _audio_info(mixture, track)
    for name in names[1:]:
        info = _audio_info(folder / name, track)
        if info.samplerate != ref.samplerate:
            raise DatasetError(
                f"Track {track!r}: {folder / name} has sample rate {info.samplerate} Hz but "
                f"{mixture.name} has {ref.samplerate} Hz; resample the stems to one rate.")
        if info.frames != ref.frames:
            raise DatasetError(
                f"Track {track!r}: {folder / name} has {info.frames} samples but "
                f"{mixture.name} has {ref.frames}; all stems of a track must have the same "
                "length.")
    mean, std = _mixture_stats(mixture, track) if normalize else (None, None)
    files = {name: FileStamp.of(folder / name) for name in names}
    return TrackMeta(length=ref.frames, samplerate=ref.samplerate, mean=mean, std=std,
                     files=files)


def _scan_many(path: Path, tracks: tp.Sequence[str], names: tp.Sequence[str],
               normalize: bool, workers: int | None = None) -> Metadata:
    """Scan `tracks` of `path` with a thread pool and a progress bar."""
    if not tracks:
        return {}
    workers = workers or min(16, (os.cpu_count() or 1) + 4)
    result: Metadata = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_scan_track, path / track, track, names, normalize): track
                   for track in tracks}
        bar = tqdm(as_completed(futures), total=len(futures), desc=f"Scanning {path.name}",
                   unit="track", leave=False)
        for future in bar:
            result[futures[future]] = future.result()
    return result


def build_metadata(path: str | Path, sources: tp.Sequence[str], normalize: bool = True,
                   ext: str = EXT, previous: Metadata | None = None) -> Metadata:
    """Scan every track folder under `path` and return `{track: TrackMeta}`.

    Entries of `previous` whose files did not change (size and mtime) are reused instead of
    being rescanned. Tracks keep the order of `previous` (that of the first scan, so that
    example indices stay stable), new tracks come after them in the file system's order.
    """
    path = Path(path)
    names = _file_names(sources, ext)
    previous = previous or {}
    found = _track_folders(path)
    present = set(found)
    tracks = [track for track in previous if track in present]
    tracks += [track for track in found if track not in previous]
    kept = {track: previous[track] for track in tracks
            if track in previous and previous[track].is_fresh(path / track, names, normalize)}
    scanned = _scan_many(path, [track for track in tracks if track not in kept], names,
                         normalize)
    merged = {**kept, **scanned}
    return {track: merged[track] for track in tracks}


# ---------------------------------------------------------------------------------------
# The JSON cache

def _read_cache(cache_file: Path) -> dict[str, Metadata]:
    """`{folder: metadata}` from a cache file; empty when absent, unusable or in another
    format (another version, the original's `{track: {...}}`, garbage): a full rescan."""
    try:
        data = json.loads(cache_file.read_text())
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        return {folder: {track: TrackMeta.from_dict(meta) for track, meta in tracks.items()}
                for folder, tracks in data["folders"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_cache(cache_file: Path, folders: dict[str, Metadata]) -> None:
    """Write the cache atomically (a temporary file then a rename)."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": CACHE_VERSION,
            "folders": {folder: {track: asdict(meta) for track, meta in metadata.items()}
                        for folder, metadata in folders.items()}}
    with atomic_path(cache_file) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def _update_cache(cache_file: Path, roots: tp.Sequence[Path], sources: tp.Sequence[str],
                  normalize: bool, ext: str) -> list[Metadata]:
    """Metadata of each folder of `roots`, rescanning only new or changed tracks."""
    cached = _read_cache(cache_file)
    result = [build_metadata(root, sources, normalize, ext, cached.get(str(root)))
              for root in roots]
    fresh = dict(zip([str(root) for root in roots], result))
    if fresh != cached:
        _write_cache(cache_file, fresh)
    return result


def _run_on_rank_zero_first(fn: tp.Callable[[], tp.Any]) -> tp.Any:
    """Run `fn` on rank 0, then on the other ranks (when torch.distributed is running)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    if dist.get_rank() != 0:
        dist.barrier()
        return fn()
    result = fn()
    dist.barrier()
    return result


def cached_metadata(cache_file: str | Path, roots: tp.Sequence[str | Path],
                    sources: tp.Sequence[str], normalize: bool = True,
                    ext: str = EXT) -> list[Metadata]:
    """Metadata of each folder in `roots`, through the JSON cache `cache_file`."""
    paths = [Path(root) for root in roots]
    return _run_on_rank_zero_first(
        lambda: _update_cache(Path(cache_file), paths, sources, normalize, ext))


def _cache_file(dset: tp.Any, prefix: str, dataset_path: str | Path) -> Path:
    """`<dset.metadata>/demucs_<prefix>_<sha1(path)[:8]>.json`."""
    sig = hashlib.sha1(str(dataset_path).encode()).hexdigest()[:8]
    return Path(dset.metadata) / f"{CACHE_PREFIX}{prefix}_{sig}.json"


# ---------------------------------------------------------------------------------------
# Datasets

def _as_meta(meta: TrackMeta | tp.Mapping[str, tp.Any]) -> TrackMeta:
    return meta if isinstance(meta, TrackMeta) else TrackMeta.from_dict(meta)


class Wavset(torch.utils.data.Dataset):
    """Examples of `segment` seconds taken every `shift` seconds from a set of tracks.

    Each example is a tensor (S, C, T): the sources in the order of `sources`, `channels`
    channels, resampled to `samplerate` and, with `normalize`, standardised with the
    mixture's mean and std. Without `segment`, each track is one example of its full length.
    """

    def __init__(self, root: str | Path, metadata: tp.Mapping[str, tp.Any],
                 sources: tp.Sequence[str], segment: float | None = None,
                 shift: float | None = None, normalize: bool = True,
                 samplerate: int = 44100, channels: int = 2, ext: str = EXT):
        if segment is not None and segment <= 0:
            raise ConfigError(f"dset.segment must be positive, got {segment}.")
        if shift is not None and shift <= 0:
            raise ConfigError(f"dset.shift must be positive, got {shift}.")
        self.root = Path(root)
        self.metadata = {name: _as_meta(meta) for name, meta in metadata.items()}
        self.sources = list(sources)
        self.segment = segment
        self.shift = shift if shift is not None else segment
        self.normalize = normalize
        self.samplerate = samplerate
        self.channels = channels
        self.ext = ext
        self.tracks = list(self.metadata)
        if normalize:
            self._check_stats()
        self.num_examples = [self._count(meta) for meta in self.metadata.values()]

    def _check_stats(self) -> None:
        for name, meta in self.metadata.items():
            if meta.mean is None or meta.std is None:
                raise DatasetError(f"Track {name!r}: its metadata has no mean and std; "
                                   "scan it with normalize=True.")

    def _count(self, meta: TrackMeta) -> int:
        duration = meta.length / meta.samplerate
        if self.segment is None or duration < self.segment:
            return 1
        assert self.shift is not None
        return int(math.ceil((duration - self.segment) / self.shift) + 1)

    def __len__(self) -> int:
        return sum(self.num_examples)

    def locate(self, index: int) -> tuple[str, int]:
        """(track name, example index within the track) of the global example `index`."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"Example {index} out of range for a dataset of {len(self)}.")
        for name, examples in zip(self.tracks, self.num_examples):
            if index < examples:
                return name, index
            index -= examples
        raise IndexError(index)  # unreachable

    def get_file(self, name: str, source: str) -> Path:
        return self.root / name / (source + self.ext)

    def _window(self, meta: TrackMeta, k: int) -> tuple[int, int]:
        """(offset, number of frames) read for example `k` of a track; -1 frames: all."""
        if self.segment is None:
            return 0, -1
        assert self.shift is not None
        return int(meta.samplerate * self.shift * k), math.ceil(meta.samplerate * self.segment)

    def __getitem__(self, index: int) -> torch.Tensor:
        name, k = self.locate(index)
        meta = self.metadata[name]
        offset, num_frames = self._window(meta, k)
        wavs = [self._read(name, source, offset, num_frames) for source in self.sources]
        example = torch.stack(wavs)  # (S, C, T), the one copy of the data read
        example = julius.resample_frac(example, meta.samplerate, self.samplerate)
        if self.normalize:
            assert meta.mean is not None and meta.std is not None  # checked in __init__
            example = example.sub_(meta.mean).div_(meta.std)
        if self.segment is not None:
            length = int(self.segment * self.samplerate)
            example = example[..., :length]
            if example.shape[-1] < length:
                example = F.pad(example, (0, length - example.shape[-1]))
        return example

    def _read(self, name: str, source: str, offset: int, num_frames: int) -> torch.Tensor:
        """Read `num_frames` frames (all with -1) from `offset`, as `self.channels` channels
        (`audio.convert_audio_channels`): a (C, T) float32 tensor."""
        path = self.get_file(name, source)
        try:
            data = sf.read(str(path), start=offset, frames=num_frames, dtype="float32",
                           always_2d=True)[0]  # (T, C)
        except (RuntimeError, sf.LibsndfileError) as error:
            raise DatasetError(f"Track {name!r}: cannot read {path} ({error}); the dataset "
                               "changed since it was scanned? Run again to rescan.") from error
        try:
            return convert_audio_channels(torch.from_numpy(data).t(), self.channels)
        except AudioError as error:
            raise DatasetError(f"Track {name!r}: {path}: {error}") from None


# ---------------------------------------------------------------------------------------
# Builders from the `dset` config

def musdb_valid_tracks() -> list[str]:
    """The official MusDB validation tracks, as shipped with the `musdb` package (read
    without importing it: its import needs ffmpeg, which training on wav files does not)."""
    import importlib.util

    import yaml
    spec = importlib.util.find_spec("musdb")
    if spec is None or spec.origin is None:
        raise ConfigError("The `musdb` package is not installed: it lists the MusDB "
                          "validation tracks. Install it with `pip install musdb`.")
    setup_path = Path(spec.origin).parent / "configs" / "mus.yaml"
    setup = yaml.safe_load(setup_path.read_text())
    return list(setup["validation_tracks"])


def _dataset_path(dset: tp.Any, key: str) -> Path:
    value = getattr(dset, key, None)
    if value is None:
        raise ConfigError(f"dset.{key} is not set: give the path of the dataset, "
                          f"e.g. dset.{key}=/path/to/dataset.")
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise DatasetError(f"dset.{key}={value}: folder {path} does not exist; set dset.{key} "
                           "to the folder of the dataset.")
    return path


def _kwargs(dset: tp.Any) -> dict[str, tp.Any]:
    return {"samplerate": dset.samplerate, "channels": dset.channels,
            "normalize": dset.normalize}


def _make_sets(train_root: Path, valid_root: Path, train: Metadata, valid: Metadata,
               dset: tp.Any) -> tuple[Wavset, Wavset]:
    """The train set (segments of dset.sources) and the valid set (mixture first)."""
    sources = list(dset.sources)
    cv: dict[str, tp.Any] = {} if dset.full_cv else {"segment": dset.segment,
                                                     "shift": dset.shift}
    train_set = Wavset(train_root, train, sources, segment=dset.segment, shift=dset.shift,
                       **_kwargs(dset))
    valid_set = Wavset(valid_root, valid, [MIXTURE] + sources, **cv, **_kwargs(dset))
    return train_set, valid_set


def get_musdb_wav_datasets(dset: tp.Any) -> tuple[Wavset, Wavset]:
    """Train and valid sets from MusDB-HQ `<dset.musdb>/train`.

    The valid set holds the official validation tracks; with `dset.train_valid` the train
    set holds every track (the validation ones included).
    """
    musdb_path = _dataset_path(dset, "musdb")
    root = musdb_path / "train"
    if not root.is_dir():
        raise DatasetError(f"dset.musdb={dset.musdb}: {root} does not exist; dset.musdb must "
                           "be the MusDB-HQ folder holding train/ and test/.")
    cache = _cache_file(dset, "musdb", dset.musdb)
    metadata, = cached_metadata(cache, [root], list(dset.sources), dset.normalize)
    valid_tracks = set(musdb_valid_tracks())
    valid = {name: meta for name, meta in metadata.items() if name in valid_tracks}
    train = {name: meta for name, meta in metadata.items()
             if dset.train_valid or name not in valid_tracks}
    return _make_sets(root, root, train, valid, dset)


def get_wav_datasets(dset: tp.Any, key: str = "wav") -> tuple[Wavset, Wavset]:
    """Train and valid sets from a custom dataset with train/ and valid/: `dset.wav`, or the
    dataset of another key such as `dset.wav2`, read with the same settings."""
    wav_path = _dataset_path(dset, key)
    value = getattr(dset, key)
    roots = [wav_path / "train", wav_path / "valid"]
    for root in roots:
        if not root.is_dir():
            raise DatasetError(f"dset.{key}={value}: {root} does not exist; a wav dataset "
                               "needs train/ and valid/ folders of tracks.")
    cache = _cache_file(dset, "wav", value)
    train, valid = cached_metadata(cache, roots, list(dset.sources), dset.normalize)
    if dset.train_valid:
        # One root for both folders: track names become `train/NAME` and `valid/NAME`.
        both = {f"{root.name}/{name}": meta
                for root, metadata in zip(roots, [train, valid]) for name, meta in metadata.items()}
        return _make_sets(wav_path, roots[1], both, valid, dset)
    return _make_sets(roots[0], roots[1], train, valid, dset)


# ---------------------------------------------------------------------------------------
# Combining datasets

def random_subset(dataset: tp.Any, count: int, seed: int = 42) -> tp.Any:
    """`count` examples of `dataset` drawn at random (the same ones on every run and every
    worker, from `seed`), in random order; the whole dataset when it has no more."""
    if count >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.Subset(dataset, order[:count].tolist())


def weighted_repeats(base: int, extra: int, weight: float) -> tuple[int, int]:
    """How many times to repeat a set of `base` examples and one of `extra` examples so
    that the latter gives a share `weight` (0 < weight < 1) of their concatenation.

    As upstream v4, the first set is repeated `round(extra / base * (1 / weight - 1))`
    times, at least once; when even once is too many (a share above what `extra` gives
    alone), the second set is repeated instead.
    """
    if not 0 < weight < 1:
        raise ConfigError(f"dset.wav2_weight={weight} must be strictly between 0 and 1.")
    if base == 0 or extra == 0:
        return 1, 1
    base_repeats = round(extra / base * (1 / weight - 1))
    if base_repeats >= 1:
        return base_repeats, 1
    return 1, max(1, round(base * weight / ((1 - weight) * extra)))
