"""Test-set evaluation: the MDX nSDR and the museval (BSSEval v4) metrics.

`evaluate(model, test, test_set, device, folder, compute_sdr)` separates every track of a
test set (`get_test_set`: the MusDB HQ test tracks `<dset.musdb>/test/<track>/` with
`mixture.wav` and one wav per source, or the non-HQ `.stem.mp4` files of `test.nonhq`)
and returns the metrics, as the original did:

- `nsdr`: the MDX 2021 "new SDR", one value per track and source (see `new_sdr`);
- with `compute_sdr`, the museval `sdr`, `sir`, `isr` and `sar`: for each track and
  source, the median over 1 second frames.

For each metric M, `M_<source>` is the mean over tracks and `M_med_<source>` the median
over tracks; `M` and `M_med` average those over the sources.

It needs no solver: the training loop passes its model (with the best state swapped in),
`tools.test_pretrained` a pretrained model or bag. With several distributed workers, each
one separates its share of the tracks and every worker gets all the results. museval is
slow (about 10 s per track on a CPU): its work runs in a pool of `test.workers`
processes. museval and musdb are imported only when needed.
"""
from __future__ import annotations

import logging
import typing as tp
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import tqdm

from .apply import apply_model
from .audio import convert_audio, save_audio
from .errors import ConfigError, DatasetError
from .lean import lean_inference
from .utils import DummyPoolExecutor

logger = logging.getLogger(__name__)

MIXTURE = "mixture"
EPS = 1e-7  # keeps nSDR finite for silent references and perfect estimates
FRAME_SECONDS = 1.0  # museval window and hop
ArrayLike = tp.Union[torch.Tensor, np.ndarray]


# ---------------------------------------------------------------------------------------
# Metrics


def new_sdr(references: torch.Tensor, estimates: torch.Tensor) -> torch.Tensor:
    """MDX nSDR of (B, S, C, T) estimates: `10 log10((Σ ref² + ε) / (Σ (ref - est)² + ε))`.

    The sums run over channels and time, ε = 1e-7. Returns (B, S).
    """
    if references.dim() != 4 or references.shape != estimates.shape:
        raise ValueError(f"new_sdr expects two (B, S, C, T) tensors of the same shape, got "
                         f"{tuple(references.shape)} and {tuple(estimates.shape)}.")
    num = references.pow(2).sum(dim=(2, 3)) + EPS
    den = (references - estimates).pow(2).sum(dim=(2, 3)) + EPS
    return 10 * torch.log10(num / den)


MUSEVAL_METRICS = ("sdr", "sir", "isr", "sar")  # in the order of the history


@dataclass
class TrackScores:
    """Metrics of one track, one value per source (in the model's source order).

    `museval` maps each BSSEval metric (sdr, sir, isr, sar) to its per-source median over
    1 second frames, when museval ran.
    """
    nsdr: list[float]
    museval: dict[str, list[float]] | None = None


def museval_scores(references: np.ndarray, estimates: np.ndarray, win: int,
                   hop: int) -> dict[str, list[float]]:
    """BSSEval v4 metrics of (S, T, C) arrays: for each of sdr, sir, isr, sar, the median
    over frames (NaN frames ignored) per source."""
    import museval  # slow to import, and only needed here

    sdr, isr, sir, sar, _ = museval.metrics.bss_eval(
        references, estimates, window=win, hop=hop, compute_permutation=False,
        framewise_filters=False, bsseval_sources_version=False)  # each (S, frames)
    frames = {"sdr": sdr, "sir": sir, "isr": isr, "sar": sar}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: silent reference
        return {name: [float(value) for value in np.nanmedian(frames[name], axis=1)]
                for name in MUSEVAL_METRICS}


def eval_track(references: ArrayLike, estimates: ArrayLike, win: int, hop: int,
               compute_sdr: bool = True) -> TrackScores:
    """nSDR and, with `compute_sdr`, the museval metrics of (S, C, T) estimates of one
    track. `win` and `hop` are the museval frame length and hop in samples."""
    refs = torch.as_tensor(references).detach().cpu().double()
    ests = torch.as_tensor(estimates).detach().cpu().double()
    if refs.dim() != 3 or refs.shape != ests.shape:
        raise ValueError(f"eval_track expects references and estimates of the same shape "
                         f"(S, C, T), got {tuple(refs.shape)} and {tuple(ests.shape)}.")
    nsdr = new_sdr(refs[None], ests[None])[0].tolist()
    if not compute_sdr:
        return TrackScores(nsdr)
    museval = museval_scores(refs.transpose(1, 2).numpy(), ests.transpose(1, 2).numpy(),
                             win, hop)
    return TrackScores(nsdr, museval)


