"""ONNX graphs of the models, and the manifest that tells a runner how to use them.

One graph per model (a bag gets one per member), batch 1:

- a time-domain `Demucs`: the whole forward, `mix` (1, C, N) -> `sources` (1, S, C, N);
- a hybrid model (`HDemucs`, `HTDemucs`): the network only (`HybridSpectrogram.core`),
  `mix` (1, C, N) and `spec` (1, C', Fr, frames), the real STFT of the mix as the model
  takes it (`spectrogram_input`: complex as channels, C' = 2C, with `cac`; else its
  magnitude, C' = C), -> `freq` (1, S, C', Fr, frames), the spectrogram (or the
  magnitudes to mask) of each source, and `time` (1, S, C, N), the time branch output
  (absent for a spectrogram-only HDemucs). The STFT before, and the masks (or Wiener
  filtering) and inverse STFT after, are computed outside the graph, by the runner
  (`demucs.backends`) with the model's own methods.

N is the chunk length the graph runs on: for an HTDemucs, fixed, its training length (as
the torch path runs it); for the v3 models, any (`is_dynamic`: the axes `LENGTH` and
`FRAMES`; a Demucs: its valid lengths, `length_axis`), as `apply_model` gives them the
chunks of a track, the last one shorter, shifted within.
`MANIFEST` (JSON, docs/onnx.md) lists the graphs with their shapes, the STFT settings and
the bag's weights. Exported with torch's dynamo exporter (`torch.onnx.export(...,
dynamo=True)`, which needs the `onnx` and `onnxscript` packages) at opset `OPSET`.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import shutil
import tempfile
import typing as tp
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .bag import BagOfModels, sub_models
from .demucs import BLSTM, Demucs
from .errors import ConfigError, ModelLoadingError
from .hdemucs import HDemucs, HybridSpectrogram
from .htdemucs import HTDemucs
from .lean import lean_inference
from .reductions import DECOMPOSITIONS

FORMAT = 2  # of the manifest
# Of what the graphs compute, for the cache's keys (`backends.model_key`): 2, the long
# sums of the normalizations taken by blocks (`reductions`); 3, the group norms' by a
# product with ones along time (means and deviations still by blocks). Older exports are
# redone.
REVISION = 3
MANIFEST = "demucs_onnx.json"
OPSET = 18  # onnxruntime >= 1.14 and OpenVINO >= 2023.0 read it
Shapes = tp.Dict[str, tp.List[tp.Union[int, str]]]


@dataclass
class Spectrogram:
    """The STFT and mask settings of a hybrid model (`HybridSpectrogram`'s attributes)."""
    nfft: int
    hop_length: int
    cac: bool
    hybrid: bool
    hybrid_old: bool
    wiener_iters: int
    wiener_residual: bool


@dataclass
class Padding:
    """How a time-domain `Demucs` pads its input (`Demucs.valid_length`'s attributes)."""
    resample: bool
    depth: int
    kernel_size: int
    stride: int


@dataclass
class Graph:
    """One model's graph: its file, its input and output shapes (a dynamic length is a
    name: `LENGTH`, `FRAMES`), its weight per source in a bag, its STFT settings (None
    for a time-domain Demucs) and the padding of a Demucs (None for the others)."""
    file: str
    length: int  # N, samples of the `mix` input for a chunk of `segment` seconds
    segment: float  # seconds of audio per chunk (N before a Demucs's padding)
    inputs: Shapes
    outputs: Shapes
    weights: tp.List[float]
    spectrogram: tp.Optional[Spectrogram] = None
    padding: tp.Optional[Padding] = None
    # Calls of Python's `random` a torch forward makes (an HTDemucs's 'sin' embedding
    # draws its shift, 0, at every forward): a runner makes them too, so that a seed
    # gives `apply_model` the random shifts of the torch path.
    draws: int = 0

    @property
    def dynamic(self) -> bool:
        """Whether the graph takes any length (a named last axis of `mix`)."""
        return isinstance(self.inputs["mix"][-1], str)


@dataclass
class Manifest:
    """What a runner needs besides the graphs (written as `MANIFEST`)."""
    sources: tp.List[str]
    samplerate: int
    audio_channels: int
    graphs: tp.List[Graph]
    format: int = FORMAT
    opset: int = OPSET
    exporter: str = field(default_factory=lambda: f"torch {torch.__version__}")

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        """The manifest of `folder`; `ModelLoadingError` naming the file if unreadable."""
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
            graphs = [Graph(**{**g, "spectrogram": Spectrogram(**g["spectrogram"])
                               if g.get("spectrogram") else None,
                               "padding": Padding(**g["padding"]) if g.get("padding") else None})
                      for g in data.pop("graphs")]
            manifest = cls(**data, graphs=graphs)
        except FileNotFoundError:
            raise ModelLoadingError(f"{path}: no such file; export the model with "
                                    "`python -m tools.export_onnx`.") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise ModelLoadingError(f"{path}: not a manifest of ONNX graphs ({error}).") \
                from None
        if manifest.format != FORMAT:
            raise ModelLoadingError(f"{path}: manifest format {manifest.format}, this version "
                                    f"reads {FORMAT}; export the model again.")
        return manifest


def is_graph_folder(name: tp.Any) -> bool:
    """Whether `name` is a folder of exported graphs (it holds a `MANIFEST`)."""
    return isinstance(name, (str, Path)) and (Path(name) / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------
# What each model needs


def check_exportable(model: nn.Module) -> None:
    """`ConfigError` naming the option for a model whose graph cannot be exported."""
    if not isinstance(model, (Demucs, HDemucs, HTDemucs)):
        raise ConfigError(f"Cannot export a {type(model).__name__} to ONNX: Demucs, HDemucs "
                          "and HTDemucs are supported.")
    transformer = getattr(model, "crosstransformer", None)
    shift = getattr(transformer, "sin_random_shift", 0)
    if transformer is not None and transformer.emb == "sin" and shift:
        raise ConfigError(f"Cannot export an HTDemucs with t_sin_random_shift={shift}: its "
                          "positional embedding is shifted at random at every forward, "
                          "which a graph cannot do (0 exports).")


def graph_length(model: tp.Any, segment: float) -> int:
    """N: the samples a chunk of `segment` seconds has when `apply_model` gives it to
    `model` (an HTDemucs takes its training length, a Demucs its valid length)."""
    length = int(segment * model.samplerate)
    if isinstance(model, HTDemucs):
        return model.valid_length(length)
    if isinstance(model, Demucs):
        return model.valid_length(length)
    return length


def spectrogram_settings(model: HybridSpectrogram) -> Spectrogram:
    return Spectrogram(nfft=model.nfft, hop_length=model.hop_length, cac=model.cac,
                       hybrid=model.hybrid, hybrid_old=model.hybrid_old,
                       wiener_iters=model.wiener_iters, wiener_residual=model.wiener_residual)


class Core(nn.Module):
    """What the graph of `model` computes (see the module doc)."""

    def __init__(self, model: tp.Any):
        super().__init__()
        self.model: tp.Any = model

    def forward(self, mix: torch.Tensor, spec: tp.Optional[torch.Tensor] = None
                ) -> tp.Tuple[torch.Tensor, ...]:
        if spec is None:
            return (self.model(mix),)
        freq, time = self.model.core(mix, spec)
        return (freq,) if time is None else (freq, time)


def example_inputs(model: tp.Any, length: int) -> tp.Dict[str, torch.Tensor]:
    """Inputs of the graph of `model` for chunks of `length` samples (a noise mix)."""
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(1, model.audio_channels, length, generator=generator)
    if not isinstance(model, HybridSpectrogram):
        return {"mix": mix}
    return {"mix": mix, "spec": model.spectrogram_input(mix)}


def output_names(model: nn.Module) -> tp.List[str]:
    if not isinstance(model, HybridSpectrogram):
        return ["sources"]
    return ["freq", "time"] if model.hybrid else ["freq"]


def export_graph(model: nn.Module, path: Path, segment: float,
                 weights: tp.List[float]) -> Graph:
    """Write the graph of `model` (on chunks of `segment` seconds; of any length for the
    v3 models, `is_dynamic`) to `path`."""
    check_exportable(model)
    model = model.cpu().float().eval()
    length = graph_length(model, segment)
    dynamic = is_dynamic(model)
    with lean_inference(False):  # whole tensors: the lean path writes in place, by blocks
        inputs = example_inputs(model, length)
        # A forward before the export: the tensors the layers make once and keep
        # (`utils.made_once`: windows, embeddings) are then real, not the exporter's.
        outputs = Core(model)(*inputs.values())
        names = output_names(model)
        traced = example_inputs(model, trace_length(model, length)) if dynamic else inputs
        _onnx_export(Core(model), traced, path, names, dynamic)
    spectrogram = spectrogram_settings(model) if isinstance(model, HybridSpectrogram) else None
    padding = None
    if isinstance(model, Demucs):
        padding = Padding(resample=bool(model.resample), depth=model.depth,
                          kernel_size=model.kernel_size, stride=model.stride)
    shapes = {**{k: list(v.shape) for k, v in inputs.items()},
              **{k: list(v.shape) for k, v in zip(names, outputs)}}
    if dynamic:
        shapes = {name: _dynamic_shape(name, shape) for name, shape in shapes.items()}
    return Graph(file=path.name, length=length, segment=float(segment),
                 inputs={k: shapes[k] for k in inputs}, outputs={k: shapes[k] for k in names},
                 weights=list(weights), spectrogram=spectrogram, padding=padding,
                 draws=random_draws(model))


def is_dynamic(model: nn.Module) -> bool:
    """Whether the graph of `model` takes any length: the v3 models (Demucs, HDemucs) run
    on chunks of any length in the torch path (the last chunk of a track, random shifts
    within a chunk), an HTDemucs on its training length only."""
    return isinstance(model, (Demucs, HDemucs)) and not isinstance(model, HTDemucs)


# The names of the dynamic axes: the samples of the audio (the last axis of `mix`,
# `time`, `sources`) and the STFT frames (the last axis of `spec`, `freq`).
LENGTH, FRAMES = "length", "frames"
DYNAMIC_AXES = {"mix": LENGTH, "time": LENGTH, "sources": LENGTH, "spec": FRAMES,
                "freq": FRAMES}


def _dynamic_shape(name: str, shape: tp.List[int]) -> tp.List[tp.Union[int, str]]:
    return [*shape[:-1], DYNAMIC_AXES[name]]


def trace_length(model: nn.Module, length: int) -> int:
    """The length to trace the dynamic graph of `model` at: `length`, doubled until every
    BLSTM with `max_steps` cuts its input into frames. `torch.cond` traces both ways of
    such a BLSTM, each with the sizes of the example (its index arithmetic holds for them):
    the frames' way needs an example long enough to take it (the other has none). A
    Demucs: a valid length (`length_axis`)."""
    if any(isinstance(m, BLSTM) and m.max_steps for m in model.modules()):
        args, kwargs = tp.cast(tp.Any, model)._init_args_kwargs
        with torch.device("meta"):  # the same layers, no weights, no computation
            probe = type(model)(*args, **kwargs).eval()
        while not _all_framed(probe, length):
            length *= 2
    return model.valid_length(length) if isinstance(model, Demucs) else length


def _all_framed(probe: tp.Any, length: int) -> bool:
    """Whether every BLSTM with `max_steps` of `probe` (a model on the meta device, which
    this changes) frames its input for `length` samples."""
    framed: tp.List[bool] = []

    def blstm(x: torch.Tensor, max_steps: int) -> torch.Tensor:
        framed.append(x.shape[-1] > max_steps)
        return x  # of the same shape, without the LSTM's steps

    for module in probe.modules():
        if isinstance(module, BLSTM) and module.max_steps:
            module.forward = functools.partial(  # type: ignore[method-assign]
                blstm, max_steps=module.max_steps)
    mix = torch.zeros(1, probe.audio_channels, length)
    inputs = [mix, probe.spectrogram_input(mix)] if isinstance(
        probe, HybridSpectrogram) else [mix]  # (an STFT of zeros, on the CPU)
    Core(probe)(*(value.to("meta") for value in inputs))
    return all(framed)


def random_draws(model: tp.Any) -> int:
    """The calls of Python's `random` a forward of `model` makes (see `Graph.draws`)."""
    transformer = getattr(model, "crosstransformer", None)
    return int(transformer is not None and transformer.emb == "sin")


def _onnx_export(core: nn.Module, inputs: tp.Dict[str, torch.Tensor], path: Path,
                 names: tp.List[str], dynamic: bool) -> None:
    """`torch.onnx.export` with the dynamo exporter, without its progress lines and
    warnings (kept for an error: raised again with them). `dynamic`: the last axis of
    each input of any size (`DYNAMIC_AXES`). Long means, variances and group norms sum by
    products with ones (`reductions.DECOMPOSITIONS`), which the runtimes would sum value
    by value."""
    check_exporter()
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), _quiet_loggers():
        warnings.simplefilter("ignore")
        program = _program(core, inputs, dynamic).run_decompositions(DECOMPOSITIONS)
        torch.onnx.export(program, (), str(path), dynamo=True, external_data=False,
                          input_names=list(inputs), output_names=names,
                          opset_version=OPSET, verbose=False,
                          custom_translation_table=_translations())
    if dynamic:
        _name_axes(path)


def _program(core: nn.Module, inputs: tp.Dict[str, torch.Tensor], dynamic: bool
             ) -> torch.export.ExportedProgram:
    """`core` traced on `inputs`, with the last axis of each symbolic if `dynamic`. The
    relations between the sizes that the trace relies on (the frames of `spec` are those
    of `mix`'s STFT) are asserted where they are used rather than turned into fixed sizes."""
    if not dynamic:
        return torch.export.export(core.eval(), tuple(inputs.values()), strict=False)
    length: tp.Any = torch.export.Dim.DYNAMIC
    model = core.model
    if isinstance(model, Demucs):
        steps, first = length_axis(model)
        length = steps * torch.export.Dim("inner", min=1) + first - steps
    shapes = {name: {value.dim() - 1: length if name == "mix" else torch.export.Dim.DYNAMIC}
              for name, value in inputs.items()}
    return torch.export.export(core.eval(), tuple(inputs.values()), dynamic_shapes=shapes,
                               strict=False, prefer_deferred_runtime_asserts_over_guards=True)


def length_axis(model: Demucs) -> tp.Tuple[int, int]:
    """`(steps, first)`: the valid lengths of a Demucs are `first + k * steps`, k >= 0
    (`Demucs.valid_length`, one per length at its innermost layer). The graph of a Demucs
    takes these only: its sizes are then whole multiples all along, which the exporter
    computes without guesses (and fast), and the model pads them by 0. `ConfigError` for a
    model whose valid lengths are not so spaced (an odd stride with `resample`)."""
    lengths = sorted({model.valid_length(n) for n in range(1, model.valid_length(1) * 40)})
    first, steps = lengths[0], lengths[1] - lengths[0]
    if lengths != list(range(first, lengths[-1] + 1, steps)):
        raise ConfigError(f"Cannot export this Demucs to ONNX: its valid lengths "
                          f"{lengths[:4]}... are not evenly spaced (stride {model.stride}).")
    return steps, first


def _translations() -> tp.Dict[tp.Callable, tp.Callable]:
    """The ONNX functions of our operators: `demucs.demucs.traced_lstm`, the LSTM of a
    BLSTM traced with a symbolic length, is the ONNX LSTM torch gives `torch.lstm`."""
    from onnxscript.function_libs.torch_lib.ops.core import aten_lstm

    def lstm(x: tp.Any, h0: tp.Any, weights: tp.Sequence[tp.Any], layers: int) -> tp.Any:
        return aten_lstm(x, [h0, h0], weights, True, layers, 0., False, True, False)[0]
    return {torch.ops.demucs.lstm.default: lstm}


def _name_axes(path: Path) -> None:
    """Name the dynamic axes of the graph's inputs and outputs `DYNAMIC_AXES` (the
    exporter names them after its symbols)."""
    import onnx
    graph = onnx.load(str(path))
    for port in [*graph.graph.input, *graph.graph.output]:
        dims = port.type.tensor_type.shape.dim
        dims[len(dims) - 1].dim_param = DYNAMIC_AXES[port.name]
    onnx.save(graph, str(path))


@contextlib.contextmanager
def _quiet_loggers() -> tp.Iterator[None]:
    """The exporter's loggers (torch.onnx, onnxscript) at ERROR level within."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_exporter() -> None:
    """`ConfigError` saying what to install when the exporter's packages are missing."""
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise ConfigError(f"Exporting to ONNX needs the {package} package: "
                              "pip install .[onnx] (or pip install onnx onnxscript).") from None


# ---------------------------------------------------------------------------------------
# A package or bag


def export(model: tp.Any, out: Path, segment: tp.Optional[float] = None) -> Manifest:
    """Export `model` (or each model of a bag) to the folder `out`: `model_K.onnx` and
    `MANIFEST`. Written in a temporary folder moved into place at the end: nothing is
    left behind on an error. `segment` (seconds): the chunk length (default: each
    model's; at most its training length for an HTDemucs)."""
    models = sub_models(model)
    weights = model.weights if isinstance(model, BagOfModels) else [[1.] * len(model.sources)]
    for member in models:
        check_exportable(member)
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        graphs = [export_graph(member, Path(tmp) / f"model_{index}.onnx",
                               chunk_seconds(member, segment), weight)
                  for index, (member, weight) in enumerate(zip(models, weights))]
        manifest = Manifest(sources=list(model.sources), samplerate=int(model.samplerate),
                            audio_channels=int(model.audio_channels), graphs=graphs)
        manifest.write(Path(tmp))
        _replace(Path(tmp), out)
    return manifest


def chunk_seconds(model: tp.Any, segment: tp.Optional[float]) -> float:
    """The chunk length in seconds: `segment`, or the model's; never longer than what
    the model accepts (`ConfigError`)."""
    limit = float(getattr(model, "max_allowed_segment", math.inf))
    seconds = float(model.segment if segment is None else segment)
    if seconds > limit:
        raise ConfigError(f"segment {seconds:g} s is longer than the {limit:g} s this model "
                          "was trained on.")
    return seconds


def check_target(out: Path) -> None:
    """`out` is free, empty, or an earlier export (which the new one replaces)."""
    if out.exists() and not (out.is_dir() and (is_graph_folder(out) or not any(out.iterdir()))):
        raise ConfigError(f"{out} exists and is not a folder of exported graphs; choose "
                          "another output folder.")


def _replace(tmp: Path, out: Path) -> None:
    """Move the folder `tmp` to `out`, replacing an earlier export there."""
    if out.exists():
        shutil.rmtree(out)
    tmp.chmod(0o755)  # a temporary folder is private
    tmp.rename(out)
    tmp.mkdir()  # for TemporaryDirectory's cleanup
