"""Streaming separation: `apply_model_stream` gives the numbers of one track-long buffer,
bit for bit; the `demucs` command reads its input by blocks and writes each stem as the
chunks complete, into files identical to those written from whole tensors."""
from __future__ import annotations

import gc
import math
import random
import subprocess
import sys
import tempfile
import typing as tp
import weakref
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest
import soundfile
import torch
from torch.nn import functional as F

from demucs import transformer
from demucs.apply import (BagOfModels, TensorChunk, _transition_weight, apply_model,
                          apply_model_stream, max_allowed_segment, tensor_chunk)
from demucs.api import mix_stats
from demucs.audio import AudioBlocks, AudioWriter, read_audio, save_audio
from demucs.errors import AudioError
from demucs.utils import center_trim

from helpers import (file_bytes, noise, require_programs, tiny_demucs, tiny_hdemucs,
                     tiny_htdemucs)


# The track-long algorithm as apply.py had it before streaming: the reference.
def reference_apply(model: tp.Any, mix: tp.Any, shifts: int = 1, split: bool = True,
                    overlap: float = 0.25, transition_power: float = 1.,
                    segment: tp.Optional[float] = None) -> torch.Tensor:
    kwargs: dict[str, tp.Any] = {"shifts": shifts, "split": split, "overlap": overlap,
                                 "transition_power": transition_power, "segment": segment}
    if isinstance(model, BagOfModels):
        estimates: tp.Any = 0.
        totals = [0.] * len(model.sources)
        for sub_model, weight in zip(model.models, model.weights):
            out = reference_apply(sub_model, mix, **kwargs)
            for k, inst_weight in enumerate(weight):
                out[:, k, :, :] *= inst_weight
                totals[k] += inst_weight
            estimates = estimates + out
        for k in range(estimates.shape[1]):
            estimates[:, k, :, :] /= totals[k]
        return estimates
    limit = max_allowed_segment(model)
    if shifts and limit < math.inf:
        return reference_shifts(model, mix, kwargs)
    if split or mix.shape[-1] > limit * model.samplerate:
        return reference_split(model, mix, kwargs)
    if shifts:
        return reference_shifts(model, mix, kwargs)
    return reference_once(model, mix, segment)


def reference_shifts(model: tp.Any, mix: tp.Any, kwargs: dict) -> torch.Tensor:
    shifts = kwargs["shifts"]
    kwargs = dict(kwargs, shifts=0)
    length = mix.shape[-1]
    max_shift = int(0.5 * model.samplerate)
    padded_mix = tensor_chunk(mix).padded(length + 2 * max_shift)
    out: tp.Any = None
    for _ in range(shifts):
        offset = random.randint(0, max_shift)
        shifted = TensorChunk(padded_mix, offset, length + max_shift - offset)
        shifted_out = reference_apply(model, shifted, **kwargs)[..., max_shift - offset:]
        out = shifted_out if out is None else out + shifted_out
    return out.div_(shifts) if shifts > 1 else out


def reference_split(model: tp.Any, mix: tp.Any, kwargs: dict) -> torch.Tensor:
    kwargs = dict(kwargs, split=False)
    batch, channels, length = mix.shape
    segment = int(model.samplerate * (kwargs["segment"] or model.segment))
    stride = int((1 - kwargs["overlap"]) * segment)
    out = torch.zeros(batch, len(model.sources), channels, length)
    sum_weight = torch.zeros(length)
    weight = _transition_weight(segment, kwargs["transition_power"], "cpu")
    for offset in range(0, length, stride):
        chunk_out = reference_apply(model, TensorChunk(mix, offset, segment), **kwargs)
        chunk_length = chunk_out.shape[-1]
        out[..., offset:offset + segment] += chunk_out * weight[:chunk_length]
        sum_weight[offset:offset + segment] += weight[:chunk_length]
    return out / sum_weight


def reference_once(model: tp.Any, mix: tp.Any, segment: tp.Optional[float]) -> torch.Tensor:
    length = mix.shape[-1]
    if segment is not None and max_allowed_segment(model) < math.inf:
        valid_length = int(segment * model.samplerate)
    elif hasattr(model, "valid_length"):
        valid_length = model.valid_length(length)
    else:
        valid_length = length
    with torch.no_grad():
        out = model(tensor_chunk(mix).padded(valid_length))
    return center_trim(out, length)


