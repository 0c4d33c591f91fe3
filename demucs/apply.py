"""Inference: chunked application of a model or a bag of models, random shifts.

`apply_model` handles long inputs by cutting them into overlapping segments of
`model.segment` seconds whose outputs are cross-faded with a triangular window, and
averages over random time shifts of the input (the "shift trick"), as the original
Demucs v3 does. Chunks read real context from the neighbouring audio (`TensorChunk`)
when a model needs more samples than the chunk holds.

Some models only run on inputs up to a length: an HTDemucs trained with
`use_train_segment` takes at most its training length (`max_allowed_segment`, seconds;
a bag's limit is the smallest of its members', infinite without any). Such a model is
never given a longer chunk: the input is split into chunks of at most that length even
with `split=False`, and random shifts are drawn on the whole input before splitting (as
Demucs v4 does), while models without a limit keep the v3 order (split, then shifts
within each chunk).

Streaming: `apply_model_stream` yields the output as consecutive pieces `(B, S, C, n)`,
each final once the chunks over it are done, so that only the cross-fade's tail (one
segment) is held, not a track-long output; the models of a bag and the passes of a
shifts-first model run side by side, chunk by chunk. The input can be any `Track` (a
tensor, or an object read by slices, such as `audio.AudioBlocks` over a decoded file): it
is read chunk by chunk, never copied whole. The stream gives the numbers of `apply_model`
bit for bit (the same additions and divisions, in the same order, per sample) whenever
the random shifts are drawn in the same order: the stream draws them all when it is
made, in the order `apply_model` draws them as it goes (models of a bag in turn, the
segments of a split in turn). That order is the same unless a model draws from Python's
`random` itself during its forward, as an HTDemucs does (its positional embedding's
shift, even when 0): then, with random shifts in a bag of them, with `shifts` >= 2 on
one of them, or on one without a length limit, the stream draws as many shifts, equally
random, but not the ones `apply_model` draws with the same seed. `apply_model` itself runs
the models and passes one after another, as the original does (a track-long output).
"""
from __future__ import annotations

import collections
import math
import random
import typing as tp
from concurrent.futures import ThreadPoolExecutor

import torch
import tqdm
from torch.nn import functional as F

from .bag import BagOfModels as BagOfModels  # its home before demucs.bag: kept importable
from .bag import max_allowed_segment as max_allowed_segment
from .lean import lean_inference
from .utils import DummyPoolExecutor, center_trim, trim_heap


class Track(tp.Protocol):
    """What `apply_model` reads: a tensor, or an object with a `shape` (..., C, T), a
    `device` and slices `[..., start:end]` (0 <= start <= end <= T) returning tensors."""

    @property
    def shape(self) -> tp.Sequence[int]: ...

    @property
    def device(self) -> torch.device: ...

    def __getitem__(self, index: tp.Any) -> torch.Tensor: ...


