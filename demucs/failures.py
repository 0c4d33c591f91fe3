"""Why a training stops, in one line: what happened, what the XP keeps, what to change.

The solver raises a `TrainingError` made here when it cannot go on: out of device
memory (in training, validation or test), a loss that is not finite, an fp16 epoch
without a single finite loss, or a checkpoint that cannot be written. Each line ends
with the checkpoint kept (`kept`), so that the user knows the same command resumes.
"""
from __future__ import annotations

import typing as tp
from contextlib import contextmanager
from pathlib import Path

import torch

from . import distrib
from .errors import TrainingError, one_line
from .utils import peak_memory


def kept(checkpoint_file: Path, epochs: int) -> str:
    """What a training stopped now leaves, after `epochs` checkpointed epochs."""
    if not epochs:
        return "no epoch was checkpointed"
    return f"the checkpoint of epoch {epochs} is kept in {checkpoint_file}"


def peak_memory_line(device: torch.device) -> str:
    """The peak memory so far, for log lines: on a GPU what PyTorch reserved out of the
    card's memory (where running out comes from), elsewhere the process's peak resident
    memory."""
    peak = peak_memory(device)
    if peak is None:
        return "unknown"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        return f"{peak:.1f} of the GPU's {total:.1f} GiB reserved"
    return f"{peak:.1f} GiB resident"


@contextmanager
def stopping_out_of_memory(message: tp.Callable[[], str]) -> tp.Iterator[None]:
    """Running out of device memory inside stops the training with `message()`
    (PyTorch's message and traceback as its cause, shown with `misc.verbose`)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise TrainingError(message()) from error


def out_of_memory(args: tp.Any, device: torch.device, where: str, stage: str,
                  model_segment: float, graphed: bool, kept: str) -> str:
    """The line for a `stage` ("train", "valid", "test") that ran out of memory `where`,
    with what to change: training holds a batch, validation and test one track (or
    segment of `model_segment` seconds) at a time; `graphed`: CUDA graphs are held."""
    if stage == "train":
        details, fixes = _train_memory(args)
    else:
        details, fixes = _evaluation_memory(args, stage, model_segment)
        if graphed:
            fixes.append("or set optim.cuda_graph=false (the training's CUDA graphs keep "
                         "their memory meanwhile)")
    if device.type == "cuda":
        details.append(peak_memory_line(device))
    return (f"{device.type} out of memory {where} ({', '.join(details)}): training "
            f"stopped, {kept}; {', '.join(fixes)}.")


def _train_memory(args: tp.Any) -> tuple[list[str], list[str]]:
    workers = distrib.world_size()
    details = [f"batch_size={args.batch_size}" + (
        f" ({args.batch_size // workers} per worker)" if workers > 1 else "")]
    fixes = ["lower batch_size (optim.accumulate=N keeps the examples per step)",
             "or dset.segment"]
    if not args.optim.amp:
        fixes.append("or train in bf16 (optim.amp=bf16)")
    return details, fixes


def _evaluation_memory(args: tp.Any, stage: str,
                       model_segment: float) -> tuple[list[str], list[str]]:
    # The keys that make the model run on segments rather than whole tracks.
    keys = [] if args.test.split else ["test.split=true"]
    if stage == "valid" and not args.valid_apply:
        keys.append("valid_apply=true")
    if keys:
        return ["whole tracks"], [f"set {' '.join(keys)} to run the model on segments"]
    return ([f"segments of {model_segment:.2f} s"],
            ["lower model_segment (the length of those segments, by default 4 * "
             "dset.segment)"])


def non_finite_loss(loss: float, epoch: int, batch: int, kept: str) -> TrainingError:
    """A NaN or infinite training loss at `epoch`, `batch` (0-based)."""
    return TrainingError(
        f"the training loss became {loss} at epoch {epoch + 1}, batch {batch + 1}: "
        f"training stopped, {kept}; lower optim.lr, set optim.clip_grad, or train in "
        "float32 (optim.amp=null).")


def fp16_overflow(epoch: int, kept: str) -> TrainingError:
    """fp16: no batch of `epoch` (0-based) had a finite loss."""
    return TrainingError(
        f"optim.amp=fp16: the training loss overflowed at every batch of epoch {epoch + 1}: "
        f"training stopped, {kept}; train in bf16 (optim.amp=bf16) or float32 "
        "(optim.amp=null).")


def save_failed(epoch: int, failure: tp.Optional[OSError], kept: str) -> TrainingError:
    """The checkpoints of `epoch` (0-based) could not be written, here (`failure`) or,
    when it is None, on the first worker."""
    what = (f"could not save epoch {epoch + 1}: {one_line(failure)}" if failure is not None
            else f"the first worker could not save epoch {epoch + 1}")
    return TrainingError(f"{what}: training stopped, {kept}; free some space and run the "
                         "same command to resume.")