class SlicedTrack:
    """A `Track` that is not a tensor: read only by slices, counting the samples read."""

    def __init__(self, wav: torch.Tensor) -> None:
        self.wav = wav
        self.shape = wav.shape
        self.device = wav.device
        self.largest = 0

    def __getitem__(self, index: tp.Any) -> torch.Tensor:
        assert index[0] is Ellipsis and isinstance(index[1], slice)
        out = self.wav[index]
        self.largest = max(self.largest, out.shape[-1])
        return out.clone()


SR = 8000  # small models at 8 kHz: the chunks, shifts and bags are what is tested


def models() -> dict[str, tp.Any]:
    hdemucs = tiny_hdemucs(seed=0, samplerate=SR, nfft=1024, depth=4,
                           segment=Fraction(1, 2)).eval()
    demucs = tiny_demucs(seed=1, depth=3, segment=0.4, samplerate=SR).eval()
    htdemucs = tiny_htdemucs(seed=2).eval()
    assert max_allowed_segment(htdemucs) == 0.5  # a v4 model trained on 0.5 s
    bag = BagOfModels([tiny_hdemucs(seed=3, samplerate=SR, nfft=1024, depth=4,
                                    segment=0.5).eval(),
                       tiny_demucs(seed=4, depth=3, segment=0.4, samplerate=SR).eval()],
                      weights=[[1., 0., 2., 1.], [0.5, 1., 1., 3.]])
    htbag = BagOfModels([tiny_htdemucs(seed=5).eval(),
                         tiny_hdemucs(seed=6, samplerate=SR, nfft=1024, depth=4,
                                      segment=0.7).eval()],
                        weights=[[1., 2., 0., 1.], [1., 1., 1., 0.]], segment=0.45)
    return {"hdemucs": hdemucs, "demucs": demucs, "htdemucs": htdemucs, "bag": bag,
            "htbag": htbag}


MODELS = models()
CASES = [  # (shifts, split, overlap, transition_power, segment)
    (0, True, 0.25, 1., None), (1, True, 0.25, 1., None), (2, False, 0.25, 1., None),
    (2, True, 0.6, 2., 0.3)]
# HTDemucs draws from Python's `random` at every forward (its positional embedding's shift):
# the stream's shifts are then other ones unless these forwards draw from elsewhere.
DRAW_IN_FORWARD = {"htdemucs", "htbag"}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shifts,split,overlap,power,segment", CASES)
def test_stream_equals_the_track_long_buffer_bit_for_bit(
        name: str, shifts: int, split: bool, overlap: float, power: float,
        segment: tp.Optional[float], monkeypatch: pytest.MonkeyPatch) -> None:
    model = MODELS[name]
    torch.manual_seed(0)
    mix = torch.randn(1, 2, int(1.3 * SR))
    kwargs: dict[str, tp.Any] = {"shifts": shifts, "split": split, "overlap": overlap,
                                 "transition_power": power, "segment": segment}
    random.seed(1)
    expected = reference_apply(model, mix, **kwargs)
    random.seed(1)
    collected = apply_model(model, mix, **kwargs)
    assert torch.equal(collected, expected)  # apply_model: the same draws, in the same order
    if name in DRAW_IN_FORWARD:
        monkeypatch.setattr(transformer, "random", random.Random(0))
        random.seed(1)
        expected = reference_apply(model, mix, **kwargs)
    random.seed(1)
    track = SlicedTrack(mix)
    pieces = list(apply_model_stream(model, track, **kwargs))
    streamed = torch.cat(pieces, dim=-1)
    assert streamed.shape == expected.shape == (1, 4, 2, mix.shape[-1])
    assert torch.equal(streamed, expected)  # max abs difference 0
    if split:
        assert len(pieces) > 1  # the output comes out as the chunks complete
        assert track.largest < mix.shape[-1]  # and the input is read by chunks


@pytest.mark.parametrize("shifts", [0, 1])
def test_stream_of_one_transformer_with_one_shift_is_exact(shifts: int) -> None:
    """One pass of draws: the model's own draws come in the same order as `apply_model`'s."""
    model, mix = MODELS["htdemucs"], torch.randn(1, 2, SR)
    random.seed(2)
    expected = apply_model(model, mix, shifts=shifts)
    random.seed(2)
    assert torch.equal(torch.cat(list(apply_model_stream(model, mix, shifts=shifts)), -1),
                       expected)


