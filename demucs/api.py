"""Python API: separate audio with a pre-trained model loaded once, as upstream Demucs 4.1.

    from demucs.api import Separator, save_audio

    separator = Separator(model="mdx_extra_q", device="cpu", shifts=1)
    origin, stems = separator.separate_audio_file("song.mp3")
    for name, wav in stems.items():
        save_audio(wav, f"{name}.wav", separator.samplerate)

`separate_tensor(wav, sr)` does the same on a `(C, T)` tensor; `update_parameter(...)`
changes any option but the model; `list_models(repo)` lists a repository.
`separate_stream(open_audio_file(path))` separates a file read by blocks and yields the
stems piece by piece as the segments complete (the `demucs` command writes them so: its
memory does not grow with the track). A `callback`
is called before and after each segment with a dict (`segment_offset`, `segment_length`,
`audio_length`, `model_idx_in_bag`, `models`, `shift_idx`, `state` = "start" / "end",
plus the `callback_arg` entries); offsets increase within each pass of a model over the
track (one per random shift where shifts come first, as for v4 Transformers). With
`split=False`, one pair of events covers the whole track (a model with a length limit
still reports its segments within it). Errors are `DemucsError`s: `LoadModelError` (an
alias of `ModelLoadingError`), `LoadAudioError` (of `AudioError`) and `ConfigError`.
`python -m demucs.api` runs the `demucs` command.
"""
from __future__ import annotations

import math
import sys
import typing as tp
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from .apply import TensorChunk, Track, apply_model, apply_model_stream
from .audio import AudioBlocks, convert_audio, convert_audio_channels, read_audio
from .audio import save_audio as save_audio  # re-exported, as upstream's api does
from .backends import load_runners, runnable
from .bag import max_allowed_segment, sub_models
from .errors import AudioError, ConfigError, ModelLoadingError
from .graphs import is_graph_folder
from .options import Callback as Callback
from .options import SeparationOptions, takes_options
from .options import check_device as check_device  # re-exported: their home before options
from .options import default_device as default_device
from .pretrained import DEFAULT_MODEL, get_local_repo, get_model, get_remote_repo
from .utils import DummyPoolExecutor, cpu_has_bf16

LoadAudioError = AudioError
LoadModelError = ModelLoadingError
PathLike = tp.Union[str, Path]
MIN_SECONDS = 0.01  # shorter tracks are refused: nothing to separate


class _NotProvided:
    """Marks the arguments of `update_parameter` that were not given."""

    def __repr__(self) -> str:
        return "NotProvided"


NotProvided: tp.Any = _NotProvided()


class _Job:
    """A segment submitted by `apply_model`: reports start and end around its result."""

    def __init__(self, pool: "_CallbackPool", job: tp.Any, info: tp.Optional[tp.Dict]) -> None:
        self.pool = pool
        self.job = job
        self.info = info

    def result(self) -> tp.Any:
        self.pool.batch_open = False
        if self.info is not None:
            self.pool.report(self.info, "start")
        out = self.job.result()
        if self.info is not None:
            self.pool.report(self.info, "end")
        return out


class _CallbackPool:
    """The pool `apply_model` submits the segments of a split to.

    Runs them in `executor` threads (or when their result is asked, without one) and calls
    `callback` before and after each, from the calling thread, in segment order. A split
    submits all its segments, then collects them: a submit after a result starts a new
    pass (another model of a bag, or another random shift).
    """

    def __init__(self, model: tp.Any, audio_length: int, callback: tp.Optional[Callback],
                 callback_arg: tp.Mapping[str, tp.Any],
                 executor: tp.Optional[ThreadPoolExecutor]) -> None:
        self.models = sub_models(model)
        self.audio_length = audio_length
        self.callback = callback
        self.callback_arg = dict(callback_arg)
        self.executor = executor
        self.batch_open = False
        self.passes: tp.Dict[int, int] = {}  # model index -> passes started
        self.base = 0  # offset of the first segment of the current pass

    def submit(self, func: tp.Callable, *args: tp.Any, **kwargs: tp.Any) -> _Job:
        job: tp.Any
        if self.executor is not None:
            job = self.executor.submit(func, *args, **kwargs)
        else:
            job = DummyPoolExecutor.DummyResult(func, *args, **kwargs)
        info = None
        if self.callback is not None and len(args) >= 2 and isinstance(args[1], TensorChunk):
            info = self._segment_info(args[0], args[1])
        return _Job(self, job, info)

    def _segment_info(self, model: tp.Any, chunk: TensorChunk) -> tp.Dict[str, tp.Any]:
        index = next((i for i, m in enumerate(self.models) if m is model), 0)
        if not self.batch_open:
            self.batch_open = True
            self.passes[index] = self.passes.get(index, 0) + 1
            self.base = chunk.offset
        return {**self.callback_arg, "model_idx_in_bag": index, "models": len(self.models),
                "shift_idx": self.passes[index] - 1, "segment_offset": chunk.offset - self.base,
                "segment_length": chunk.length, "audio_length": self.audio_length}

    def whole(self) -> tp.Dict[str, tp.Any]:
        """The info of an unsplit pass: the whole track at once."""
        return {**self.callback_arg, "model_idx_in_bag": 0, "models": len(self.models),
                "shift_idx": 0, "segment_offset": 0, "segment_length": self.audio_length,
                "audio_length": self.audio_length}

    def report(self, info: tp.Dict[str, tp.Any], state: str) -> None:
        if self.callback is not None:
            self.callback({**info, "state": state})


