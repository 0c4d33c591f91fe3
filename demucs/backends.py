"""Backends: run a model's ONNX graphs in onnxruntime or OpenVINO instead of PyTorch.

A runner (`GraphRunner`) stands for one model: it has the attributes `apply_model` reads
(`sources`, `samplerate`, `audio_channels`, `segment`, `max_allowed_segment`,
`valid_length`) and its forward computes the STFT in torch, runs the graph in the
runtime, then the masks and the inverse STFT in torch, with the model's own methods
(`HybridSpectrogram`, see `demucs.graphs`). A bag becomes a `BagOfModels` of runners with
the bag's weights, so that `apply_model` (chunks, shifts, overlap, bags) is the same for
every backend.

An HTDemucs graph runs on chunks of a fixed length, `segment` seconds: its runner
accepts at most that (`max_allowed_segment`), shorter inputs padded with zeros on the
right, as the model pads them. The graphs of the v3 models (HDemucs, Demucs) take any
length (a Demucs: its valid lengths, `valid_length`), and their runners have no length
limit. So `apply_model` treats each runner as it treats its model: the same chunks,
shifts and padding as the torch path (docs/onnx.md).

The `demucs` command and `api.Separator` export a model once into a cache folder
(`cache_root()`, one folder per model, segment and exporter version) and load its
graphs from there; a folder written by `python -m tools.export_onnx` loads directly.
The runtimes use `torch.get_num_threads()` threads.

Precision (`PRECISIONS`): float32, or bf16 where the hardware computes it (CPUs with
AVX512-BF16 or AMX, recent GPUs): with torch, each model's forward under bf16 autocast
(`Autocast`), with OpenVINO, its CPU plugin's bf16 inference. onnxruntime's CPU kernels
are float32 only. The stems stay float32 between the models (overlap-add, bags).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import re
import typing as tp
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .bag import BagOfModels, max_allowed_segment, sub_models
from .demucs import Demucs
from .errors import ConfigError, ModelLoadingError
from .graphs import (FORMAT, MANIFEST, OPSET, REVISION, Graph, Manifest, Spectrogram,
                     chunk_seconds, export, is_graph_folder)
from .hdemucs import HybridSpectrogram
from .utils import center_trim

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("float32", "bf16")
# The backends that compute in bf16 (see the module doc).
BF16_BACKENDS = ("torch", "openvino")
# backend -> (module, the oldest version that runs our graphs, the extra that installs it)
RUNTIMES = {"onnxruntime": ("onnxruntime", (1, 16), "onnx"),
            "openvino": ("openvino", (2023, 3), "openvino")}
Arrays = tp.Dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------
# Runtimes


@functools.lru_cache(maxsize=None)
def check_runtime(backend: str, name: str = "--backend") -> None:
    """`ConfigError`, one line saying what to install, when the runtime of `backend` is
    missing or too old; nothing for torch. `name`: the option's, in the line."""
    if backend not in RUNTIMES:
        return
    module, oldest, extra = RUNTIMES[backend]
    try:
        runtime = __import__(module)
    except ImportError:
        raise ConfigError(f"{name} {backend} needs the {module} package, which is not "
                          f"installed: pip install .[{extra}] (or pip install {module}).") \
            from None
    version = str(getattr(runtime, "__version__", "0"))
    if _version(version) < oldest:
        wanted = ".".join(map(str, oldest))
        raise ConfigError(f"{name} {backend} needs {module} >= {wanted}, found {version}: "
                          f"pip install --upgrade {module}.")


def _version(text: str) -> tp.Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


class Session(tp.Protocol):
    """A graph loaded in a runtime."""
    def run(self, inputs: Arrays) -> tp.List[np.ndarray]: ...
    def shapes(self) -> tp.Dict[str, tp.List[tp.Optional[int]]]:
        """The sizes of the inputs and outputs, None for a dynamic axis, under each of
        their names."""


class OrtSession:
    """An onnxruntime inference session on the CPU, `torch.get_num_threads()` threads,
    memory allocated as needed."""

    def __init__(self, path: Path):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        # No arena nor memory pattern: the HTDemucs 955717e8 config peaked at 5.2 GB with
        # them, 2.8 GB without, at the same speed (bench_backends.py, 20 s, 2 threads).
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def run(self, inputs: Arrays) -> tp.List[np.ndarray]:
        return list(self.session.run(None, inputs))

    def shapes(self) -> tp.Dict[str, tp.List[tp.Optional[int]]]:
        ports = [*self.session.get_inputs(), *self.session.get_outputs()]
        return {port.name: [dim if isinstance(dim, int) else None for dim in port.shape]
                for port in ports}


