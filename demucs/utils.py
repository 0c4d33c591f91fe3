"""Small helpers shared by the models, inference and training (tensors, files, `capture_init`)."""
from __future__ import annotations

import ctypes
import functools
import math
import os
import tempfile
import typing as tp
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn import functional as F


def capture_init(init: tp.Callable) -> tp.Callable:
    """Decorate `__init__` to record its args and kwargs in `self._init_args_kwargs`.

    Packages (`states.serialize_model`) store them, so a model rebuilds without its config.
    """
    @functools.wraps(init)
    def __init__(self: tp.Any, *args: tp.Any, **kwargs: tp.Any) -> None:
        self._init_args_kwargs = (args, kwargs)
        init(self, *args, **kwargs)

    return __init__


def center_trim(tensor: torch.Tensor, reference: tp.Union[torch.Tensor, int]) -> torch.Tensor:
    """Trim `tensor` symmetrically on its last axis to the length of `reference`.

    `reference` is a tensor (its last dimension is used) or a length. When the difference
    is odd, the extra sample is removed on the right.
    """
    ref_size = reference.size(-1) if isinstance(reference, torch.Tensor) else int(reference)
    delta = tensor.size(-1) - ref_size
    if delta < 0:
        raise ValueError(f"center_trim: tensor of length {tensor.size(-1)} is shorter than "
                         f"the reference length {ref_size}.")
    if delta:
        tensor = tensor[..., delta // 2: tensor.size(-1) - (delta - delta // 2)]
    return tensor


def unfold(a: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Frame the last axis of `a` (..., T) into (..., n_frames, kernel_size).

    The input is zero padded on the right so that every frame is full; there are
    ceil(T / stride) frames. The result is a strided view of the padded tensor.
    """
    *shape, length = a.shape
    n_frames = math.ceil(length / stride)
    target = (n_frames - 1) * stride + kernel_size
    a = F.pad(a, (0, target - length)).contiguous()
    strides = list(a.stride())
    strides = strides[:-1] + [stride, 1]
    return a.as_strided([*shape, n_frames, kernel_size], strides)


T = tp.TypeVar("T")


def made_once(function: tp.Callable[..., T]) -> functools._lru_cache_wrapper[T]:
    """`function` of hashable arguments (sizes, a device, a dtype) computed once per
    arguments: the constant tensors of a model's forward (windows, kernels, embeddings),
    made on the CPU and copied to the device once, where a copy at each call would make
    a GPU step wait for the device. They are made outside inference mode, so that one
    first made during a separation still serves a training step after."""

    @functools.lru_cache(maxsize=64)
    @functools.wraps(function)
    def made(*args: tp.Any) -> T:
        with torch.inference_mode(False), torch.no_grad():
            return function(*args)
    return made


@functools.lru_cache(maxsize=None)
def _glibc() -> tp.Optional[ctypes.CDLL]:
    """The C library when it is glibc (it has `malloc_trim`), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc; a no-op elsewhere).

    Separating a long track allocates and frees many buffers of a few MB to a few hundred
    MB. glibc serves those under 32 MB from its heap, where freed blocks stay resident
    between longer-lived ones: a fragmented heap that grows from segment to segment and
    adds up to half to the peak memory. The lean inference path calls this after each
    large layer (`demucs.lean.release_freed_memory`), and `apply_model` after each chunk
    (bench/README.md).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt parameters and their defaults
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
# From this size on, a separation's buffers are mapped each on its own (`map_large_buffers`)
SEPARATION_MMAP_THRESHOLD = 16 * 2 ** 20
THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"  # torch: its CPU tensors of 2 MB or more in huge pages


def map_large_buffers() -> None:
    """For the rest of the process, the C heap maps every buffer of 16 MB or more on pages
    of its own, and torch puts its large CPU tensors on transparent huge pages (Linux).

    glibc's own threshold moves up to 32 MB as buffers are freed, so a separation's 16 to
    32 MB activations come from its heap, where they land in different places from one
    segment to the next: the peak of a forward scattered by 100 to 130 MB, and a 600 s
    track peaked 1.15 to 1.29 times as high as a 60 s one. Mapped each on its own, the
    forwards peak alike (600 s: 1.07 times 60 s); the fresh pages they then take would
    cost 1.2 million page faults a forward in 4 KB pages (6 % more time), but in 2 MB
    huge pages the separation is as fast as before or faster (bench/README.md).

    The `demucs` command calls this with the torch backend only: onnxruntime and OpenVINO
    do not ask for huge pages, and their buffers then took fresh 4 KB pages at every chunk
    (the command 2 to 5 % slower with them). torch reads `THP_VARIABLE` at its first
    allocation: call this before making any tensor. What the user sets
    (MALLOC_MMAP_THRESHOLD_, THP_MEM_ALLOC_ENABLE) is kept.
    """
    os.environ.setdefault(THP_VARIABLE, "1")
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, SEPARATION_MMAP_THRESHOLD)