def summarize(scores: tp.Mapping[str, TrackScores], sources: tp.Sequence[str],
              ) -> dict[str, float]:
    """Aggregate per-track scores over the tracks, for `nsdr` and, when every track has
    them, the museval metrics: `M_SOURCE` is the mean over tracks, `M_med_SOURCE` the
    median; `M` and `M_med` average those over the sources."""
    tables = {"nsdr": [track.nsdr for track in scores.values()]}
    museval = [track.museval for track in scores.values()]
    if museval and all(track is not None for track in museval):
        tables.update({name: [track[name] for track in museval if track is not None]
                       for name in MUSEVAL_METRICS})
    metrics: dict[str, float] = {}
    for name, table in tables.items():
        metrics.update(_mean_and_median(name, np.array(table), sources))
    return metrics


def _mean_and_median(name: str, values: np.ndarray,
                     sources: tp.Sequence[str]) -> dict[str, float]:
    """`values` (tracks, S) -> per-source mean and median over tracks, then the averages
    of both over the sources."""
    means, medians = values.mean(axis=0), np.median(values, axis=0)
    metrics: dict[str, float] = {}
    for source, mean, median in zip(sources, means, medians):
        metrics[f"{name}_{source}"] = float(mean)
        metrics[f"{name}_med_{source}"] = float(median)
    metrics[name] = float(means.mean())
    metrics[f"{name}_med"] = float(medians.mean())
    return metrics


# ---------------------------------------------------------------------------------------
# Test sets


@dataclass
class EvalTrack:
    """A test track as read from disk: mixture (C, T) and references (S, C, T)."""
    name: str
    mixture: torch.Tensor
    references: torch.Tensor
    samplerate: int


def _read_wav(path: Path) -> tuple[torch.Tensor, int]:
    if not path.is_file():
        raise DatasetError(f"Missing test file {path}: a MusDB HQ test track needs "
                           f"{MIXTURE}.wav and one wav per source.")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except RuntimeError as error:  # soundfile.LibsndfileError included
        raise DatasetError(f"Cannot read {path}: {error}.") from None
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


class MusdbHQTestSet:
    """The test tracks of MusDB HQ: `root/test/<track>/{mixture,<source>}.wav`."""

    def __init__(self, root: Path, sources: tp.Sequence[str]) -> None:
        self.folder = root / "test"
        if not self.folder.is_dir():
            raise DatasetError(f"dset.musdb={root}: no test/ folder; dset.musdb must be the "
                               "MusDB HQ folder holding train/ and test/ (or set MUSDB_PATH).")
        self.sources = list(sources)
        self.names = sorted(path.name for path in self.folder.iterdir() if path.is_dir())
        if not self.names:
            raise DatasetError(f"{self.folder} holds no track folder.")

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> EvalTrack:
        name = self.names[index]
        mixture, rate = _read_wav(self.folder / name / f"{MIXTURE}.wav")
        references = []
        for source in self.sources:
            wav, source_rate = _read_wav(self.folder / name / f"{source}.wav")
            if source_rate != rate or wav.shape != mixture.shape:
                raise DatasetError(
                    f"{self.folder / name / source}.wav: {tuple(wav.shape)} at {source_rate} "
                    f"Hz does not match {MIXTURE}.wav, {tuple(mixture.shape)} at {rate} Hz.")
            references.append(wav)
        return EvalTrack(name, mixture, torch.stack(references), rate)


class MusdbStemsTestSet:
    """The test tracks of the original (non-HQ) MusDB, `.stem.mp4` files read by musdb."""

    def __init__(self, root: Path, sources: tp.Sequence[str]) -> None:
        import musdb  # needs stempeg and ffmpeg to decode the stems

        if not (root / "test").is_dir():
            raise DatasetError(f"test.nonhq={root}: no test/ folder of .stem.mp4 files.")
        self.sources = list(sources)
        self.db = musdb.DB(root=str(root), subsets=["test"], is_wav=False)
        if not self.db.tracks:
            raise DatasetError(f"test.nonhq={root}: no .stem.mp4 track in {root / 'test'}.")
        self.names = [track.name for track in self.db.tracks]
        unknown = [source for source in sources if source not in self.db.tracks[0].targets]
        if unknown:
            raise DatasetError(f"test.nonhq: the non-HQ MusDB has no {', '.join(unknown)} "
                               "stem; use the HQ test set (unset test.nonhq).")

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> EvalTrack:
        track = self.db.tracks[index]
        mixture = torch.from_numpy(track.audio.T.astype(np.float32))
        references = torch.stack([torch.from_numpy(track.targets[s].audio.T.astype(np.float32))
                                  for s in self.sources])
        return EvalTrack(track.name, mixture, references, int(track.rate))


EvalSet = tp.Union[MusdbHQTestSet, MusdbStemsTestSet]


def get_test_set(cfg: tp.Any, sources: tp.Sequence[str]) -> EvalSet:
    """MusDB HQ test tracks of `dset.musdb`, or the non-HQ ones when `test.nonhq` is set."""
    nonhq = cfg.test.get("nonhq")
    if nonhq:
        return MusdbStemsTestSet(Path(str(nonhq)).expanduser(), sources)
    if cfg.dset.musdb is None:
        raise ConfigError("dset.musdb is not set: give the MusDB HQ folder (or MUSDB_PATH).")
    return MusdbHQTestSet(Path(str(cfg.dset.musdb)).expanduser(), sources)