def test_stream_draws_its_shifts_when_made() -> None:
    """The model runs as the stream is read, but the random shifts are drawn at the call:
    what runs in between does not change the output."""
    model, mix = MODELS["hdemucs"], torch.randn(1, 2, SR)
    random.seed(3)
    expected = apply_model(model, mix, shifts=2)
    random.seed(3)
    stream = apply_model_stream(model, mix, shifts=2)
    random.random()
    assert torch.equal(torch.cat(list(stream), dim=-1), expected)


def test_stream_checks_its_arguments_at_the_call() -> None:
    with pytest.raises(ValueError, match="transition_power"):
        apply_model_stream(MODELS["hdemucs"], torch.randn(1, 2, 100), transition_power=0.5)
    with pytest.raises(ValueError, match="longer than"):
        apply_model_stream(MODELS["htdemucs"], torch.randn(1, 2, 100), segment=1.)


def test_stream_holds_one_segment_not_the_track() -> None:
    """Pieces of about a stride each: what is held does not grow with the track."""
    model = MODELS["demucs"]
    mix = torch.randn(1, 2, 20 * SR)
    sizes = [piece.shape[-1] for piece in apply_model_stream(model, mix, shifts=0)]
    stride = int(0.75 * int(0.4 * SR))
    assert sum(sizes) == mix.shape[-1] and max(sizes) == stride


class Recorded(torch.nn.Module):
    """`model` taking inputs of any length, keeping a weak reference to each of its
    outputs (as `apply_model` gets them: of the input's length, not a view)."""

    def __init__(self, model: tp.Any) -> None:
        super().__init__()
        self.model = model
        self.outputs: list[weakref.ref] = []
        for name in ("sources", "samplerate", "audio_channels", "segment"):
            setattr(self, name, getattr(model, name))

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        length = mix.shape[-1]
        padded = F.pad(mix, (0, self.model.valid_length(length) - length))
        out = self.model(padded)[..., :length].clone()
        self.outputs.append(weakref.ref(out))
        return out


def test_stream_with_jobs_lets_each_segment_output_go() -> None:
    """With a pool of threads (`-j 2`), the output of a segment is freed once added in:
    the pool's finished futures are not kept to the end of the track."""
    model = Recorded(MODELS["demucs"])
    mix = torch.randn(1, 2, 10 * SR)
    with ThreadPoolExecutor(2) as pool:
        stream = apply_model_stream(model, mix, shifts=0, pool=pool)
        for _ in range(8):
            next(stream)
        gc.collect()
        assert len(model.outputs) >= 8
        assert all(ref() is None for ref in model.outputs[:6])
        for _ in stream:  # to the end, before the pool shuts down
            pass


def test_tensor_chunk_reads_zeros_beyond_the_track() -> None:
    x = torch.arange(1., 11.)[None]
    chunk = TensorChunk(x, 2, 3)
    assert chunk.read(-5, -3).tolist() == [[0., 0.]]
    assert chunk.read(-3, 1).tolist() == [[0., 1., 2., 3.]]
    assert chunk.read(7, 10).tolist() == [[10., 0., 0.]]
    assert chunk[..., 1:3].tolist() == [[4., 5.]]
    assert torch.equal(chunk.padded(7), F.pad(x, (0, 0))[..., 0:7])


# Reading by blocks
def blocks_of(blocks: tp.Any, size: int) -> torch.Tensor:
    length = blocks.shape[-1]
    return torch.cat([blocks[..., start:min(length, start + size)]
                      for start in range(0, length, size)], dim=-1)


@pytest.mark.parametrize("name,rate,channels,subtype", [
    ("in_place.wav", 44100, 2, "PCM_16"), ("in_place.flac", 44100, 2, "PCM_24"),
    ("mono.wav", 44100, 1, "FLOAT"), ("resampled.wav", 22050, 2, "PCM_16"),
    ("decoded.ogg", 44100, 2, "VORBIS")])
