"""The Python API (`demucs.api`): Separator on tensors and files, its options, the
progress callback, list_models, and `python -m demucs.api`."""
from __future__ import annotations

import dataclasses
import inspect
import random
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import soundfile
import torch
import yaml

from demucs import api, audio
from demucs.apply import BagOfModels, apply_model
from demucs.audio import read_audio, save_audio
from demucs.errors import AudioError, ConfigError, ModelLoadingError
from demucs.htdemucs import HTDemucs
from demucs.options import SeparationOptions
from demucs.pretrained import get_model
from demucs.states import save_with_checksum, serialize_model

from helpers import SOURCES, noise, read_wav, tiny_demucs, tiny_hdemucs, tones

SR = 44100


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api") / "models"
    save_with_checksum(serialize_model(tiny_hdemucs(seed=0, segment=1), {}), folder / "tinyhd.th")
    save_with_checksum(serialize_model(tiny_demucs(seed=1, depth=4, segment=1), {}),
                       folder / "tinyd.th")
    (folder / "duo.yaml").write_text(yaml.safe_dump({
        "models": ["tinyhd", "tinyd"], "weights": [[1, 1, 0, 1], [1, 0, 1, 1]]}))
    return folder


def mix(seconds: float = 2.5, samplerate: int = SR, channels: int = 2) -> torch.Tensor:
    wav = tones([110, 440][:channels], seconds, samplerate, 0.3)
    return wav + noise(channels, wav.shape[-1], seed=1, scale=0.05)


def expected(repo: Path, name: str, wav: torch.Tensor, segment: float | None = None,
             **kwargs: tp.Any) -> torch.Tensor:
    """Normalise, apply_model, denormalise: what the command has always computed."""
    model: tp.Any = get_model(name, repo=repo)
    if segment is not None:
        model.segment = segment
    ref = wav.mean(0)
    norm = (wav - ref.mean()) / ref.std()
    return apply_model(model, norm[None], **kwargs)[0] * ref.std() + ref.mean()


@pytest.mark.parametrize("name", ["tinyhd", "duo"])
def test_separate_tensor(repo: Path, name: str) -> None:
    separator = api.Separator(name, repo=repo, device="cpu", shifts=0)
    wav = mix()
    origin, stems = separator.separate_tensor(wav)
    assert torch.equal(origin, wav)
    assert list(stems) == SOURCES == separator.sources
    reference = expected(repo, name, wav, shifts=0)
    for index, source in enumerate(SOURCES):
        assert torch.allclose(stems[source], reference[index], atol=1e-6), source


def test_separate_tensor_converts_rate_and_channels(repo: Path) -> None:
    separator = api.Separator("tinyd", repo=repo, device="cpu", shifts=0)
    mono = mix(1, 22050, channels=1)
    origin, stems = separator.separate_tensor(mono[0], sr=22050)  # (T,) is mono too
    assert origin.shape == (2, SR)
    assert torch.allclose(origin, audio.convert_audio(mono, 22050, SR, 2))
    assert all(stem.shape == (2, SR) for stem in stems.values())
    with pytest.raises(api.LoadAudioError, match=r"\(channels, time\)"):
        separator.separate_tensor(torch.zeros(1, 2, 100))
    with pytest.raises(api.LoadAudioError, match="too short: 10 samples"):
        separator.separate_tensor(torch.zeros(2, 10))