# ---------------------------------------------------------------------------------------
# Evaluation


def separate(model: tp.Any, track: EvalTrack, test_cfg: tp.Any,
             device: tp.Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimates and references (S, C, T) on the CPU, at the model's rate and channels."""
    ref = track.mixture.mean(0)  # mono mixture
    mean, std = ref.mean(), ref.std()
    if std == 0 or not torch.isfinite(std):
        std = torch.ones_like(std)  # a silent track: nothing to rescale
    mix = (track.mixture - mean) / std
    mix = convert_audio(mix, track.samplerate, model.samplerate, model.audio_channels)
    with lean_inference():
        estimates = apply_model(model, mix[None].to(device), shifts=test_cfg.shifts,
                                split=test_cfg.split, overlap=test_cfg.overlap)[0]
    estimates = estimates.cpu() * std + mean
    references = convert_audio(track.references, track.samplerate, model.samplerate,
                               model.audio_channels)
    return estimates, references


def save_estimates(folder: Path, sources: tp.Sequence[str], estimates: torch.Tensor,
                   samplerate: int) -> None:
    """Write `folder/<source>.wav` (float32, not rescaled) for each source."""
    for source, estimate in zip(sources, estimates):
        save_audio(estimate, folder / f"{source}.wav", samplerate, clip="none", as_float=True)


def _distributed() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside of a distributed run."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(scores: dict[str, TrackScores]) -> dict[str, TrackScores]:
    """The scores of every worker, sorted by track name."""
    _, world_size = _distributed()
    parts: list[tp.Any] = [scores]
    if world_size > 1:
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, scores)
    merged: dict[str, TrackScores] = {}
    for part in parts:
        merged.update(part)
    return dict(sorted(merged.items()))


def _pool(workers: int) -> tp.Any:
    return ProcessPoolExecutor(workers) if workers > 0 else DummyPoolExecutor()


def _score_tracks(model: tp.Any, test: tp.Any, test_set: EvalSet, device: tp.Any,
                  folder: Path | None, compute_sdr: bool) -> dict[str, TrackScores]:
    """Separate this worker's share of the tracks and score them.

    nSDR is computed here; museval runs in the pool on numpy arrays only: forked children
    must not run torch ops (its OpenMP thread pool can hang after a fork).
    """
    rank, world_size = _distributed()
    win = hop = int(FRAME_SECONDS * model.samplerate)
    workers = int(test.workers) if compute_sdr else 0
    scores: dict[str, TrackScores] = {}
    pending: deque = deque()
    indexes = range(rank, len(test_set), world_size)
    with _pool(workers) as pool:
        for index in tqdm.tqdm(indexes, desc="Test", unit="track", ncols=100,
                               disable=rank != 0, leave=False):
            track = test_set.load(index)
            estimates, references = separate(model, track, test, device)
            if folder is not None:
                save_estimates(folder / track.name, model.sources, estimates,
                               model.samplerate)
            scores[track.name] = eval_track(references, estimates, win, hop, compute_sdr=False)
            if compute_sdr:
                refs, ests = (x.double().transpose(1, 2).numpy() for x in (references, estimates))
                pending.append((track.name, pool.submit(museval_scores, refs, ests, win, hop)))
            while len(pending) > workers:  # bounds the audio waiting for museval
                _collect(scores, *pending.popleft())
        while pending:
            _collect(scores, *pending.popleft())
    return scores


def _collect(scores: dict[str, TrackScores], name: str, future: tp.Any) -> None:
    scores[name].museval = future.result()


def evaluate(model: tp.Any, test: tp.Any, test_set: EvalSet, device: tp.Any = "cpu",
             folder: Path | None = None, compute_sdr: bool = False) -> dict[str, float]:
    """Separate `test_set` with `model` (a model or a bag) and return its metrics.

    `test` is the `test` section of the config (`shifts`, `split`, `overlap`, `workers`,
    `save`); with `test.save`, the estimates go to `folder/wav/TRACK/SOURCE.wav`.
    With `compute_sdr`, the museval metrics are computed too (slow).
    """
    save_folder = None
    if test.save:
        if folder is None:
            raise ConfigError("test.save=true needs an output folder for the separated tracks.")
        save_folder = Path(folder) / "wav"
    training = model.training
    model.eval()
    try:
        scores = _score_tracks(model, test, test_set, device, save_folder, compute_sdr)
    finally:
        model.train(training)
    scores = _gather(scores)
    metrics = summarize(scores, model.sources)
    logger.debug("Test on %d tracks: %s", len(scores),
                 ", ".join(f"{key}={value:.3f}" for key, value in metrics.items()))
    return metrics
