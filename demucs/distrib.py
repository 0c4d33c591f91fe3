"""Distributed training helpers, on top of `dora.distrib`.

Dora starts the workers (`dora run -d` on every GPU, `dora run -d --ddp_workers N` on
CPU) and gives each its rank through the environment; `init` then joins the process group
(NCCL on CUDA, gloo on CPU). Without several workers every function here is a no-op or the
identity, so the training loop has a single code path.
"""
from __future__ import annotations

import math
import os
import typing as tp
from contextlib import nullcontext

import torch
from dora import distrib as dora_distrib
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


def init() -> None:
    """Join the process group of the XP's workers (nothing to do with a single worker).

    CPU workers on one machine share its cores: unless OMP_NUM_THREADS says otherwise,
    each gets its share of torch's threads (otherwise every worker would start one thread
    per core, and they would slow each other down several times over).
    """
    cuda = torch.cuda.is_available()
    dora_distrib.init("nccl" if cuda else "gloo")
    if is_distributed() and not cuda and "OMP_NUM_THREADS" not in os.environ:
        spec = dora_distrib.get_distrib_spec()
        local_workers = max(1, spec.world_size // spec.num_nodes)
        torch.set_num_threads(max(1, torch.get_num_threads() // local_workers))


def close() -> None:
    """Leave the process group, so that its threads end before the interpreter does (a
    worker exiting with them alive may abort: "terminate called without an active
    exception", and Dora then reports a dead worker after a finished training)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    return dora_distrib.rank()


def world_size() -> int:
    return dora_distrib.world_size()


def is_master() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def wrap(model: nn.Module) -> nn.Module:
    """`model` wrapped for DistributedDataParallel when there are several workers.

    The gradients are views into DDP's all-reduce buckets rather than copies of them: the
    same values, one copy of the gradients less per worker (83.6 M parameters: 334 MB)."""
    if not is_distributed():
        return model
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[device], output_device=device,
                                       gradient_as_bucket_view=True)
    return DistributedDataParallel(model, gradient_as_bucket_view=True)


def local_gradients(model: nn.Module, active: bool = True) -> tp.ContextManager:
    """Around the forward and backward of a batch whose gradients only accumulate (no
    optimizer step after it, `active`): no all-reduce for it. The all-reduce of the next
    step's backward averages the accumulated sums, which is the same average up to
    rounding, with one exchange of the gradients per optimizer step instead of one per
    batch (`optim.accumulate`)."""
    if active and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, in order: each example seen exactly once.

    Unlike `DistributedSampler`, it does not repeat examples to even out the shards, so
    that metrics averaged with their counts (`average`) are exact.
    """

    def __init__(self, dataset: tp.Sized, rank: int, world_size: int):
        self.indexes = range(rank, len(dataset), world_size)

    def __iter__(self) -> tp.Iterator[int]:
        return iter(self.indexes)

    def __len__(self) -> int:
        return len(self.indexes)


def loader(dataset: Dataset, *args: tp.Any, shuffle: bool = False,
           klass: type = DataLoader, **kwargs: tp.Any) -> tp.Any:
    """A data loader giving each worker its share of `dataset`.

    Distributed, a shuffled loader uses a `DistributedSampler` (call `set_epoch` on its
    sampler every epoch for a new order), an ordered one a `ShardSampler`.
    """
    if not is_distributed():
        return klass(dataset, *args, shuffle=shuffle, **kwargs)
    sampler: Sampler[int]
    if shuffle:
        sampler = DistributedSampler(dataset, drop_last=bool(kwargs.get("drop_last", False)))
    else:
        sampler = ShardSampler(tp.cast(tp.Sized, dataset), rank(), world_size())
    return klass(dataset, *args, sampler=sampler, **kwargs)


def _device() -> str:
    """Where collective operations take their tensors: the GPU under NCCL."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def total(value: float) -> float:
    """`value` summed over the workers: NaN or infinite when it is on any of them."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], device=_device(), dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return float(tensor.item())


def average(metrics: tp.Mapping[str, float],
            counts: tp.Mapping[str, float]) -> dict[str, float]:
    """Average `metrics` over the workers, each metric of each worker weighted by its count
    in `counts` (of batches or examples); NaN for a metric no worker counted.

    Every worker must call it; a worker that saw no example (e.g. fewer validation tracks
    than workers) may pass no metrics.
    """
    if not is_distributed():
        return dict(metrics)
    gathered: list[tp.Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, list(metrics))
    keys = list(dict.fromkeys(key for names in gathered for key in names))
    weights = [float(counts.get(key, 0)) if key in metrics else 0. for key in keys]
    sums = [float(metrics[key]) * weight if weight else 0.
            for key, weight in zip(keys, weights)]
    tensor = torch.tensor([sums, weights], device=_device(), dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    totals = tensor.cpu().tolist()
    return {key: total / weight if weight else math.nan
            for key, total, weight in zip(keys, totals[0], totals[1])}