class OpenVinoSession:
    """An OpenVINO model compiled for the CPU in `precision` (float32 unless asked: not
    the bf16 some CPUs would pick by themselves), `torch.get_num_threads()` threads; one
    infer request per call (thread-safe)."""

    def __init__(self, path: Path, precision: str = "float32"):
        import openvino as ov
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()})

    def run(self, inputs: Arrays) -> tp.List[np.ndarray]:
        request = self.compiled.create_infer_request()
        request.infer(inputs)
        return [request.get_output_tensor(index).data.copy()
                for index in range(len(self.compiled.outputs))]

    def shapes(self) -> tp.Dict[str, tp.List[tp.Optional[int]]]:
        ports = [*self.compiled.inputs, *self.compiled.outputs]
        # A port can have several names (an output also named after the node making it).
        return {name: [dim.get_length() if dim.is_static else None
                       for dim in port.get_partial_shape()]
                for port in ports for name in port.get_names()}


def open_session(path: Path, graph: Graph, backend: str, precision: str = "float32"
                 ) -> Session:
    """The graph at `path` in `backend`; `ModelLoadingError` naming the file when it is
    missing, unreadable or of other shapes than the manifest says."""
    check_precision(backend, precision)
    if not path.is_file():
        raise ModelLoadingError(f"{path}: no such file, but {MANIFEST} lists it; export the "
                                "model again.")
    try:
        session: Session = (OrtSession(path) if backend == "onnxruntime"
                            else OpenVinoSession(path, precision))
    except Exception as error:  # each runtime has its own errors for a bad file
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelLoadingError(f"{path}: {backend} cannot load it ({first}).") from None
    expected = {name: [dim if isinstance(dim, int) else None for dim in shape]
                for name, shape in {**graph.inputs, **graph.outputs}.items()}
    shapes = session.shapes()
    found = {name: shapes.get(name) for name in expected}
    if found != expected:
        raise ModelLoadingError(f"{path}: its inputs and outputs {found} are not "
                                f"those {MANIFEST} gives ({expected}, None: any size); "
                                "export the model again.")
    return session


# ---------------------------------------------------------------------------------------
# Runners


class SpectrogramSteps(HybridSpectrogram):
    """The STFT before a hybrid graph and the masks and inverse STFT after it: the
    methods of `HybridSpectrogram` with the settings of the manifest, no weights."""
    training = False
    end_iters = 0

    def __init__(self, settings: Spectrogram, sources: tp.List[str], audio_channels: int):
        for key, value in vars(settings).items():
            setattr(self, key, value)
        self.end_iters = settings.wiener_iters
        self.sources = sources
        self.audio_channels = audio_channels