class TensorChunk:
    """A view `[offset, offset + length)` of the last axis of a tensor (or a `Track`).

    `padded(target)` returns the chunk extended symmetrically to `target` samples,
    reading real samples of the underlying tensor where they exist and zeros beyond it.
    """

    def __init__(self, tensor: tp.Union[Track, "TensorChunk"], offset: int = 0,
                 length: tp.Optional[int] = None):
        total_length = tensor.shape[-1]
        if not 0 <= offset < total_length:
            raise ValueError(f"Chunk offset {offset} is outside [0, {total_length}).")
        if length is None:
            length = total_length - offset
        else:
            length = min(total_length - offset, length)
        self.tensor: Track
        self.offset: int
        if isinstance(tensor, TensorChunk):
            self.tensor = tensor.tensor
            self.offset = offset + tensor.offset
        else:
            self.tensor = tensor
            self.offset = offset
        self.length: int = length
        self.device: torch.device = tensor.device

    @property
    def shape(self) -> tp.List[int]:
        shape = list(self.tensor.shape)
        shape[-1] = self.length
        return shape

    def padded(self, target_length: int) -> torch.Tensor:
        delta = target_length - self.length
        if delta < 0:
            raise ValueError(f"Cannot pad a chunk of {self.length} samples to {target_length}.")
        return self.read(-(delta // 2), target_length - delta // 2)

    def read(self, start: int, end: int) -> torch.Tensor:
        """Samples `[start, end)` relative to the chunk's offset: those of the underlying
        tensor where they exist, zeros beyond it."""
        total_length = self.tensor.shape[-1]
        start, end = start + self.offset, end + self.offset
        correct_start = min(max(0, start), total_length)
        correct_end = max(correct_start, min(total_length, end))
        if correct_end == correct_start:  # nothing real: zeros of the tensor's dtype
            return F.pad(self.tensor[..., 0:0], (0, end - start))
        return F.pad(self.tensor[..., correct_start:correct_end],
                     (correct_start - start, end - correct_end))

    def __getitem__(self, index: tp.Any) -> torch.Tensor:
        """`chunk[..., start:end]`, a `Track` itself (zeros beyond the underlying tensor)."""
        start, end = _slice_bounds(index, self.length)
        return self.read(start, end)


def _slice_bounds(index: tp.Any, length: int) -> tp.Tuple[int, int]:
    """`(start, end)` of an index `[..., start:end]` (no step) on an axis of `length`."""
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
            and isinstance(index[1], slice) and index[1].step in (None, 1)):
        raise TypeError(f"A track is read by slices [..., start:end], not {index!r}.")
    start, end, _ = index[1].indices(length)
    return start, max(start, end)


class _Extended:
    """`mix` extended by `pad` samples on each side, read lazily: the real samples around
    a chunk where they exist, zeros beyond the track (what `TensorChunk.padded` gives,
    without a copy of a track-long input)."""

    def __init__(self, mix: MixLike, pad: int) -> None:
        self.chunk = tensor_chunk(mix)
        self.pad = pad
        self.shape = list(mix.shape)
        self.shape[-1] += 2 * pad
        self.device = mix.device

    def __getitem__(self, index: tp.Any) -> torch.Tensor:
        start, end = _slice_bounds(index, self.shape[-1])
        return self.chunk.read(start - self.pad, end - self.pad)


def tensor_chunk(tensor_or_chunk: tp.Union[Track, TensorChunk]) -> TensorChunk:
    if isinstance(tensor_or_chunk, TensorChunk):
        return tensor_or_chunk
    return TensorChunk(tensor_or_chunk)


MixLike = tp.Union[torch.Tensor, TensorChunk, Track]
Stream = tp.Iterator[torch.Tensor]  # consecutive (B, S, C, n) pieces of the output


def apply_model(model: tp.Any, mix: MixLike, shifts: int = 1, split: bool = True,
                overlap: float = 0.25, transition_power: float = 1.,
                progress: bool = False, device: tp.Any = None, num_workers: int = 0,
                pool: tp.Any = None, segment: tp.Optional[float] = None) -> torch.Tensor:
    """Apply `model` (or a `BagOfModels`) to `mix` (B, C, T) and return (B, S, C, T).

    Args:
        shifts: number of random shifts (up to 0.5 s) of the input to average; the
            shifts are drawn with Python's `random` module.
        split: process the input in segments of `model.segment` seconds.
        overlap: overlap between segments, as a fraction of the segment.
        transition_power: power of the triangular cross-fade window (>= 1).
        progress: show a progress bar over the segments.
        device: where to run the model (default: the device of `mix`); the output
            stays on the device of `mix`.
        num_workers: threads used for segments on CPU.
        segment: length of the chunks in seconds (default: each model's `segment`); a
            ValueError when a model accepts only shorter chunks (`max_allowed_segment`).
    """
    kwargs = _settings(mix, shifts, split, overlap, transition_power, progress, device,
                       num_workers, pool, segment, interleave=False)
    return _collect(_stream(model, mix, kwargs), mix.shape[-1])


def apply_model_stream(model: tp.Any, mix: MixLike, shifts: int = 1, split: bool = True,
                       overlap: float = 0.25, transition_power: float = 1.,
                       progress: bool = False, device: tp.Any = None, num_workers: int = 0,
                       pool: tp.Any = None, segment: tp.Optional[float] = None) -> Stream:
    """`apply_model` as consecutive pieces `(B, S, C, n)` of its output, in order, each
    yielded once final: they add up to `mix`'s length and equal `apply_model`'s output
    bit for bit (for models that draw from `random` themselves, see the module's
    docstring). The arguments are checked and the random shifts drawn at this call;
    the model runs as the pieces are asked for (one chunk of each model and pass at a
    time: the memory held is a segment's, whatever the length of the track)."""
    kwargs = _settings(mix, shifts, split, overlap, transition_power, progress, device,
                       num_workers, pool, segment, interleave=True)
    return _stream(model, mix, kwargs)


def _settings(mix: MixLike, shifts: int, split: bool, overlap: float, transition_power: float,
              progress: bool, device: tp.Any, num_workers: int, pool: tp.Any,
              segment: tp.Optional[float], interleave: bool) -> tp.Dict[str, tp.Any]:
    """The settings of one application, passed down the recursion."""
    device = mix.device if device is None else torch.device(device)
    if pool is None:
        if num_workers > 0 and device.type == "cpu":
            pool = ThreadPoolExecutor(num_workers)
        else:
            pool = DummyPoolExecutor()
    return {
        "shifts": shifts, "split": split, "overlap": overlap,
        "transition_power": transition_power, "progress": progress,
        "device": device, "pool": pool, "segment": segment, "interleave": interleave,
    }


def _collect(stream: Stream, length: int) -> torch.Tensor:
    """The pieces of `stream` in one tensor of `length` samples."""
    first = next(stream)
    if first.shape[-1] == length:
        for _ in stream:  # nothing left but the stream's own end
            raise RuntimeError("apply_model: the stream is longer than the input.")
        return first
    out = torch.empty(*first.shape[:-1], length, dtype=first.dtype, device=first.device)
    position = 0
    for piece in _chain(first, stream):
        out[..., position:position + piece.shape[-1]] = piece
        position += piece.shape[-1]
    if position != length:
        raise RuntimeError(f"apply_model: the stream gave {position} of {length} samples.")
    return out


def _chain(first: torch.Tensor, stream: Stream) -> Stream:
    yield first
    yield from stream


def _stream(model: tp.Any, mix: MixLike, kwargs: tp.Dict[str, tp.Any]) -> Stream:
    """The checks and the random draws now, the model's work as the stream is read."""
    if isinstance(model, BagOfModels):
        return _stream_bag(model, mix, kwargs)
    if kwargs["transition_power"] < 1:
        raise ValueError("transition_power < 1 leads to weird behaviour, use a value >= 1.")
    limit = max_allowed_segment(model)
    segment = kwargs["segment"]
    if segment is not None and segment > limit:
        raise ValueError(f"segment={segment} is longer than the {limit} seconds this model "
                         "accepts (it was trained on that length).")
    model.to(kwargs["device"])
    if kwargs["shifts"] and limit < math.inf:
        return _stream_shifts(model, mix, kwargs)  # the shifted input is split next
    if kwargs["split"] or mix.shape[-1] > limit * model.samplerate:
        return _stream_split(model, mix, kwargs)
    offsets = _draw_shifts(model, kwargs["shifts"]) if kwargs["interleave"] else None
    return _lazy(_apply_whole, model, mix, offsets, kwargs)


def _lazy(function: tp.Callable[..., torch.Tensor], *args: tp.Any) -> Stream:
    """A stream of one piece, computed when asked for."""
    yield function(*args)


def _draw_shifts(model: tp.Any, shifts: int) -> tp.List[int]:
    """The offsets of `shifts` random shifts of up to 0.5 s (Python's `random`)."""
    max_shift = int(0.5 * model.samplerate)
    return [random.randint(0, max_shift) for _ in range(shifts)]


def _zip_streams(streams: tp.Sequence[Stream]) -> tp.Iterator[tp.List[torch.Tensor]]:
    """Pieces of the same samples from each stream of the same length, read side by side
    (each stream asked for its next piece when the others have caught up)."""
    pending: tp.List[tp.Optional[torch.Tensor]] = [None] * len(streams)
    while True:
        for index, stream in enumerate(streams):
            while pending[index] is None or pending[index].shape[-1] == 0:  # type: ignore
                piece = next(stream, None)
                if piece is None:
                    if index > 0 or any(p is not None and p.shape[-1] for p in pending):
                        raise RuntimeError("apply_model: streams of different lengths.")
                    return
                pending[index] = piece
        pieces = tp.cast(tp.List[torch.Tensor], pending)
        length = min(piece.shape[-1] for piece in pieces)
        yield [piece[..., :length] for piece in pieces]
        pending = [piece[..., length:] for piece in pieces]


def _stream_bag(bag: BagOfModels, mix: MixLike, kwargs: tp.Dict[str, tp.Any]) -> Stream:
    """Weighted average of the estimates of each model of the bag, per source; the models
    are prepared (moved, their shifts drawn) in the bag's order. Not interleaved, each
    model runs over the whole input in turn (`apply_model`)."""
    if not kwargs["interleave"]:
        return _bag_in_turn(bag, mix, kwargs)
    devices = [next(iter(sub_model.parameters())).device for sub_model in bag.models]
    streams = [_stream(sub_model, mix, kwargs) for sub_model in bag.models]
    return _bag_pieces(bag, streams, devices)


def _bag_in_turn(bag: BagOfModels, mix: MixLike, kwargs: tp.Dict[str, tp.Any]) -> Stream:
    estimates: tp.Any = 0.
    totals = [0.] * len(bag.sources)
    sub_model: tp.Any
    for sub_model, weight in zip(bag.models, bag.weights):
        original_device = next(iter(sub_model.parameters())).device
        out = _collect(_stream(sub_model, mix, kwargs), mix.shape[-1])
        sub_model.to(original_device)
        for k, inst_weight in enumerate(weight):
            out[:, k, :, :] *= inst_weight
            totals[k] += inst_weight
        estimates = estimates + out
        del out
    for k in range(estimates.shape[1]):
        estimates[:, k, :, :] /= totals[k]
    yield estimates


def _bag_pieces(bag: BagOfModels, streams: tp.List[Stream],
                devices: tp.List[torch.device]) -> Stream:
    totals = [0.] * len(bag.sources)
    for weight in bag.weights:
        for k, inst_weight in enumerate(weight):
            totals[k] += inst_weight
    try:
        for pieces in _zip_streams(streams):
            estimates: tp.Any = 0.
            for out, weight in zip(pieces, bag.weights):
                for k, inst_weight in enumerate(weight):
                    out[:, k, :, :] *= inst_weight
                estimates = estimates + out
            for k in range(estimates.shape[1]):
                estimates[:, k, :, :] /= totals[k]
            yield estimates
    finally:
        for sub_model, device in zip(bag.models, devices):
            sub_model.to(device)


def _stream_shifts(model: tp.Any, mix: MixLike, kwargs: tp.Dict[str, tp.Any]) -> Stream:
    """Average the outputs over `shifts` random time offsets of the whole input, each
    shifted input split next (a model with a length limit); not interleaved, one shift
    after the other (`apply_model`)."""
    length = mix.shape[-1]
    max_shift = int(0.5 * model.samplerate)
    extended = _Extended(mix, max_shift)
    inner = dict(kwargs, shifts=0)
    if not kwargs["interleave"]:
        return _shifts_in_turn(model, extended, length, inner, kwargs["shifts"])
    streams = []
    for offset in _draw_shifts(model, kwargs["shifts"]):
        shifted = TensorChunk(extended, offset, length + max_shift - offset)
        streams.append(_skip(_stream(model, shifted, inner), max_shift - offset))
    return _shift_pieces(streams)


def _shifts_in_turn(model: tp.Any, extended: _Extended, length: int,
                    kwargs: tp.Dict[str, tp.Any], shifts: int) -> Stream:
    max_shift = int(0.5 * model.samplerate)
    out: tp.Optional[torch.Tensor] = None  # one output buffer, summed into in place
    for _ in range(shifts):
        offset = random.randint(0, max_shift)
        shifted = TensorChunk(extended, offset, length + max_shift - offset)
        shifted_out = _collect(_stream(model, shifted, kwargs), shifted.length)
        shifted_out = shifted_out[..., max_shift - offset:]
        if out is None:
            out = shifted_out
        else:
            out += shifted_out
        del shifted_out
    assert out is not None  # shifts >= 1
    yield out.div_(shifts) if shifts > 1 else out


def _skip(stream: Stream, samples: int) -> Stream:
    """`stream` without its first `samples` samples."""
    for piece in stream:
        if samples >= piece.shape[-1]:
            samples -= piece.shape[-1]
            continue
        yield piece[..., samples:]
        samples = 0


def _shift_pieces(streams: tp.List[Stream]) -> Stream:
    shifts = len(streams)
    for pieces in _zip_streams(streams):
        out = pieces[0]
        for shifted_out in pieces[1:]:
            out += shifted_out
        yield out.div_(shifts) if shifts > 1 else out


def _apply_whole(model: tp.Any, mix: MixLike, offsets: tp.Optional[tp.Sequence[int]],
                 kwargs: tp.Dict[str, tp.Any]) -> torch.Tensor:
    """`mix` in one pass of the model, or averaged over random shifts (a chunk of a
    split, or a whole input within the model's limit): those given, or `shifts` drawn
    now."""
    device, segment = kwargs["device"], kwargs["segment"]
    if offsets is None:
        offsets = _draw_shifts(model, kwargs["shifts"])
    if not offsets:
        return _apply_once(model, mix, device, segment)
    length = mix.shape[-1]
    max_shift = int(0.5 * model.samplerate)
    extended = _Extended(mix, max_shift)
    out: tp.Optional[torch.Tensor] = None  # one output buffer, summed into in place
    for offset in offsets:
        shifted = TensorChunk(extended, offset, length + max_shift - offset)
        shifted_out = _apply_once(model, shifted, device, segment)[..., max_shift - offset:]
        if out is None:
            out = shifted_out
        else:
            out += shifted_out
        del shifted_out
    assert out is not None  # offsets is not empty
    return out.div_(len(offsets)) if len(offsets) > 1 else out


def _transition_weight(segment: int, power: float, device: tp.Any) -> torch.Tensor:
    """Triangle window of `segment` samples, max 1 in the middle, raised to `power`."""
    weight = torch.cat([torch.arange(1, segment // 2 + 1, device=device),
                        torch.arange(segment - segment // 2, 0, -1, device=device)])
    return (weight / weight.max()) ** power


def _stream_split(model: tp.Any, mix: MixLike, kwargs: tp.Dict[str, tp.Any]) -> Stream:
    """Cut the input into overlapping segments and cross-fade their outputs; interleaved,
    the shifts of every segment are drawn now, in the segments' order, else each
    segment's when it runs (`apply_model`)."""
    segment = int(model.samplerate * (kwargs["segment"] or model.segment))
    stride = int((1 - kwargs["overlap"]) * segment)
    if stride <= 0:
        raise ValueError(f"overlap={kwargs['overlap']} leaves no stride between segments.")
    offsets = range(0, mix.shape[-1], stride)
    draws: tp.List[tp.Optional[tp.List[int]]] = [None for _ in offsets]
    if kwargs["interleave"]:
        draws = [_draw_shifts(model, kwargs["shifts"]) for _ in offsets]
    return _split_pieces(model, mix, kwargs, segment, stride, draws)


def _split_pieces(model: tp.Any, mix: MixLike, kwargs: tp.Dict[str, tp.Any], segment: int,
                  stride: int, draws: tp.List[tp.Optional[tp.List[int]]]) -> Stream:
    """Each segment's output, windowed, is added to a buffer of one segment starting where
    the output is not final yet; what no later segment reaches is divided by the sum of
    the windows over it and yielded."""
    batch, channels, length = mix.shape
    weight = _transition_weight(segment, kwargs["transition_power"], kwargs["device"])
    pool = kwargs["pool"]
    # Every segment submitted first (a pool of threads runs them as they come); each
    # taken off the queue when its turn comes: a finished future keeps its output.
    futures = collections.deque(
        (pool.submit(_apply_whole, model, TensorChunk(mix, offset, segment), draw, kwargs),
         offset) for offset, draw in zip(range(0, length, stride), draws))
    bar = tqdm.tqdm(total=len(futures), unit_scale=stride / model.samplerate, ncols=120,
                    unit="seconds", disable=not kwargs["progress"])
    tail = torch.zeros(batch, len(model.sources), channels, segment, device=mix.device)
    sum_weight = weight.to(mix.device)
    try:
        while futures:
            future, offset = futures.popleft()  # `offset` is where `tail` starts
            chunk_out = future.result()  # (B, S, C, chunk_length)
            del future
            bar.update()
            chunk_length = chunk_out.shape[-1]
            tail[..., :chunk_length] += chunk_out.mul_(weight[:chunk_length]).to(mix.device)
            del chunk_out
            final = min(stride, length - offset)
            sums = _window_sums(sum_weight, stride, offset, offset + final)
            yield tail[..., :final] / sums
            tail = torch.cat([tail[..., final:], torch.zeros_like(tail[..., :final])], dim=-1)
            trim_heap()  # what the chunk freed goes back before the next one
    finally:
        bar.close()


def _window_sums(weight: torch.Tensor, stride: int, start: int, end: int) -> torch.Tensor:
    """Sum over `[start, end)` of the windows laid every `stride` samples from 0, added in
    the order of the segments (the same float sums as one track-long sum buffer)."""
    segment = len(weight)
    sums = torch.zeros(end - start, device=weight.device)
    first = max(0, start - segment + stride) // stride * stride  # overlaps `start`
    for offset in range(first, end, stride):
        low, high = max(start, offset), min(end, offset + segment)
        sums[low - start:high - start] += weight[low - offset:high - offset]
    return sums


def _divide_by_window_sums(out: torch.Tensor, weight: torch.Tensor, stride: int
                           ) -> torch.Tensor:
    """Divide `out` in place by the sum of the windows laid every `stride` samples, one
    region of `len(weight)` samples at a time (the same float sums as one track-long
    sum buffer)."""
    length, segment = out.shape[-1], len(weight)
    for start in range(0, length, segment):
        end = min(length, start + segment)
        out[..., start:end].div_(_window_sums(weight, stride, start, end))
    return out


def _apply_once(model: tp.Any, mix: MixLike, device: torch.device,
                segment: tp.Optional[float] = None) -> torch.Tensor:
    """One forward pass, padding the input to the model's valid length if it has one.

    A model with a length limit given a `segment` gets chunks padded to `segment`
    seconds (it pads them further itself), as Demucs v4 does.
    """
    length = mix.shape[-1]
    if segment is not None and max_allowed_segment(model) < math.inf:
        valid_length = int(segment * model.samplerate)
    elif hasattr(model, "valid_length"):
        valid_length = model.valid_length(length)
    else:
        valid_length = length
    padded_mix = tensor_chunk(mix).padded(valid_length).to(device)
    with lean_inference():
        out = model(padded_mix)
    return center_trim(out, length)
