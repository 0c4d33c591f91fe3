"""Could the group norms of a bf16 step skip their float32 copies?

On their CUDA path (`demucs.norm`), under bf16 the group norms compute their statistics
and their backward in float32: the backward copies the incoming gradient and the saved
bf16 input to float32, runs PyTorch's group norm backward kernel, and casts the input's
gradient back, three full-size copies per norm (about 120 of a bf16 HDemucs step's casts).
This times that path against the same kernel given the bf16 tensors with float32
statistics and affine parameters directly, where the device's kernel accepts such mixed
dtypes, and reports each one's error against a float64 reference (largest absolute
difference over the reference's largest magnitude); likewise for the forward's
statistics. Shapes are those of HDemucs' and Demucs' norms at batch 4 x 7.8 s (CUDA) or
small ones (CPU, where the question does not arise: the CPU path keeps PyTorch's norms).

    python bench/bench_group_norm.py [--device cuda|cpu] [--reps 20]
"""
from __future__ import annotations

import argparse
import time
import typing as tp

import torch

# (rows, channels, length, groups): HDemucs' freq-branch DConv rows (B x F, C, T) at two
# widths, its time-branch layers, and a Demucs encoder layer
CUDA_SHAPES = [(2048, 12, 336, 1), (2048, 48, 336, 1), (4, 96, 86016, 4),
               (4, 384, 10752, 4), (4, 48, 172032, 4)]
CPU_SHAPES = [(64, 12, 336, 1), (4, 96, 4096, 4)]
Tensors = tp.Tuple[torch.Tensor, ...]


def timed(fn: tp.Callable[[], object], device: torch.device, reps: int) -> float:
    """Mean milliseconds of `fn` over `reps` calls after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - begin) / reps * 1e3


def error(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().clamp_min(1e-30)
    return float((value.double() - reference).abs().max() / scale)


def compare(name: str, cast: tp.Callable[[], Tensors], mixed: tp.Callable[[], Tensors],
            references: Tensors, device: torch.device, reps: int) -> str:
    """One line: the cast path's time and errors, then the mixed-dtype kernel's, or why
    the device's kernel refused it."""
    errors = "/".join(f"{error(v, r):.1e}" for v, r in zip(cast(), references))
    cast_ms = timed(cast, device, reps)
    line = f"  {name}: float32 copies {cast_ms:.3f} ms (error {errors})"
    try:
        got = mixed()
    except RuntimeError as refusal:
        return line + f"; mixed dtypes refused: {str(refusal).splitlines()[0][:160]}"
    mixed_ms = timed(mixed, device, reps)
    errors = "/".join(f"{error(v, r):.1e}" for v, r in zip(got, references))
    return (line + f"; mixed dtypes {mixed_ms:.3f} ms (error {errors}, "
            f"{'/'.join(str(v.dtype).replace('torch.', '') for v in got)}), "
            f"speed-up x{cast_ms / mixed_ms:.2f}")


def bench_shape(rows: int, channels: int, length: int, groups: int, device: torch.device,
                reps: int) -> list[str]:
    x = torch.randn(rows, channels, length, device=device).bfloat16()
    grad = torch.randn(rows, channels, length, device=device).bfloat16()
    weight = torch.randn(channels, device=device) * 0.5 + 1
    bias = torch.randn(channels, device=device) * 0.1
    var, mean = torch.var_mean(x.reshape(rows, groups, -1).float(), dim=-1, correction=0)
    rstd = (var + 1e-5).rsqrt()
    size = (rows, channels, length, groups)
    mask = [True, True, True]
    backward = torch.ops.aten.native_group_norm_backward
    forward = torch.ops.aten.native_group_norm

    def backward_cast() -> Tensors:  # as demucs.norm runs it under bf16
        dx, dw, db = backward(grad.float(), x.float(), mean, rstd, weight, *size, mask)
        return dx.to(x.dtype), dw, db

    def backward_mixed() -> Tensors:
        return tuple(backward(grad, x, mean, rstd, weight, *size, mask))

    def stats_cast() -> Tensors:
        var, mean = torch.var_mean(x.reshape(rows, groups, -1).float(), dim=-1, correction=0)
        return mean, (var + 1e-5).rsqrt()

    def stats_mixed() -> Tensors:  # the kernel's output comes along with the statistics
        _, mean, rstd = forward(x, weight, bias, *size, 1e-5)
        return mean, rstd

    var64, mean64 = torch.var_mean(x.double().reshape(rows, groups, -1), dim=-1, correction=0)
    rstd64 = (var64 + 1e-5).rsqrt()
    references = tuple(backward(grad.double(), x.double(), mean64, rstd64, weight.double(),
                                *size, mask))
    return [f"{size} (rows, channels, length, groups):",
            compare("backward", backward_cast, backward_mixed, references, device, reps),
            compare("statistics", stats_cast, stats_mixed, (mean64, rstd64), device, reps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"Group norm, bf16 activations: float32 copies against mixed dtypes ({name}, "
          f"torch {torch.__version__})")
    for shape in CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES:
        for line in bench_shape(*shape, device, args.reps):
            print(line, flush=True)


if __name__ == "__main__":
    main()
