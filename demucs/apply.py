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
"""
from __future__ import annotations

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


class TensorChunk:
    """A view `[offset, offset + length)` of the last axis of a tensor.

    `padded(target)` returns the chunk extended symmetrically to `target` samples,
    reading real samples of the underlying tensor where they exist and zeros beyond it.
    """

    def __init__(self, tensor: tp.Union[torch.Tensor, "TensorChunk"], offset: int = 0,
                 length: tp.Optional[int] = None):
        total_length = tensor.shape[-1]
        if not 0 <= offset < total_length:
            raise ValueError(f"Chunk offset {offset} is outside [0, {total_length}).")
        if length is None:
            length = total_length - offset
        else:
            length = min(total_length - offset, length)
        self.tensor: torch.Tensor
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
        total_length = self.tensor.shape[-1]
        if delta < 0:
            raise ValueError(f"Cannot pad a chunk of {self.length} samples to {target_length}.")
        start = self.offset - delta // 2
        end = start + target_length
        correct_start = max(0, start)
        correct_end = min(total_length, end)
        pad_left = correct_start - start
        pad_right = end - correct_end
        return F.pad(self.tensor[..., correct_start:correct_end], (pad_left, pad_right))


def tensor_chunk(tensor_or_chunk: tp.Union[torch.Tensor, TensorChunk]) -> TensorChunk:
    if isinstance(tensor_or_chunk, TensorChunk):
        return tensor_or_chunk
    return TensorChunk(tensor_or_chunk)


MixLike = tp.Union[torch.Tensor, TensorChunk]


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
    device = mix.device if device is None else torch.device(device)
    if pool is None:
        if num_workers > 0 and device.type == "cpu":
            pool = ThreadPoolExecutor(num_workers)
        else:
            pool = DummyPoolExecutor()
    kwargs: tp.Dict[str, tp.Any] = {
        "shifts": shifts, "split": split, "overlap": overlap,
        "transition_power": transition_power, "progress": progress,
        "device": device, "pool": pool, "segment": segment,
    }
    if isinstance(model, BagOfModels):
        return _apply_bag(model, mix, kwargs)
    if transition_power < 1:
        raise ValueError("transition_power < 1 leads to weird behaviour, use a value >= 1.")
    limit = max_allowed_segment(model)
    if segment is not None and segment > limit:
        raise ValueError(f"segment={segment} is longer than the {limit} seconds this model "
                         "accepts (it was trained on that length).")
    model.to(device)
    if shifts and limit < math.inf:
        return _apply_shifts(model, mix, kwargs)  # the shifted input is split next
    if split or mix.shape[-1] > limit * model.samplerate:
        return _apply_split(model, mix, kwargs)
    if shifts:
        return _apply_shifts(model, mix, kwargs)
    return _apply_once(model, mix, device, segment)


def _apply_bag(bag: BagOfModels, mix: MixLike, kwargs: tp.Dict[str, tp.Any]) -> torch.Tensor:
    """Weighted average of the estimates of each model of the bag, per source."""
    estimates: tp.Any = 0.
    totals = [0.] * len(bag.sources)
    sub_model: tp.Any
    for sub_model, weight in zip(bag.models, bag.weights):
        original_device = next(iter(sub_model.parameters())).device
        out = apply_model(sub_model, mix, **kwargs)
        sub_model.to(original_device)
        for k, inst_weight in enumerate(weight):
            out[:, k, :, :] *= inst_weight
            totals[k] += inst_weight
        estimates = estimates + out
        del out
    for k in range(estimates.shape[1]):
        estimates[:, k, :, :] /= totals[k]
    return estimates


def _apply_shifts(model: tp.Any, mix: MixLike, kwargs: tp.Dict[str, tp.Any]) -> torch.Tensor:
    """Average the outputs over `shifts` random time offsets of the input."""
    shifts = kwargs["shifts"]
    kwargs = dict(kwargs, shifts=0)
    length = mix.shape[-1]
    max_shift = int(0.5 * model.samplerate)
    padded_mix = tensor_chunk(mix).padded(length + 2 * max_shift)
    out: tp.Optional[torch.Tensor] = None  # one output buffer, summed into in place
    for _ in range(shifts):
        offset = random.randint(0, max_shift)
        shifted = TensorChunk(padded_mix, offset, length + max_shift - offset)
        shifted_out = apply_model(model, shifted, **kwargs)[..., max_shift - offset:]
        if out is None:
            out = shifted_out
        else:
            out += shifted_out
        del shifted_out
    assert out is not None  # shifts >= 1
    return out.div_(shifts) if shifts > 1 else out


def _transition_weight(segment: int, power: float, device: tp.Any) -> torch.Tensor:
    """Triangle window of `segment` samples, max 1 in the middle, raised to `power`."""
    weight = torch.cat([torch.arange(1, segment // 2 + 1, device=device),
                        torch.arange(segment - segment // 2, 0, -1, device=device)])
    return (weight / weight.max()) ** power


def _apply_split(model: tp.Any, mix: MixLike, kwargs: tp.Dict[str, tp.Any]) -> torch.Tensor:
    """Cut the input into overlapping segments and cross-fade their outputs."""
    kwargs = dict(kwargs, split=False)
    pool = kwargs["pool"]
    batch, channels, length = mix.shape
    segment = int(model.samplerate * (kwargs["segment"] or model.segment))
    stride = int((1 - kwargs["overlap"]) * segment)
    if stride <= 0:
        raise ValueError(f"overlap={kwargs['overlap']} leaves no stride between segments.")
    out = torch.zeros(batch, len(model.sources), channels, length, device=mix.device)
    weight = _transition_weight(segment, kwargs["transition_power"], kwargs["device"])
    futures: tp.Iterable = [(pool.submit(apply_model, model, TensorChunk(mix, offset, segment),
                                         **kwargs), offset)
                            for offset in range(0, length, stride)]
    if kwargs["progress"]:
        futures = tqdm.tqdm(futures, unit_scale=stride / model.samplerate, ncols=120,
                            unit="seconds")
    for future, offset in futures:
        chunk_out = future.result()  # (B, S, C, chunk_length)
        chunk_length = chunk_out.shape[-1]
        window = weight[:chunk_length]
        out[..., offset:offset + segment] += chunk_out.mul_(window).to(mix.device)
        del chunk_out
        trim_heap()  # what the chunk freed goes back before the next one
    return _divide_by_window_sums(out, weight.to(mix.device), stride)


def _divide_by_window_sums(out: torch.Tensor, weight: torch.Tensor, stride: int
                           ) -> torch.Tensor:
    """Divide `out` in place by the sum of the windows laid every `stride` samples.

    The sums are made one region of `len(weight)` samples at a time, adding the windows in
    the order the chunks were (the same float sums as one track-long sum buffer).
    """
    length, segment = out.shape[-1], len(weight)
    for start in range(0, length, segment):
        end = min(length, start + segment)
        sums = torch.zeros(end - start, device=out.device)
        first = max(0, start - segment + stride) // stride * stride  # overlaps `start`
        for offset in range(first, end, stride):
            low, high = max(start, offset), min(end, offset + segment)
            sums[low - start:high - start] += weight[low - offset:high - offset]
        out[..., start:end].div_(sums)
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