def test_separate_audio_file(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "song.flac"
    save_audio(mix(), path, SR, bits_per_sample=24)
    separator = api.Separator("tinyhd", repo=repo, device="cpu", shifts=0)
    origin, stems = separator.separate_audio_file(path)
    assert torch.equal(origin, read_audio(path, SR, 2))
    _, again = separator.separate_tensor(origin)
    assert all(torch.equal(stems[s], again[s]) for s in SOURCES)


@pytest.mark.parametrize("make,match", [
    (lambda folder: folder / "missing.wav", "missing.wav does not exist"),
    (lambda folder: folder, "is a directory"),
    (lambda folder: (folder / "empty.wav").touch() or folder / "empty.wav", "empty"),
])
def test_bad_audio_files(repo: Path, tmp_path: Path, make: tp.Callable[[Path], Path],
                         match: str) -> None:
    separator = api.Separator("tinyd", repo=repo, device="cpu")
    with pytest.raises(api.LoadAudioError, match=match):
        separator.separate_audio_file(make(tmp_path))
    with pytest.raises(api.LoadAudioError, match=match):
        separator.open_audio_file(make(tmp_path))


@pytest.mark.parametrize("name,shifts", [("tinyhd", 1), ("duo", 2)])
def test_separate_stream_gives_the_tensors_of_separate_tensor(
        repo: Path, tmp_path: Path, name: str, shifts: int) -> None:
    """Pieces in order, the numbers of `separate_tensor` bit for bit (same seed), from a
    file read by blocks or from a tensor; `separate_tensor` still returns tensors."""
    path = tmp_path / "song.wav"
    save_audio(mix(), path, SR, as_float=True)
    separator = api.Separator(name, repo=repo, device="cpu", shifts=shifts, segment=0.5)
    torch.manual_seed(0)
    random.seed(5)
    origin, stems = separator.separate_audio_file(path)
    assert all(isinstance(stem, torch.Tensor) and stem.shape == origin.shape
               for stem in stems.values())
    with separator.open_audio_file(path) as blocks:
        sources: list[tp.Any] = [blocks, origin]
        for source in sources:
            random.seed(5)
            pieces = list(separator.separate_stream(source))
            starts = [start for start, _ in pieces]
            assert starts[0] == 0 and len(pieces) > 3
            lengths = [piece["bass"].shape[-1] for _, piece in pieces]
            assert starts[1:] == [sum(lengths[:i + 1]) for i in range(len(lengths) - 1)]
            for stem in SOURCES:
                streamed = torch.cat([piece[stem] for _, piece in pieces], dim=-1)
                assert torch.equal(streamed, stems[stem]), stem


Events = list[dict[str, tp.Any]]


def record(separator: api.Separator, wav: torch.Tensor) -> Events:
    events: Events = []
    separator.update_parameter(callback=events.append, callback_arg={"track": "t1"})
    separator.separate_tensor(wav)
    return events


@pytest.mark.parametrize("name,shifts,jobs,models", [("tinyhd", 0, 0, 1), ("duo", 1, 0, 2),
                                                     ("tinyd", 2, 2, 1)])
def test_callback_positions_increase(repo: Path, name: str, shifts: int, jobs: int,
                                     models: int) -> None:
    wav = mix()
    separator = api.Separator(name, repo=repo, device="cpu", shifts=shifts, jobs=jobs,
                              segment=0.5)
    events = record(separator, wav)
    assert [e["state"] for e in events] == ["start", "end"] * (len(events) // 2)
    assert all(e["audio_length"] == wav.shape[-1] and e["track"] == "t1" for e in events)
    assert all(e["models"] == models for e in events)
    passes: dict[tuple[int, int], list[int]] = {}
    for event in events[1::2]:
        key = (event["model_idx_in_bag"], event["shift_idx"])
        passes.setdefault(key, []).append(event["segment_offset"])
        assert 0 < event["segment_length"] <= int(0.5 * SR)
    # One pass per model, per shift where shifts come before the split (v4's apply_model).
    assert sorted({model for model, _ in passes}) == list(range(models))
    for positions in passes.values():
        assert positions[0] == 0 and len(positions) >= 6
        assert all(b > a for a, b in zip(positions, positions[1:])), positions
        assert positions[-1] < wav.shape[-1] + SR // 2


def test_callback_without_split(repo: Path) -> None:
    separator = api.Separator("tinyd", repo=repo, device="cpu", split=False)
    events = record(separator, mix(1))
    assert [(e["state"], e["segment_offset"], e["segment_length"]) for e in events] == \
        [("start", 0, SR), ("end", 0, SR)]


def test_update_parameter(repo: Path) -> None:
    separator = api.Separator("tinyhd", repo=repo, device="cpu", shifts=0)
    wav = mix()
    _, default = separator.separate_tensor(wav)
    bads: list[dict[str, tp.Any]] = [{"shifts": -1}, {"overlap": 1.0}, {"jobs": -2},
                                     {"segment": 0}, {"device": "gpu"},
                                     {"segment": float("nan")}]
    for bad in bads:
        with pytest.raises(ConfigError):
            separator.update_parameter(**{"split": False, **bad})
    _, same = separator.separate_tensor(wav)  # nothing of a refused call was kept
    assert all(torch.equal(default[s], same[s]) for s in SOURCES)
    separator.update_parameter(segment=0.5, overlap=0.1)
    _, chunked = separator.separate_tensor(wav)
    reference = expected(repo, "tinyhd", wav, segment=0.5, shifts=0, overlap=0.1)
    assert torch.allclose(chunked["bass"], reference[1], atol=1e-6)
    assert not torch.equal(chunked["bass"], default["bass"])
    separator.update_parameter(segment=None, overlap=0.25)
    _, back = separator.separate_tensor(wav)
    assert all(torch.equal(default[s], back[s]) for s in SOURCES)


UPSTREAM_KEYWORDS = ["device", "shifts", "overlap", "split", "segment", "jobs", "progress",
                     "callback", "callback_arg"]  # those of upstream Demucs 4.1's Separator


def test_every_option_is_a_keyword(repo: Path) -> None:
    """Separator and update_parameter take every field of SeparationOptions, by keyword."""
    names = [item.name for item in dataclasses.fields(SeparationOptions)]
    assert set(UPSTREAM_KEYWORDS) <= set(names)
    assert list(inspect.signature(api.Separator).parameters) == ["model", "repo", *names]
    assert list(inspect.signature(api.Separator.update_parameter).parameters)[1:] == names
    every = SeparationOptions(device="cpu").as_dict()  # each field, at its default
    separator = api.Separator("tinyd", repo=repo, **every)
    assert separator.options == SeparationOptions(**every)
    upstream: dict[str, tp.Any] = {
        "device": "cpu", "shifts": 0, "overlap": 0.5, "split": False, "segment": 0.5, "jobs": 1,
        "progress": True, "callback": print, "callback_arg": {"a": 1}}
    assert sorted(upstream) == sorted(UPSTREAM_KEYWORDS)
    separator.update_parameter(**upstream)
    assert separator.options == SeparationOptions(**upstream) != SeparationOptions()
    separator.update_parameter(**every)
    assert separator.options == SeparationOptions(**every)
    with pytest.raises(TypeError, match="nope"):
        separator.update_parameter(nope=1)
    # By position too, in upstream's order.
    positional = api.Separator("tinyd", repo, "cpu", 0, 0.5, False)
    assert positional.options == SeparationOptions(device="cpu", shifts=0, overlap=0.5,
                                                   split=False)
    positional.update_parameter("cpu", 2)
    assert positional.options.shifts == 2 and positional.options.overlap == 0.5
    with pytest.raises(TypeError, match="multiple values for argument 'device'"):
        api.Separator("tinyd", repo, "cpu", device="cpu")


def test_segment_limit(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BagOfModels, "max_allowed_segment", 1.0, raising=False)
    with pytest.raises(ConfigError, match="maximum segment is 1 s"):
        api.Separator("duo", repo=repo, device="cpu", segment=1.5)
    separator = api.Separator("duo", repo=repo, device="cpu", segment=1.0)
    assert separator.max_allowed_segment == 1.0
    separator.update_parameter(segment=0.5)
    api.Separator("tinyd", repo=repo, device="cpu", segment=100)  # no limit


def test_list_models(repo: Path) -> None:
    listed = api.list_models(repo)
    assert sorted(listed["single"]) == ["tinyd", "tinyhd"]
    assert list(listed["bag"]) == ["duo"] and listed["bag"]["duo"].endswith("duo.yaml")
    remote = api.list_models()
    assert {"htdemucs", "htdemucs_ft", "mdx_extra_q"} <= set(remote["bag"])
    assert "955717e8" in remote["single"]


def test_errors_and_exports(repo: Path, tmp_path: Path) -> None:
    assert api.LoadModelError is ModelLoadingError and api.LoadAudioError is AudioError
    with pytest.raises(api.LoadModelError, match="'nope'"):
        api.Separator("nope", repo=repo)
    with pytest.raises(ConfigError, match="CUDA|gpu"):
        api.Separator("tinyd", repo=repo, device="gpu")
    assert api.save_audio is audio.save_audio
    api.save_audio(mix(0.2), tmp_path / "a.flac", SR)
    assert soundfile.info(str(tmp_path / "a.flac")).subtype == "PCM_16"


@pytest.mark.slow
def test_python_m_demucs_api(repo: Path, tmp_path: Path) -> None:
    track = tmp_path / "song.wav"
    save_audio(mix(1), track, SR)
    proc = subprocess.run([sys.executable, "-m", "demucs.api", "--repo", str(repo), "-n", "tinyd",
                           str(track), str(tmp_path / "missing.wav"), "-o", str(tmp_path / "out"),
                           "--shifts", "0", "--float32", "-d", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines[0].startswith("demucs.api: error: ") and "missing.wav" in lines[0]
    assert lines[-1].startswith("demucs.api: error: separated 1 of 2 tracks")
    _, stems = api.Separator("tinyd", repo=repo, device="cpu", shifts=0).separate_audio_file(
        track)
    for source in SOURCES:
        got = read_wav(tmp_path / "out" / "tinyd" / "song" / f"{source}.wav")
        assert torch.allclose(got, audio.prevent_clip(stems[source]), atol=1e-6)


@pytest.fixture(scope="module")
def ht_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny v4 Transformer (8 kHz, trained on 0.5 s: its max_allowed_segment)."""
    folder = tmp_path_factory.mktemp("api_v4")
    torch.manual_seed(0)
    model = HTDemucs(SOURCES, samplerate=8000, segment=0.5, channels=8, nfft=2048, t_layers=2)
    save_with_checksum(serialize_model(model, {}), folder / "tinyht.th")
    (folder / "htbag.yaml").write_text("models: [tinyht]\n")
    return folder


@pytest.mark.parametrize("name", ["tinyht", "htbag"])
def test_transformer_segment_limit(ht_repo: Path, name: str) -> None:
    separator = api.Separator(name, repo=ht_repo, device="cpu", shifts=0)
    assert separator.max_allowed_segment == 0.5
    with pytest.raises(ConfigError, match="maximum segment is 0.5 s"):
        separator.update_parameter(segment=0.75)
    separator.update_parameter(segment=0.25)
    origin, stems = separator.separate_tensor(mix(1.3, 8000))
    assert all(stem.shape == origin.shape == (2, 10400) for stem in stems.values())


def test_transformer_callback_passes_per_shift(ht_repo: Path) -> None:
    wav = mix(1.3, 8000)
    separator = api.Separator("tinyht", repo=ht_repo, device="cpu", shifts=2)
    events = record(separator, wav)
    ends = [e for e in events if e["state"] == "end"]
    passes: dict[int, list[int]] = {}
    for event in ends:
        passes.setdefault(event["shift_idx"], []).append(event["segment_offset"])
    assert sorted(passes) == [0, 1]  # shifts first, then the split of each shifted input
    for positions in passes.values():
        assert positions[0] == 0 and len(positions) >= 3
        assert all(b > a for a, b in zip(positions, positions[1:])), positions
    # Without split the Transformer is still cut to its length: its segments are reported
    # inside the pair of events of the whole track.
    separator.update_parameter(split=False, shifts=0)
    events = record(separator, wav)
    assert events[0]["segment_length"] == events[-1]["segment_length"] == wav.shape[-1]
    assert len(events) > 2
