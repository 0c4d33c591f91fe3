"""What a training forward keeps for the backward, by dtype and by module.

The memory of a training step is mostly the tensors autograd keeps between the forward
and the backward. This counts them without a GPU: one forward of the full-size models
(random weights, `--batch` examples of `--seconds` s, train mode) under
`torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters left out, in
float32 and under bf16 autocast. With `--cuda-path`, the group norms take the path they
take on CUDA (`demucs.norm`), so that the figures are those of a GPU step, up to the
operators whose autocast rules differ between the CPU and CUDA.

    python bench/bench_saved.py [--models hdemucs demucs htdemucs] [--amps float32 bf16]
        [--batch 1] [--seconds 7.8] [--cuda-path] [--top 8]
"""
from __future__ import annotations

import argparse
import collections
import re
import typing as tp
from contextlib import nullcontext

import torch

from demucs import norm

from bench_separation import build

MB = 2 ** 20


def module_paths(model: torch.nn.Module) -> tp.Callable[[], str]:
    """Forward hooks on every module; the returned function names the innermost module
    running now, its layer indices collapsed (`encoder.N.dconv.layers.N.5`)."""
    stack: list[str] = []
    for path, module in model.named_modules():
        name = re.sub(r"^(\w+)\.\d+", r"\1.N", path)
        name = re.sub(r"(layers(?:_t)?)\.\d+(?=\.|$)", r"\1.N", name) or "<model>"
        module.register_forward_pre_hook(lambda mod, args, name=name: stack.append(name))
        module.register_forward_hook(lambda mod, args, out: stack.pop() and None)
    return lambda: stack[-1] if stack else "<outside>"


def kept_for_backward(model: torch.nn.Module, mix: torch.Tensor,
                      amp: str) -> collections.Counter[tuple[str, str]]:
    """Bytes kept for the backward by one forward, by (dtype, module)."""
    where = module_paths(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen[key] = (storage.nbytes(), str(t.dtype).replace("torch.", ""), where())
        return t

    cast = (torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        model(mix)
    kept: collections.Counter[tuple[str, str]] = collections.Counter()
    for size, dtype, module in seen.values():
        kept[dtype, module] += size
    return kept


def report(name: str, amp: str, kept: collections.Counter[tuple[str, str]],
           top: int) -> None:
    by_dtype: collections.Counter[str] = collections.Counter()
    for (dtype, _), size in kept.items():
        by_dtype[dtype] += size
    dtypes = ", ".join(f"{dtype} {size / MB:.0f}" for dtype, size in by_dtype.most_common())
    print(f"{name} {amp}: {sum(kept.values()) / MB:.0f} MB kept ({dtypes})", flush=True)
    for (dtype, module), size in kept.most_common(top):
        print(f"  {size / MB:8.1f} MB {dtype:9s} {module}")


def main(argv: tp.Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["hdemucs", "demucs", "htdemucs"])
    parser.add_argument("--amps", nargs="+", choices=["float32", "bf16"],
                        default=["float32", "bf16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=7.8)
    parser.add_argument("--cuda-path", action="store_true",
                        help="the group norms take their CUDA path")
    parser.add_argument("--top", type=int, default=8, help="modules listed per line")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cuda_path:
        norm.FAST_DEVICES = ("cuda", "cpu")
    torch.manual_seed(0)
    mix = torch.randn(args.batch, 2, int(args.seconds * 44100))
    for name in args.models:
        for amp in args.amps:
            model = build(name).train()
            report(name, amp, kept_for_backward(model, mix, amp), args.top)


if __name__ == "__main__":
    main()