def test_blocks_are_the_samples_read_whole(tmp_path: Path, name: str, rate: int,
                                           channels: int, subtype: str) -> None:
    path = tmp_path / name
    wav = 0.3 * noise(channels, int(1.3 * rate), seed=1)
    soundfile.write(str(path), wav.t().numpy(), rate, subtype=subtype)
    if path.suffix == ".ogg" or rate != 44100:
        require_programs("ffmpeg", "ffprobe")
    whole = read_audio(path, 44100, 2)
    with AudioBlocks(path, 44100, 2) as blocks:
        assert tuple(blocks.shape) == tuple(whole.shape)
        assert torch.equal(blocks_of(blocks, 10007), whole)
        assert torch.equal(blocks[..., 5:5], whole[..., 5:5])
        raw = blocks._raw
        assert (raw is not None) == (path.suffix == ".ogg" or rate != 44100)
        mean, std = mix_stats(blocks)
        assert torch.equal(mean, whole.mean(0).mean()) and torch.equal(std, whole.mean(0).std())
    assert raw is None or not raw.exists()  # the decoded samples are deleted


def test_unreadable_file_leaves_no_temporary_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    require_programs("ffmpeg", "ffprobe")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    notes = tmp_path / "notes.mp3"
    notes.write_text("not audio\n" * 100)
    with pytest.raises(AudioError, match="notes.mp3"):
        AudioBlocks(notes, 44100, 2)
    assert list(temporary.iterdir()) == []


# Writing block by block

LOUD = 3 * noise(2, 30011, seed=2)  # peaks above 1: rescale and clamp change it
FORMATS: dict[str, tuple[str, dict[str, tp.Any]]] = {
    "wav16": (".wav", {}), "wav24": (".wav", {"bits_per_sample": 24}),
    "float32": (".wav", {"as_float": True}), "flac16": (".flac", {}),
    "flac24": (".flac", {"bits_per_sample": 24}), "mp3": (".mp3", {"bitrate": 128, "preset": 7})}


@pytest.mark.parametrize("clip", ["rescale", "clamp", "none"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_writer_by_blocks_writes_the_bytes_of_save_audio(
        tmp_path: Path, fmt: str, clip: str, monkeypatch: pytest.MonkeyPatch) -> None:
    suffix, options = FORMATS[fmt]
    save_audio(LOUD, tmp_path / f"whole{suffix}", 44100, clip=clip, **options)
    monkeypatch.setattr(AudioWriter, "BLOCK", 4096)  # the second pass in several blocks
    with AudioWriter(tmp_path / f"blocks{suffix}", 44100, 2, clip=clip, **options) as writer:
        for block in torch.split(LOUD, 7001, dim=-1):
            writer.write(block)
    assert file_bytes(tmp_path / f"blocks{suffix}") == file_bytes(tmp_path / f"whole{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"blocks{suffix}", f"whole{suffix}"]


@pytest.mark.parametrize("clip", ["rescale", "none"])
def test_failed_write_leaves_no_file(tmp_path: Path, clip: str) -> None:
    path = tmp_path / "out" / "stem.wav"
    with pytest.raises(RuntimeError, match="separation failed"):
        with AudioWriter(path, 44100, 2, clip=clip) as writer:
            writer.write(LOUD)
            raise RuntimeError("separation failed")
    assert list(path.parent.iterdir()) == []
    path.write_bytes(b"previous")  # an earlier file stays as it was
    writer = AudioWriter(path, 44100, 2, clip=clip)
    writer.write(LOUD)
    writer.abort()
    assert [p.name for p in path.parent.iterdir()] == ["stem.wav"]
    assert path.read_bytes() == b"previous"
    with pytest.raises(AudioError, match="expected"):
        with AudioWriter(path, 44100, 2, clip=clip) as writer:
            writer.write(LOUD[:1])
    assert path.read_bytes() == b"previous"


KILLED = """
import sys, time, torch
from demucs.audio import AudioWriter
writer = AudioWriter(sys.argv[1], 44100, 2, clip=sys.argv[2])
writer.write(torch.rand(2, 44100) - 0.5)
print("written", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("clip", ["rescale", "none"])
def test_killed_write_leaves_no_file(tmp_path: Path, clip: str) -> None:
    path = tmp_path / "stem.wav"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(path), clip],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
        assert any(tmp_path.iterdir())  # something is being written...
    finally:
        proc.kill()
        proc.wait()
    assert not path.exists()  # ...but not at the destination
    assert all(p.name.startswith(".stem.wav.") for p in tmp_path.iterdir())