@contextmanager
def freed_memory_kept() -> tp.Iterator[None]:
    """Within: the C heap serves every allocation and keeps what is freed for the next.

    A training step allocates and frees the same large buffers as the step before. glibc
    serves the large ones with fresh pages from the system and gives them back when they
    are freed, so every step page-faults its whole working set again: for an HDemucs on
    the CPU, a fifth of the step's CPU time went to the kernel. Kept, the pages are
    faulted once; the cost is a peak 10 to 15 % higher (bench/README.md). Left alone
    where the C library is not glibc, or where the user sets MALLOC_MMAP_MAX_ or
    MALLOC_TRIM_THRESHOLD_ in the environment.
    """
    libc = _glibc()
    if libc is None or {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # read as the largest size: never trim
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        trim_heap()


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Make `peak_memory(device)` count from now: the CUDA allocator's peak on a GPU, the
    process's peak resident memory elsewhere (Linux; where it cannot be reset, the peak
    stays the process's since it started)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        PROC_CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def peak_memory(device: torch.device) -> tp.Optional[float]:
    """In GiB, since `reset_peak_memory(device)`: on a GPU what PyTorch's allocator
    reserved (what the next allocation competes with, unlike what tensors held), elsewhere
    the process's peak resident memory (Linux `VmHWM`); None where the system does not
    say."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2 ** 30
    try:
        lines = PROC_STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20  # kB
    return None


class DummyPoolExecutor:
    """Same interface as `concurrent.futures` executors, but runs jobs when asked."""

    class DummyResult:
        def __init__(self, func: tp.Callable, *args: tp.Any, **kwargs: tp.Any):
            self.func = func
            self.args = args
            self.kwargs = kwargs

        def result(self) -> tp.Any:
            return self.func(*self.args, **self.kwargs)

    def __init__(self, workers: int = 0):
        pass

    def submit(self, func: tp.Callable, *args: tp.Any, **kwargs: tp.Any) -> "DummyResult":
        return DummyPoolExecutor.DummyResult(func, *args, **kwargs)

    def __enter__(self) -> "DummyPoolExecutor":
        return self

    def __exit__(self, exc_type: tp.Any, exc_value: tp.Any, exc_tb: tp.Any) -> None:
        return


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether the CPU computes bf16 dot products natively (x86 `avx512_bf16` or
    `amx_bf16`, Arm `bf16`), from the flags Linux lists in `cpuinfo`; None where it
    lists none (another system)."""
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        return None
    flags = {flag for line in lines if line.partition(":")[0].strip() in ("flags", "Features")
             for flag in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) if flags else None


@contextmanager
def atomic_path(path: tp.Union[str, os.PathLike], mode: int = 0o644) -> tp.Iterator[Path]:
    """Yield a temporary path next to `path`; once the block succeeds, the file written
    there is synced and renamed to `path`. Readers, and a crash, see either the previous
    file or the complete new one; on error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(mode)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TrainingChunk:
    """For models built for one chunk length, their `segment` (seconds; MSST's
    `audio.chunk_size`): they never separate longer chunks (`max_allowed_segment`, which
    `apply_model` and `demucs --segment` respect), shorter ones are padded to it
    (`valid_length`, as MSST pads its last chunk), and a config's `segment` defaults to
    `dset.segment` (`models.model_on_chunks`)."""
    segment: tp.Any  # float or Fraction
    samplerate: int

    @property
    def max_allowed_segment(self) -> float:
        return float(self.segment)

    def valid_length(self, length: int) -> int:
        """The length a chunk of `length` samples is padded to (longer: left as is)."""
        return max(length, int(self.segment * self.samplerate))