def existing_audio_file(file: PathLike) -> Path:
    """`file` as a Path; `AudioError` when it is missing, a folder or empty."""
    path = Path(file)
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file.")
    if not path.exists():
        raise AudioError(f"{path} does not exist. If the path contains spaces, surround "
                         "it with quotes.")
    if path.stat().st_size == 0:
        raise AudioError(f"{path} is empty (0 bytes).")
    return path


class Separator:
    """A model loaded once, applied to tensors or files with the options given here.

    Args:
        model: a pre-trained model or bag name, a signature, or a `.th`/`.yaml` path.
        repo: a local repository folder (default: the remote list of released models).
        **options: the fields of `SeparationOptions`, by keyword or by position in
            upstream's order (device, shifts, overlap, split, segment, jobs, progress,
            callback, callback_arg), checked before the model loads; a `segment` longer
            than the model allows is refused.
    """

    @takes_options(SeparationOptions)
    def __init__(self, model: str = DEFAULT_MODEL, repo: tp.Optional[PathLike] = None,
                 *by_position: tp.Any, **options: tp.Any) -> None:
        # `takes_options` gives the options by keyword: `by_position` is always empty.
        self._name = model
        self._repo = repo
        self._options = SeparationOptions(**options)
        self._graphs = is_graph_folder(model)  # a folder of `python -m tools.export_onnx`
        self._runnables: tp.Dict[tp.Tuple[str, tp.Optional[float], str], tp.Any] = {}
        self._model: tp.Any = (self.prepare() if self._graphs
                               else get_model(model, repo=repo))
        self._model.cpu()
        self._model.eval()
        self._max_segment = max_allowed_segment(self._model)
        self._check_segment(self._options.segment)

    @takes_options(SeparationOptions, default=NotProvided)
    def update_parameter(self, *by_position: tp.Any, **options: tp.Any) -> None:
        """Change the options given (as in the constructor), checked first: a bad value
        raises `ConfigError` and changes nothing."""
        given = {key: value for key, value in options.items() if value is not NotProvided}
        changed = replace(self._options, **given)
        self._check_segment(changed.segment)
        if self._graphs and changed.backend == "torch":
            raise ConfigError(f"{self._name} is a folder of ONNX graphs: separate with "
                              "backend onnxruntime or openvino.")
        self._options = changed

    def prepare(self) -> tp.Any:
        """What `apply_model` runs with the `backend` option: the model, or its runners
        (exported once per model and segment, see `demucs.backends`; a folder of graphs
        loads in the runtime), kept. Made at the first separation if not before."""
        backend = self._options.backend
        if self._graphs and backend == "torch":
            raise ConfigError(f"{self._name} is a folder of ONNX graphs: separate with "
                              "backend onnxruntime or openvino.")
        segment = None if backend == "torch" or self._graphs else self._options.segment
        precision = self._options.precision
        key = (backend, segment, precision)
        if key not in self._runnables:
            if precision == "bf16" and cpu_has_bf16() is False \
                    and tp.cast(torch.device, self._options.device).type == "cpu":
                print("bf16 is emulated on this CPU (no avx512_bf16 or amx_bf16 in "
                      "/proc/cpuinfo): expect it slower than float32.", file=sys.stderr)
            self._runnables[key] = (
                load_runners(Path(self._name), backend, precision) if self._graphs
                else runnable(self._model, backend, segment, precision=precision))
        return self._runnables[key]

    def _check_segment(self, segment: tp.Optional[float]) -> None:
        if segment is not None and segment > self._max_segment:
            raise ConfigError(
                f"segment {segment:g} s is longer than the model {self._name} allows: a "
                f"Transformer model cannot use segments longer than it was trained on; the "
                f"maximum segment is {self._max_segment:g} s.")

    # Separation
    def separate_tensor(self, wav: torch.Tensor, sr: tp.Optional[int] = None
                        ) -> tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]:
        """Separate `wav` `(C, T)` (or `(T,)`), at `sr` Hz (default: the model's rate).

        Returns the mixture as separated (at the model's rate and channel count) and
        `{source: (C, T) tensor}` in the mixture's scale, both on the CPU.
        """
        wav = self._prepare(wav, sr)
        mean, std = mix_stats(wav)
        sources = self._apply((wav - mean) / std)
        return wav, dict(zip(self._model.sources, sources * std + mean))

    def separate_stream(self, wav: Track
                        ) -> tp.Iterator[tp.Tuple[int, tp.Dict[str, torch.Tensor]]]:
        """Separate `wav`, `(C, T)` at the model's rate and channel count (a tensor, or a
        `Track` read by slices such as `open_audio_file`'s), piece by piece: yields
        `(start, {source: (C, n) tensor})` for consecutive ranges `[start, start + n)`, in
        the mixture's scale, each as soon as the segments over it are done.

        The numbers of `separate_tensor`, except where the model draws from Python's
        `random` itself (an HTDemucs) with random shifts in a bag or `shifts` >= 2: other
        shifts are drawn then (see `apply.apply_model_stream`).
        """
        mean, std = mix_stats(wav)
        start = 0
        for piece in self._apply_stream(_Normalised(wav, mean, std)):
            stems = piece[0].cpu() * std + mean  # (S, C, n)
            length = stems.shape[-1]
            yield start, dict(zip(self._model.sources, stems))
            start += length
            del piece, stems  # not held while the next segment runs

    def separate_audio_file(self, file: PathLike
                            ) -> tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]:
        """Read `file` (any format ffmpeg reads) and separate it, see `separate_tensor`."""
        return self.separate_tensor(self.load_audio(file))

    def load_audio(self, file: PathLike) -> torch.Tensor:
        """`file` as `(C, T)` at the model's rate and channel count; `AudioError` naming
        the file when it is missing, a folder, empty, unreadable or too short."""
        path = existing_audio_file(file)
        wav = read_audio(path, self.samplerate, self.audio_channels)
        self._check_length(wav, str(path))
        return wav

    def open_audio_file(self, file: PathLike) -> AudioBlocks:
        """`file` to be read by blocks (`audio.AudioBlocks`) at the model's rate and channel
        count, for `separate_stream`; the errors of `load_audio`. Close it when done."""
        path = existing_audio_file(file)
        blocks = AudioBlocks(path, self.samplerate, self.audio_channels)
        try:
            self._check_length(blocks, str(path))
        except AudioError:
            blocks.close()
            raise
        return blocks

    def _prepare(self, wav: torch.Tensor, sr: tp.Optional[int]) -> torch.Tensor:
        if not isinstance(wav, torch.Tensor) or wav.dim() not in (1, 2):
            shape = tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
            raise AudioError(f"Expected a (channels, time) tensor, got {shape}.")
        wav = wav.detach().cpu().float()
        wav = wav[None] if wav.dim() == 1 else wav
        if sr is not None and sr != self.samplerate:
            wav = convert_audio(wav, sr, self.samplerate, self.audio_channels)
        else:
            wav = convert_audio_channels(wav, self.audio_channels)
        self._check_length(wav, "the audio")
        return wav

    def _check_length(self, wav: Track, what: str) -> None:
        minimum = max(2, math.ceil(MIN_SECONDS * self.samplerate))
        if wav.shape[-1] < minimum:
            raise AudioError(f"{what} is too short: {wav.shape[-1]} samples at "
                             f"{self.samplerate} Hz, at least {minimum} ({MIN_SECONDS:g} s) "
                             "are needed.")

    @contextmanager
    def _running(self, length: int) -> tp.Iterator[tp.Tuple[tp.Any, "_CallbackPool"]]:
        """The model (or its runner) and the callback pool of one separation of `length`
        samples, with the `jobs` executor shut down and the whole-track callbacks of
        `split=False` sent around it."""
        opts = self._options
        device = tp.cast(torch.device, opts.device)  # the check made it a torch.device
        executor = None
        if opts.jobs > 0 and device.type == "cpu":
            executor = ThreadPoolExecutor(opts.jobs)
        model = self.prepare()
        pool = _CallbackPool(model, length, opts.callback, opts.callback_arg or {}, executor)
        if not opts.split:
            pool.report(pool.whole(), "start")
        try:
            yield model, pool
        finally:
            if executor is not None:
                executor.shutdown(cancel_futures=True)
        if not opts.split:
            pool.report(pool.whole(), "end")

    def _apply(self, norm: torch.Tensor) -> torch.Tensor:
        """`apply_model` on the normalised `(C, T)` mix, `(S, C, T)` on the CPU."""
        opts = self._options
        with self._running(norm.shape[-1]) as (model, pool):
            out = apply_model(model, norm[None], shifts=opts.shifts, split=opts.split,
                              overlap=opts.overlap, progress=opts.progress,
                              device=opts.device, pool=pool, segment=opts.segment)[0]
        return out.cpu()

    def _apply_stream(self, norm: Track) -> tp.Iterator[torch.Tensor]:
        """`apply_model_stream` on the normalised `(1, C, T)` mix, as `_apply` runs it."""
        opts = self._options
        with self._running(norm.shape[-1]) as (model, pool):
            yield from apply_model_stream(model, norm, shifts=opts.shifts,
                                          split=opts.split, overlap=opts.overlap,
                                          progress=opts.progress, device=opts.device,
                                          pool=pool, segment=opts.segment)

    # Properties
    @property
    def model(self) -> tp.Any:
        return self._model

    @property
    def options(self) -> SeparationOptions:
        """The options in use (change them with `update_parameter`)."""
        return self._options

    @property
    def samplerate(self) -> int:
        return int(self._model.samplerate)

    @property
    def audio_channels(self) -> int:
        return int(self._model.audio_channels)

    @property
    def sources(self) -> tp.List[str]:
        return list(self._model.sources)

    @property
    def max_allowed_segment(self) -> float:
        """The longest `segment` this model accepts (infinite when unlimited)."""
        return self._max_segment