class GraphRunner(nn.Module):
    """One model's graph in a runtime, with the attributes of the model (module doc)."""

    def __init__(self, manifest: Manifest, graph: Graph, session: Session):
        super().__init__()
        self.sources = list(manifest.sources)
        self.samplerate = manifest.samplerate
        self.audio_channels = manifest.audio_channels
        self.segment = graph.segment
        self.length = graph.length
        self.dynamic = graph.dynamic
        self.padding = graph.padding
        self.draws = graph.draws
        self.session = session
        self.steps = None if graph.spectrogram is None else SpectrogramSteps(
            graph.spectrogram, self.sources, self.audio_channels)
        # `apply_model` reads a bag member's device from its first parameter.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def max_allowed_segment(self) -> float:
        return math.inf if self.dynamic else self.segment

    def valid_length(self, length: int) -> int:
        """The length the model pads a chunk of `length` samples to, before the graph
        (`apply_model` pads it so, with the audio around the chunk)."""
        if self.dynamic:
            if self.padding is None:  # an HDemucs takes any length
                return length
            return Demucs.valid_length(tp.cast(Demucs, self.padding), length)
        if length > self.length:
            raise ValueError(f"Given length {length} is longer than the {self.length} samples "
                             "this graph runs on; cut the input into chunks (apply_model does).")
        return self.length

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, C, T) mixture -> (B, S, C, T) estimated sources; T <= `length` for a graph
        of fixed length, a valid length (`valid_length`) for a Demucs."""
        length = mix.shape[-1]
        if self.dynamic and self.valid_length(length) != length:
            raise ValueError(f"This Demucs graph runs on valid lengths, not {length} samples: "
                             f"pad the input to valid_length({length}) = "
                             f"{self.valid_length(length)} samples (apply_model does).")
        for _ in range(self.draws):  # those of the torch forward, see `Graph.draws`
            random.randrange(1)
        padded = self._fit(mix.detach().cpu().float())
        out = torch.cat([self._one(item[None]) for item in padded])
        out = out[..., :length] if self.steps is not None else center_trim(out, length)
        return out.to(mix.device)

    def _fit(self, mix: torch.Tensor) -> torch.Tensor:
        """`mix` padded to `length` as the model pads it: zeros on the right (hybrid),
        on both sides (Demucs)."""
        delta = self.valid_length(mix.shape[-1]) - mix.shape[-1]
        if self.steps is not None:
            return F.pad(mix, (0, delta))
        return F.pad(mix, (delta // 2, delta - delta // 2))

    def _one(self, mix: torch.Tensor) -> torch.Tensor:
        """(1, C, T) -> (1, S, C, T), the graph and the steps around it."""
        if self.steps is None:
            return torch.from_numpy(self.session.run({"mix": mix.numpy()})[0])
        spec = self.steps.spectrogram_input(mix)
        outputs = self.session.run({"mix": mix.numpy(), "spec": spec.contiguous().numpy()})
        freq, *time = (torch.from_numpy(out) for out in outputs)
        return self.steps.waveforms(mix, freq, time[0] if time else None)


def load_runners(folder: Path, backend: str, precision: str = "float32") -> nn.Module:
    """The runner of the graphs in `folder` (a bag of runners for several graphs)."""
    check_runtime(backend)
    folder = Path(folder)
    manifest = Manifest.read(folder)
    runners = [GraphRunner(manifest, graph,
                           open_session(folder / graph.file, graph, backend, precision))
               for graph in manifest.graphs]
    if len(runners) == 1 and manifest.graphs[0].weights == [1.] * len(manifest.sources):
        return runners[0]
    return BagOfModels(runners, [graph.weights for graph in manifest.graphs])


# ---------------------------------------------------------------------------------------
# The cache of exported models


def cache_root() -> Path:
    """Where models are exported once: `$DEMUCS_ONNX_CACHE`, else
    `$XDG_CACHE_HOME/demucs/onnx` (`~/.cache/demucs/onnx`)."""
    if os.environ.get("DEMUCS_ONNX_CACHE"):
        return Path(os.environ["DEMUCS_ONNX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "demucs" / "onnx"


def model_key(model: nn.Module, segment: tp.Optional[float]) -> str:
    """A name for the export of `model` on chunks of `segment` seconds: a hash of the
    classes, constructor arguments, weights, chunk lengths and bag weights, and of the
    exporter's version."""
    digest = hashlib.sha256(f"{FORMAT} {REVISION} {OPSET} torch {torch.__version__}".encode())
    weights = model.weights if isinstance(model, BagOfModels) else None
    for member in sub_models(model):
        init = getattr(member, "_init_args_kwargs", None)
        digest.update(f"{type(member).__qualname__} {init!r} "
                      f"{chunk_seconds(member, segment)}".encode())
        for name, tensor in member.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(repr(weights).encode())
    return digest.hexdigest()[:16]


def runnable(model: nn.Module, backend: str, segment: tp.Optional[float] = None,
             log: tp.Callable[[str], None] = print, precision: str = "float32"
             ) -> nn.Module:
    """What `apply_model` runs for `model` (a model or bag) with `backend` in
    `precision`: the model itself for torch (each model under autocast for bf16), else
    its runners, exported into the cache first if needed."""
    check_precision(backend, precision)
    if backend == "torch":
        return model if precision == "float32" else autocast_models(model)
    check_runtime(backend)
    folder = cache_root() / model_key(model, segment)
    if not is_graph_folder(folder):
        log(f"Exporting the model to ONNX into {folder} (once per model and segment).")
        export(model, folder, segment)
    return load_runners(folder, backend, precision)


# ---------------------------------------------------------------------------------------
# Precision


def check_precision(backend: str, precision: str) -> None:
    """`ConfigError` for a precision the backend does not compute in."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                          f"{precision!r}.")
    if precision == "bf16" and backend not in BF16_BACKENDS:
        raise ConfigError(f"bf16 runs with the {' and '.join(BF16_BACKENDS)} backends; "
                          f"{backend}'s CPU kernels are float32 only.")


class Autocast(nn.Module):
    """A model whose forward runs under bf16 autocast, returning float32, with the
    attributes `apply_model` reads from the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sources = model.sources
        self.samplerate = model.samplerate
        self.audio_channels = model.audio_channels

    @property
    def segment(self) -> tp.Any:
        return self.model.segment

    @segment.setter
    def segment(self, value: tp.Any) -> None:
        self.model.segment = value

    @property
    def max_allowed_segment(self) -> float:
        return max_allowed_segment(self.model)

    def valid_length(self, length: int) -> int:
        valid = getattr(self.model, "valid_length", None)
        return length if valid is None else valid(length)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        with torch.autocast(mix.device.type, dtype=torch.bfloat16):
            return self.model(mix).float()


def autocast_models(model: nn.Module) -> nn.Module:
    """`model`, or each model of a bag, as an `Autocast`."""
    if isinstance(model, BagOfModels):
        return BagOfModels([Autocast(member) for member in model.models], model.weights)
    return Autocast(model)