STATS_BLOCK = 2 ** 20  # samples per block of the mono mix


def mix_stats(wav: Track) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the mono mix of `wav` `(C, T)`, by which upstream
    normalises a track (a std of 1 for a silent or constant one). A `Track` is read by
    blocks; its mono mix (4 bytes a sample) is made whole, for the same float sums."""
    if isinstance(wav, torch.Tensor):
        ref = wav.mean(0)
    else:
        length = wav.shape[-1]
        ref = torch.empty(length)
        for start in range(0, length, STATS_BLOCK):
            end = min(length, start + STATS_BLOCK)
            ref[start:end] = wav[..., start:end].mean(0)
    mean, std = ref.mean(), ref.std()
    if std == 0 or not torch.isfinite(std):
        std = torch.ones_like(std)  # a silent (or constant) track: nothing to rescale
    return mean, std


class _Normalised:
    """`(wav - mean) / std` as a `(1, C, T)` `Track`, computed block by block as read."""

    def __init__(self, wav: Track, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.wav, self.mean, self.std = wav, mean, std
        self.shape = (1, *wav.shape)
        self.device = wav.device

    def __getitem__(self, index: tp.Any) -> torch.Tensor:
        return ((self.wav[index] - self.mean) / self.std)[None]


def list_models(repo: tp.Optional[PathLike] = None) -> tp.Dict[str, tp.Dict[str, str]]:
    """`{"single": {signature: path or URL}, "bag": {name: yaml path}}` of the local
    repository `repo` (a folder) or of the remote list of released models."""
    any_repo = get_local_repo(repo) if repo is not None else get_remote_repo()
    return {"single": any_repo.model_repo.list_model(), "bag": any_repo.bag_repo.list_model()}


if __name__ == "__main__":
    from .separate import main
    main(prog="demucs.api")
