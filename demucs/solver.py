"""The training loop of an XP: train, validate, test, checkpoint, resume.

`Solver(loaders, model, optimizer, args, find_xp)` runs inside Dora's current XP
(`dora.get_xp()`), whose folder receives:
- `checkpoint.th`: everything needed to resume (see `demucs.checkpoints`; the parts are
  declared once, in `Solver._checkpoint_parts`), written atomically at the end of every
  epoch, so that a killed training resumes as if it had never stopped. A checkpoint
  written by the original Demucs resumes too (without its random generators);
- `checkpoint_<epoch>.th`: copies kept every `save_every` epochs;
- `best.th`: a model package (see `demucs.states`) of the best state so far, the one that
  the test set evaluates (`test.best`) and `tools.export` exports;
- `curves.png`: the training curves (see `demucs.curves`), redrawn after each epoch;
- `history.json` (through Dora's link): one entry per epoch,
  `{"train": {...}, "valid": {...}, "test": {...}}` (`test` only when the test set ran),
  with the original's keys (see docs/training.md).

The checkpoint is loaded when the solver is built (so `train.get_solver_from_sig(SIG)`
gives the trained weights and best state); without one, the weights come from
`continue_pretrained` (a model name in `pretrained_repo` or the remote repository, or the
path of a `.th` package) or
`continue_from` (another XP's signature, resolved by `find_xp`, or a checkpoint path).

Each epoch validates the live weights (`main`) then every EMA (`ema_batch_K`,
`ema_epoch_K`); a candidate replaces the current choice when its `test.metric` is strictly
better (keys starting with `nsdr` are maximised, the others minimised). The chosen
candidate's weights become the best state when its value is the best over all epochs so
far (always with `dset.train_valid`).
"""
from __future__ import annotations

import logging
import math
import random
import time
import typing as tp
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from dora import get_xp
from dora.log import LogProgress, bold
from omegaconf import OmegaConf
from torch import nn

from . import distrib
from .apply import BagOfModels, apply_model
from .augment import get_augmentations
from .checkpoints import VERSION, ema_key, get_rng_state, load_checkpoint, set_rng_state
from .curves import is_maximized, plot_history
from .ema import ModelEMA
from .errors import ConfigError, ModelLoadingError, TrainingError, one_line
from .evaluate import evaluate, get_test_set, new_sdr
from .quantize import get_quantizer
from .states import copy_state, save_atomic, serialize_model, swap_state
from .svd import svd_penalty
from .utils import cpu_has_bf16, peak_memory, reset_peak_memory
from .weights import package_overrides, state_mismatch

logger = logging.getLogger(__name__)

Metrics = dict[str, float]
State = dict[str, tp.Any]
EMA_KINDS = ("batch", "epoch")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # optim.amp
# Divergence stop (l1 loss): (first epoch index checked, largest valid reco allowed).
DIVERGENCE_LIMITS = ((100, 0.25), (180, 0.18))


# ---------------------------------------------------------------------------------------
# Metrics


class Averager:
    """Mean of metrics over the batches of a stage (each batch counts once; a metric only
    some batches have, like `grad` with gradient accumulation, over those batches).

    With `finite_only` (fp16 training, whose scaler skips the steps that overflow), a NaN
    or infinite value is left out of its metric's mean; a metric no batch had finite is
    NaN."""

    def __init__(self, finite_only: bool = False) -> None:
        self.finite_only = finite_only
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, metrics: tp.Mapping[str, float]) -> None:
        for key, value in metrics.items():
            kept = not self.finite_only or math.isfinite(value)
            self.sums[key] = self.sums.get(key, 0.) + (float(value) if kept else 0.)
            self.counts[key] = self.counts.get(key, 0) + kept

    def mean(self) -> Metrics:
        return {key: self.sums[key] / self.counts[key] if self.counts[key] else math.nan
                for key in sorted(self.sums)}

    def reduce(self) -> Metrics:
        """The mean over every distributed worker, each metric weighted by how many of
        their batches it counts."""
        return dict(sorted(distrib.average(self.mean(), self.counts).items()))


def _scalar(value: tp.Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def valid_metric_keys(sources: tp.Sequence[str]) -> list[str]:
    """The keys of each candidate's valid metrics, any of which `test.metric` may name."""
    keys = ["loss", "reco", "ms", "nsdr"]
    return keys + [f"{name}_{source}" for name in ("reco", "nsdr") for source in sources]


def check_metric(metric: str, sources: tp.Sequence[str]) -> None:
    """Fail at start-up when `test.metric` names no valid metric."""
    keys = valid_metric_keys(sources)
    if metric not in keys:
        raise ConfigError(f"test.metric={metric!r} is not a valid metric; choose one of: "
                          f"{', '.join(keys)}.")


def check_optim(optim: tp.Any, cuda: bool) -> None:
    """Fail at start-up on a bad `optim.amp` or `optim.accumulate`."""
    if optim.amp not in (None, *AMP_DTYPES):
        raise ConfigError(f"optim.amp={optim.amp!r} is not valid; choose one of: null "
                          f"(float32), {', '.join(AMP_DTYPES)}.")
    if optim.amp == "fp16" and not cuda:
        raise ConfigError("optim.amp=fp16 needs a CUDA GPU; on a CPU use optim.amp=bf16 "
                          "or null.")
    if not isinstance(optim.accumulate, int) or optim.accumulate < 1:
        raise ConfigError(f"optim.accumulate={optim.accumulate!r}: give a whole number of "
                          "batches per optimizer step, at least 1.")
    if optim.cuda_graph and not cuda:
        raise ConfigError("optim.cuda_graph=true needs a CUDA GPU; set it to false.")


def warn_emulated_bf16(amp: tp.Optional[str], device: torch.device) -> None:
    """bf16 on a CPU without bf16 instructions is emulated, a step 2 to 16 times slower
    than float32's (bench/README.md): said when training starts, not refused, as it
    still saves memory."""
    if amp == "bf16" and device.type == "cpu" and cpu_has_bf16() is False:
        logger.warning("optim.amp=bf16: this CPU has no bf16 instructions (no avx512_bf16, "
                       "amx_bf16 or Arm bf16 in /proc/cpuinfo), so a bf16 step runs 2 to 16 "
                       "times slower than a float32 one and only saves memory; train with "
                       "optim.amp=null.")


def check_cuda_graph(args: tp.Any, model: nn.Module) -> None:
    """Fail at start-up where the training step cannot be replayed as CUDA graphs: the
    graphs are captured once, so what the forward decides on the host at each call (the
    random draws of an HTDemucs' positional embedding, DiffQ's quantization) would stay
    as drawn at capture, and DDP's gradient exchange is not part of them."""
    if distrib.world_size() > 1:
        raise ConfigError("optim.cuda_graph=true trains on one GPU; drop -d, or set "
                          "optim.cuda_graph=false.")
    if args.quant.diffq or args.quant.qat:
        raise ConfigError("optim.cuda_graph=true does not go with quantization (quant.diffq, "
                          "quant.qat); set optim.cuda_graph=false.")
    transformer: tp.Any = getattr(model, "crosstransformer", None)
    if transformer is not None and (
            transformer.sin_random_shift
            or (transformer.emb == "cape" and transformer.cape_augment)):
        raise ConfigError("optim.cuda_graph=true would freeze the random positional shifts "
                          "of the cross-transformer (htdemucs.t_sin_random_shift, "
                          "t_cape_augment); set them off, or optim.cuda_graph=false.")


class GraphedStep:
    """A model's training forward and backward captured as CUDA graphs for the shape of
    `sample` (B, C, T) and replayed for every batch of that shape; other shapes (a last,
    smaller batch) and eval mode run the model eagerly. What a training step launches is
    thousands of small kernels (an LSTM's backward launches several per time step), so
    that an eager step at small batches is bound by the launches, not by the GPU.

    The parameters' gradients come out of the backward graph and are added to `.grad`,
    which is allocated here and from then on zeroed in place (gradient accumulation,
    clipping, the optimizer, EMAs and the loss stay eager). A parameter the loss does not
    reach thus has a zero gradient rather than none: Adam leaves it as it is, AdamW's
    weight decay shrinks it. Captured inside the solver's autocast, the graphs replay its
    casts.
    """

    def __init__(self, model: nn.Module, sample: torch.Tensor):
        self.shape = sample.shape
        self.model = model
        self.eager = model.forward
        torch.cuda.synchronize()
        try:  # replaces `model.forward` by the replay (eager again in eval mode)
            torch.cuda.make_graphed_callables(model, (sample.detach().clone(),),
                                              allow_unused_input=True)
        except (RuntimeError, AssertionError) as error:
            raise TrainingError(
                f"optim.cuda_graph: the training step of {type(model).__name__} could not "
                f"be captured as CUDA graphs ({one_line(error)}); set "
                "optim.cuda_graph=false.") from None
        for param in model.parameters():  # see `Solver._zero_grad`
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)

    def __call__(self, mix: torch.Tensor) -> torch.Tensor:
        if mix.shape != self.shape:
            return self.eager(mix)
        return self.model(mix)


def is_better(value: float, reference: float, metric: str) -> bool:
    """Whether `value` is strictly better than `reference` for `metric`."""
    return value > reference if is_maximized(metric) else value < reference


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `12.3s`."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


def format_metrics(metrics: tp.Mapping[str, tp.Any]) -> str:
    return " | ".join(f"{key.capitalize()}={value:.4f}" if isinstance(value, float)
                      else f"{key.capitalize()}={value}" for key, value in metrics.items()
                      if not isinstance(value, dict))


def _xp_reference(value: tp.Any) -> str:
    """`continue_from` as given: Hydra reads an all-digit signature as an integer."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ConfigError(f"continue_from={value!r} is not an XP signature or a checkpoint "
                          "path; quote it: continue_from=\"'SIG'\".")
    return f"{value:08d}" if isinstance(value, int) else str(value)


def _ema_state(ema: ModelEMA) -> State:
    return {"state": copy_state(ema.state), "count": ema.count}


@dataclass
class Part:
    """One named part of the checkpoint: how to save it and how to restore it."""
    save: tp.Callable[[], tp.Any]
    load: tp.Callable[[tp.Any], None]
    required: bool = True  # False for what the original's checkpoints lack


# ---------------------------------------------------------------------------------------
# The solver


class Solver:
    """Trains `model` with `optimizer` on `loaders` ({"train", "valid"}, or None to only
    load the XP's checkpoint), following the config `args` (see conf/config.yaml).
    `find_xp(SIG)` gives the folder of another XP (for `continue_from=SIG`)."""

    def __init__(self, loaders: tp.Optional[dict[str, tp.Any]], model: nn.Module,
                 optimizer: torch.optim.Optimizer, args: tp.Any,
                 find_xp: tp.Optional[tp.Callable[[str], Path]] = None):
        self.args = args
        self.loaders = loaders
        self.model = model
        self.optimizer = optimizer
        self.find_xp = find_xp
        self.device = next(iter(model.parameters())).device
        self.sources = list(args.dset.sources)
        self.weights = self._loss_weights()
        self._check_segment()
        self.quantizer = get_quantizer(model, args.quant, optimizer)  # before DDP
        self.dmodel = distrib.wrap(model)
        self.augment = get_augmentations(args).to(self.device)
        self.emas = {kind: [ModelEMA(model, decay, device=self.device)
                            for decay in args.ema[kind]] for kind in EMA_KINDS}
        self.penalty_rng = random.Random(args.seed)  # draws of svd.proba
        self.accumulate = int(args.optim.accumulate)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.optim.amp == "fp16")
        self.graphed: tp.Optional[GraphedStep] = None  # optim.cuda_graph, made at 1st batch
        if args.optim.cuda_graph:
            check_cuda_graph(args, model)
        xp = get_xp()
        self.folder = xp.folder
        self.xp_argv = list(xp.argv)
        self.link = xp.link
        self.history: list[dict[str, tp.Any]] = self.link.history
        self.checkpoint_file = self.folder / "checkpoint.th"
        self.best_file = self.folder / "best.th"
        self.best_state: tp.Optional[State] = None
        self.parts = self._checkpoint_parts()
        self._reset()

    # -- setup ----------------------------------------------------------------------

    def _checkpoint_parts(self) -> dict[str, Part]:
        """What `checkpoint.th` holds, declared once for saving and resuming."""
        parts = {
            "state": Part(lambda: copy_state(self.model.state_dict()), self._load_weights),
            "optimizer": Part(self.optimizer.state_dict, self.optimizer.load_state_dict),
            "best_state": Part(lambda: self.best_state, self._load_best_state),
            "history": Part(lambda: list(self.history), self._load_history),
            "rng": Part(get_rng_state, set_rng_state, required=False),
            "penalty_rng": Part(self.penalty_rng.getstate, self.penalty_rng.setstate,
                                required=False),
            "scaler": Part(self.scaler.state_dict, self.scaler.load_state_dict, required=False),
        }
        for kind, emas in self.emas.items():
            for index, ema in enumerate(emas):
                parts[ema_key(kind, index)] = Part(partial(_ema_state, ema), ema.load_state_dict)
        return parts

    def _loss_weights(self) -> torch.Tensor:
        weights = [float(weight) for weight in self.args.weights]
        if len(weights) != len(self.sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(f"weights={weights}: give one non-negative weight per source "
                              f"({', '.join(self.sources)}), not all zero.")
        return torch.tensor(weights, device=self.device)

    def _weighted(self, values: torch.Tensor) -> torch.Tensor:
        """`sum_s w_s * values_s / sum_s w_s` over the sources (last axis)."""
        return (values * self.weights).sum(-1) / self.weights.sum()

    def _check_segment(self) -> None:
        segment, shift = self.args.dset.segment, self.args.dset.shift
        if segment is not None and shift is not None and shift >= segment:
            raise ConfigError(f"dset.segment={segment} must be longer than dset.shift={shift}: "
                              "training examples are cropped by a random shift of up to "
                              "dset.shift seconds.")

    def _clear_hint(self) -> str:
        return " ".join(["dora run --clear"] + self.xp_argv)

    def _reset(self) -> None:
        """Resume from the XP's checkpoint, or start from another model if asked to."""
        if self.checkpoint_file.exists():
            self._resume(load_checkpoint(self.checkpoint_file))
        elif self.args.continue_pretrained:
            self._continue_pretrained(str(self.args.continue_pretrained))
        elif self.args.continue_from:
            self._continue_from(_xp_reference(self.args.continue_from))

    def _load_model_state(self, state: State, origin: tp.Any, hint: str,
                          what: str = "checkpoint") -> None:
        """Load `state` (from a `what`) into the model, or say which keys and shapes do
        not fit, with `hint` on what to do."""
        mismatch = state_mismatch(self.model.state_dict(), state, what)
        if mismatch:
            raise ModelLoadingError(f"{origin}: weights from a different model "
                                    f"({mismatch}); {hint}.")
        self.model.load_state_dict(state, strict=False)  # DiffQ's keys may be absent

    # Loaders of the checkpoint parts.

    def _resume_hint(self) -> str:
        return f"start the XP over with `{self._clear_hint()}`"

    def _load_weights(self, state: State) -> None:
        self._load_model_state(state, self.checkpoint_file, self._resume_hint())

    def _load_best_state(self, state: tp.Optional[State]) -> None:
        self.best_state = state

    def _load_history(self, history: list[dict[str, tp.Any]]) -> None:
        self.history[:] = history

    def _resume(self, package: State) -> None:
        version = package.get("version", VERSION)  # the original's have none
        if version != VERSION:
            raise ModelLoadingError(f"{self.checkpoint_file}: checkpoint of another version "
                                    f"({version}); {self._resume_hint()}.")
        for name, part in self.parts.items():
            if name not in package:
                if part.required:
                    raise ModelLoadingError(f"{self.checkpoint_file}: no {name!r} in the "
                                            f"checkpoint; {self._resume_hint()}.")
                continue
            try:
                part.load(package[name])
            except ValueError as error:  # a state that does not fit this XP's config
                raise ModelLoadingError(f"{self.checkpoint_file}: its {name!r} does not fit "
                                        f"({one_line(error)[:200]}); "
                                        f"{self._resume_hint()}.") from None
            except (KeyError, RuntimeError, TypeError) as error:  # maybe our bug: keep it
                raise ModelLoadingError(
                    f"{self.checkpoint_file}: loading its {name!r} failed "
                    f"({type(error).__name__}: {one_line(error)[:200]}); the file is kept as "
                    "it is. Run again with misc.verbose=true for the traceback, and report it "
                    "if the checkpoint was written by this version.") from error
        logger.info("Resuming from %s after %d epochs.", self.checkpoint_file,
                    len(self.history))

    def _continue_pretrained(self, name: str) -> None:
        """Start from the weights of a pretrained model: a name or signature in
        `pretrained_repo` (or the remote repository), or the path of a `.th` package."""
        from .pretrained import get_model as get_pretrained_model
        model = get_pretrained_model(name, repo=self.args.pretrained_repo)
        if isinstance(model, BagOfModels):
            if len(model.models) != 1:
                raise ConfigError(f"continue_pretrained={name} is a bag of "
                                  f"{len(model.models)} models; name a single model.")
            model = model.models[0]
        origin = f"continue_pretrained={name}"
        overrides = package_overrides(model, self.args)
        hint = (f"set {' '.join(overrides)} (the package's arguments)" if overrides else
                "choose a model built with the same architecture")
        self._load_model_state(model.state_dict(), origin, hint, what="package")
        if overrides:
            logger.warning("%s: the package was built with %s; this XP keeps its config.",
                           origin, " ".join(overrides))
        logger.info("Starting from the pretrained model %s.", name)

    def _parent_checkpoint(self, ref: str) -> Path:
        if Path(ref).is_file():
            return Path(ref)
        if self.find_xp is None:
            raise ConfigError(f"continue_from={ref}: no such checkpoint file.")
        path = self.find_xp(ref) / self.checkpoint_file.name
        if not path.is_file():
            trained = sorted(other.parent.name for other in
                             path.parent.parent.glob(f"*/{path.name}")) or ["none"]
            raise ConfigError(f"continue_from={ref}: XP {ref} has not trained yet (no "
                              f"{path}); train it first with `dora run -f {ref}`. XPs with "
                              f"a checkpoint: {', '.join(trained)}.")
        return path

    def _continue_from(self, ref: str) -> None:
        path = self._parent_checkpoint(ref)
        package = load_checkpoint(path)
        key = "best_state" if self.args.continue_best else "state"
        self._load_model_state(package[key], f"continue_from={ref}",
                               "the two XPs must use the same model architecture")
        if self.args.continue_opt:
            try:
                self.optimizer.load_state_dict(package["optimizer"])
            except ValueError as error:
                raise ModelLoadingError(f"continue_from={ref}: its optimizer state does not "
                                        f"fit ({one_line(error)}).") from None
        logger.info("Starting from the %s of %s.", key, path)

    # -- training loop --------------------------------------------------------------

    def train(self) -> None:
        """Train the remaining epochs, checkpointing after each one."""
        for epoch, metrics in enumerate(self.history):
            self._log_epoch(epoch, metrics, replay=True)
        if self.history and self._diverged(len(self.history) - 1, self.history[-1]["valid"]):
            logger.warning("Training stopped earlier: the model diverged.")
            return
        if len(self.history) >= self.args.epochs:
            logger.info("Training already done (%d epochs).", len(self.history))
        elif distrib.is_master():
            warn_emulated_bf16(self.args.optim.amp, self.device)
        first = len(self.history)
        begin = time.monotonic()
        for epoch in range(first, self.args.epochs):
            reset_peak_memory(self.device)
            metrics, stop = self._run_epoch(epoch)
            self.link.push_metrics(metrics)
            self._save(epoch)
            if stop:
                break
            per_epoch = (time.monotonic() - begin) / (epoch + 1 - first)
            left = self.args.epochs - epoch - 1
            logger.info("Epoch %d done | %s per epoch | peak memory %s | XP ETA %s "
                        "(%d epochs left)", epoch + 1, format_duration(per_epoch),
                        self._peak_memory(), format_duration(per_epoch * left), left)

    def _run_epoch(self, epoch: int) -> tuple[dict[str, tp.Any], bool]:
        """The metrics of one epoch, and whether training stops after it."""
        metrics: dict[str, tp.Any] = {"train": self._train_stage(epoch)}
        with self._stopping_out_of_memory(f"in the validation of epoch {epoch + 1}", "valid"):
            metrics["valid"] = self._valid_stage(epoch)
        diverged = self._diverged(epoch, metrics["valid"])
        if diverged:
            logger.warning("Valid reco %.4f at epoch %d: the model diverged, stopping.",
                           metrics["valid"]["main"]["reco"], epoch + 1)
        is_last = diverged or epoch == self.args.epochs - 1
        if is_last or self._is_test_epoch(epoch):
            with self._stopping_out_of_memory(f"in the test of epoch {epoch + 1}", "test"):
                metrics["test"] = self._test_stage(
                    compute_sdr=bool(self.args.test.sdr and is_last))
        self._log_epoch(epoch, metrics)
        return metrics, diverged

    def _diverged(self, epoch: int, valid: tp.Mapping[str, tp.Any]) -> bool:
        """Divergence with the l1 loss: the live model's valid reco above a limit."""
        if self.args.optim.loss != "l1" or "main" not in valid:
            return False
        reco = valid["main"]["reco"]
        return any(epoch >= start and reco > limit for start, limit in DIVERGENCE_LIMITS)

    def _log_epoch(self, epoch: int, metrics: tp.Mapping[str, Metrics],
                   replay: bool = False) -> None:
        prefix = "Replay | " if replay else ""
        for stage in ("train", "valid", "test"):
            if stage in metrics:
                summary = format_metrics(metrics[stage])
                logger.info(bold(f"{prefix}{stage.capitalize()} Summary | Epoch {epoch + 1} | "
                                 f"{summary}"))

    def _is_test_epoch(self, epoch: int) -> bool:
        every = self.args.test.every
        return bool(every and (epoch + 1) % every == 0)

    # -- batches --------------------------------------------------------------------

    def _loader(self, name: str) -> tp.Any:
        if self.loaders is None:
            raise RuntimeError("This solver was built with model_only=True: no data.")
        return self.loaders[name]

    def _batches(self, loader: tp.Any, name: str) -> LogProgress:
        """The batches of an epoch: all of them, or the first `max_batches + 1`."""
        total = len(loader)
        if self.args.max_batches is not None:
            total = min(total, int(self.args.max_batches) + 1)
        return LogProgress(logger, islice(loader, total), total=total,
                           updates=self.args.misc.num_prints, name=name)

    def _reco_losses(self, estimate: torch.Tensor,
                     sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per source (S,): the loss that is optimised, and the `reco` that is logged.

        l1: both are the mean absolute error. mse: the loss is the mean over the batch of
        each example's mean squared error, `reco` the mean over the batch of its root.
        """
        if estimate.shape != sources.shape:
            raise RuntimeError(f"The model returned {tuple(estimate.shape)} for sources of "
                               f"shape (B, S, C, T)={tuple(sources.shape)}.")
        if self.args.optim.loss == "l1":
            loss = F.l1_loss(estimate, sources, reduction="none").mean(dim=(2, 3)).mean(0)
            return loss, loss
        if self.args.optim.loss == "mse":
            per_example = F.mse_loss(estimate, sources, reduction="none").mean(dim=(2, 3))
            return per_example.mean(0), per_example.sqrt().mean(0)
        raise ConfigError(f"optim.loss={self.args.optim.loss!r} is not valid; "
                          "choose one of: l1, mse.")

    def _batch_metrics(self, estimate: torch.Tensor,
                       sources: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """The loss of a batch (with the DiffQ size penalty) and its metrics."""
        losses, recos = self._reco_losses(estimate, sources)
        loss = self._weighted(losses)
        size = self.quantizer.model_size() if self.quantizer is not None else 0.
        if self.args.quant.diffq:
            loss = loss + self.args.quant.diffq * size
        metrics = {"reco": _scalar(self._weighted(recos)), "ms": _scalar(size)}
        metrics.update({f"reco_{source}": _scalar(reco)
                        for source, reco in zip(self.sources, recos)})
        return loss, metrics

    # -- train stage ----------------------------------------------------------------

    def _train_stage(self, epoch: int) -> Metrics:
        loader = self._loader("train")
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        if len(loader) == 0:
            raise ConfigError(f"The train set has {len(loader.dataset)} examples: not one "
                              f"batch of batch_size={self.args.batch_size}; lower batch_size or "
                              "dset.segment, or add tracks.")
        self.dmodel.train()
        self.augment.train()
        self._zero_grad()
        averager = Averager(finite_only=self.scaler.is_enabled())
        progress = self._batches(loader, f"Train | Epoch {epoch + 1}")
        begin, total = time.monotonic(), progress.total
        for index, sources in enumerate(progress):
            start = index - index % self.accumulate  # of this batch's optimizer step
            group = min(self.accumulate, total - start)  # a last one may be shorter
            with self._stopping_out_of_memory(f"at epoch {epoch + 1}, batch {index + 1}"):
                averager.update(self._train_step(sources, group, (epoch, index)))
            eta = (time.monotonic() - begin) / (index + 1) * (total - index - 1)
            progress.update(**{key: f"{value:.4f}" for key, value in averager.mean().items()},
                            eta=format_duration(eta))
        for ema in self.emas["epoch"]:
            ema.update()
        metrics = averager.reduce()
        if self.scaler.is_enabled() and math.isnan(metrics["loss"]):  # no finite loss
            raise TrainingError(
                f"optim.amp=fp16: the training loss overflowed at every batch of epoch "
                f"{epoch + 1}: training stopped, {self._kept()}; train in bf16 "
                "(optim.amp=bf16) or float32 (optim.amp=null).")
        return metrics

    def _autocast(self) -> tp.ContextManager:
        """Mixed precision (`optim.amp`) for the forward and the loss (without autocast's
        cache of cast weights under CUDA graphs, which would outlive the capture)."""
        if not self.args.optim.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.args.optim.amp],
                              cache_enabled=not self.args.optim.cuda_graph)

    def _forward(self, mix: torch.Tensor) -> torch.Tensor:
        """The model's training forward, replayed from CUDA graphs with `optim.cuda_graph`
        (captured at the first batch; a batch of another shape runs eagerly)."""
        if not self.args.optim.cuda_graph:
            return self.dmodel(mix)
        if self.graphed is None:
            self.graphed = GraphedStep(self.model, mix)
        return self.graphed(mix)

    def _train_step(self, sources: torch.Tensor, group: int,
                    where: tuple[int, int]) -> Metrics:
        """Forward and backward of one batch of an optimizer step over `group` batches
        (its loss scaled by 1/group); the step itself after the group's last batch."""
        step = where[1] % self.accumulate == group - 1  # the group's last batch
        sources = self.augment(sources.to(self.device))  # (B, S, C, T)
        mix = sources.sum(dim=1)  # (B, C, T)
        with distrib.local_gradients(self.dmodel, active=not step):
            with self._autocast():
                estimate = self._forward(mix).float()
                loss, metrics = self._batch_metrics(estimate, sources)
            svd = self.args.svd
            if svd.penalty > 0:  # of the float32 weights, in float32 whatever optim.amp
                penalty = self._svd_penalty(exact=False)
                metrics["penalty"] = _scalar(penalty)
                loss = loss + svd.penalty * penalty
            metrics["loss"] = loss.item()
            self._check_finite(metrics["loss"], where)
            if group > 1:
                loss = loss / group
            self.scaler.scale(loss).backward()
        if step:
            metrics.update(self._optimizer_step())
        return metrics

    def _check_finite(self, loss: float, where: tuple[int, int]) -> None:
        """Stop on a NaN or infinite loss (fp16 leaves those steps to its scaler). With
        several workers, all stop together when the loss of any of them is not finite
        (alone, the others would wait for its gradients until a timeout)."""
        if self.scaler.is_enabled():
            return
        loss = distrib.total(loss)
        if math.isfinite(loss):
            return
        epoch, batch = where
        raise TrainingError(
            f"the training loss became {loss} at epoch {epoch + 1}, batch {batch + 1}: "
            f"training stopped, {self._kept()}; lower optim.lr, set optim.clip_grad, or "
            "train in float32 (optim.amp=null).")

    @contextmanager
    def _stopping_out_of_memory(self, where: str, stage: str = "train") -> tp.Iterator[None]:
        """Running out of device memory stops the training with one line (PyTorch's
        message and traceback as its cause, shown with `misc.verbose`)."""
        try:
            yield
        except torch.OutOfMemoryError as error:
            raise TrainingError(self._out_of_memory(where, stage)) from error

    def _out_of_memory(self, where: str, stage: str) -> str:
        """The line for a stage that ran out of device memory `where`, with what to change:
        training holds a batch, validation and test one track (or segment) at a time."""
        if stage == "train":
            workers = distrib.world_size()
            details = [f"batch_size={self.args.batch_size}" + (
                f" ({self.args.batch_size // workers} per worker)" if workers > 1 else "")]
            fixes = ["lower batch_size (optim.accumulate=N keeps the examples per step)",
                     "or dset.segment"]
            if not self.args.optim.amp:
                fixes.append("or train in bf16 (optim.amp=bf16)")
        else:  # the keys that make the model run on segments rather than whole tracks
            keys = [] if self.args.test.split else ["test.split=true"]
            if stage == "valid" and not self.args.valid_apply:
                keys.append("valid_apply=true")
            if keys:
                details = ["whole tracks"]
                fixes = [f"set {' '.join(keys)} to run the model on segments"]
            else:
                details = [f"segments of {self.model.segment:.2f} s"]
                fixes = ["lower model_segment (the length of those segments, by default 4 "
                         "* dset.segment)"]
            if self.graphed is not None:
                fixes.append("or set optim.cuda_graph=false (the training's CUDA graphs "
                             "keep their memory meanwhile)")
        if self.device.type == "cuda":
            details.append(self._peak_memory())
        return (f"{self.device.type} out of memory {where} ({', '.join(details)}): training "
                f"stopped, {self._kept()}; {', '.join(fixes)}.")

    def _peak_memory(self) -> str:
        """The epoch's peak memory so far, for log lines: on a GPU what PyTorch reserved
        out of the card's memory (where running out comes from), elsewhere the process's
        peak resident memory."""
        peak = peak_memory(self.device)
        if peak is None:
            return "unknown"
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory / 2 ** 30
            return f"{peak:.1f} of the GPU's {total:.1f} GiB reserved"
        return f"{peak:.1f} GiB resident"

    def _kept(self, epochs: tp.Optional[int] = None) -> str:
        """What a training stopped now leaves: the checkpoint of its last complete epoch
        (of epoch `epochs` when given, for a stop while the next one is being saved)."""
        epochs = len(self.history) if epochs is None else epochs
        if not epochs:
            return "no epoch was checkpointed"
        return f"the checkpoint of epoch {epochs} is kept in {self.checkpoint_file}"

    def _optimizer_step(self) -> Metrics:
        """One optimizer step from the accumulated gradients, then the batch EMAs (not
        after a step that fp16's scaler skipped)."""
        self.scaler.unscale_(self.optimizer)
        metrics = {"grad": self._clip_gradients()}
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # fp16: a step with inf/NaN gradients is skipped (and the scale lowered)
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        if self.scaler.is_enabled():
            metrics["skipped"] = float(skipped)
        self._zero_grad()
        if not skipped:  # the batch EMAs follow the steps taken
            for ema in self.emas["batch"]:
                ema.update()
        return metrics

    def _zero_grad(self) -> None:
        """Under CUDA graphs, gradients are zeroed in place, never dropped: the backward
        graph leaves them in its own buffers, which a `.grad` set to None would then share
        (and the next batch's replay overwrite, losing an accumulated gradient)."""
        self.optimizer.zero_grad(set_to_none=self.graphed is None)

    def _svd_penalty(self, exact: bool) -> tp.Any:
        svd = self.args.svd
        return svd_penalty(self.model, min_size=svd.min_size, dim=svd.dim, niters=svd.niters,
                           powm=svd.powm, convtr=svd.convtr, proba=svd.proba,
                           conv_only=svd.conv_only, bs=svd.bs, exact=exact,
                           rng=self.penalty_rng)

    def _clip_gradients(self) -> float:
        """The norm of all the gradients, before they are clipped to `optim.clip_grad`."""
        params = [param for param in self.model.parameters() if param.grad is not None]
        max_norm = self.args.optim.clip_grad or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # -- valid stage ----------------------------------------------------------------

    def _valid_stage(self, epoch: int) -> dict[str, tp.Any]:
        """Validate every candidate, choose one, update the best state (see module doc)."""
        metric = self.args.test.metric
        chosen_name, chosen = "main", self._validate(epoch, "main")
        chosen_state: tp.Optional[State] = None  # None: the live weights
        valid: dict[str, tp.Any] = {"main": chosen}
        for kind, emas in self.emas.items():
            for index, ema in enumerate(emas):
                name = ema_key(kind, index)
                with ema.swap():
                    valid[name] = self._validate(epoch, name)
                if is_better(valid[name][metric], chosen[metric], metric):
                    chosen_name, chosen, chosen_state = name, valid[name], ema.state
            valid.update(chosen)
            valid["bname"] = chosen_name
        values = [entry["valid"][metric] for entry in self.history] + [valid[metric]]
        valid["best"] = max(values) if is_maximized(metric) else min(values)
        if self.args.svd.penalty > 0:
            with torch.no_grad():
                valid["penalty"] = _scalar(self._svd_penalty(exact=True))
        if valid[metric] == valid["best"] or self.args.dset.train_valid:
            self.best_state = copy_state(chosen_state if chosen_state is not None
                                         else self.model.state_dict())
        logger.info("Valid | Epoch %d | kept %s", epoch + 1, chosen_name)
        return valid

    def _validate(self, epoch: int, name: str) -> Metrics:
        self.model.eval()
        averager = Averager()
        with torch.no_grad():
            for streams in self._batches(self._loader("valid"),
                                         f"Valid | Epoch {epoch + 1} | {name}"):
                averager.update(self._valid_step(streams))
        return averager.reduce()

    def _valid_step(self, streams: torch.Tensor) -> Metrics:
        streams = streams.to(self.device)
        mix, sources = streams[:, 0], streams[:, 1:]  # (B, C, T), (B, S, C, T)
        if self.args.valid_apply:
            estimate = apply_model(self.model, mix, split=self.args.test.split, overlap=0)
        else:
            estimate = self.model(mix)
        loss, metrics = self._batch_metrics(estimate, sources)
        nsdrs = new_sdr(sources, estimate).mean(dim=0)  # (S,)
        metrics["loss"] = float(loss)
        metrics["nsdr"] = float(self._weighted(nsdrs))
        metrics.update({f"nsdr_{source}": float(nsdr)
                        for source, nsdr in zip(self.sources, nsdrs)})
        return metrics

    # -- test stage -----------------------------------------------------------------

    def _test_stage(self, compute_sdr: bool) -> Metrics:
        if self.args.test.best and self.best_state is not None:
            state = self.best_state
        else:
            state = copy_state(self.model.state_dict())
        logger.info("-" * 70)
        logger.info("Evaluating on the test set...")
        test_set = get_test_set(self.args, self.sources)
        with swap_state(self.model, state), torch.no_grad():
            return evaluate(self.model, self.args.test, test_set, self.device, self.folder,
                            compute_sdr=compute_sdr)

    # -- checkpoints ----------------------------------------------------------------

    def checkpoint(self) -> State:
        """The resumable state of the training (what `checkpoint.th` holds)."""
        package = {name: part.save() for name, part in self.parts.items()}
        package["version"] = VERSION
        package["args"] = OmegaConf.to_container(self.args, resolve=True)
        return package

    def save_best(self, path: Path) -> None:
        """Write the model package of the best state (what `best.th` holds) to `path`."""
        state = self.best_state if self.best_state is not None else self.model.state_dict()
        with swap_state(self.model, state):
            # Saved inside the swap: on CPU the package's tensors are the parameters.
            save_atomic(serialize_model(self.model, self.args, self.quantizer, half=False),
                        path)

    def _save(self, epoch: int) -> None:
        """Write the checkpoints of `epoch` (0-based), on the first worker. A write that
        fails (a full disk) stops the training with one line, the previous files intact
        (atomic writes); with several workers, every one stops there (one scalar exchange
        per epoch) rather than waiting for the first at its next exchange until a timeout."""
        failure: tp.Optional[OSError] = None
        if distrib.is_master():
            try:
                self._write_checkpoints(epoch)
            except OSError as error:
                failure = error
        if distrib.total(float(failure is not None)):
            what = (f"could not save epoch {epoch + 1}: {one_line(failure)}"
                    if failure is not None
                    else f"the first worker could not save epoch {epoch + 1}")
            raise TrainingError(
                f"{what}: training stopped, {self._kept(epoch)}; free some space and run the "
                "same command to resume.") from failure
        if distrib.is_master():
            self._plot_curves()

    def _write_checkpoints(self, epoch: int) -> None:
        """`checkpoint.th` last: the resume point moves once the epoch's other files are
        written."""
        checkpoint = self.checkpoint()
        save_every = self.args.save_every
        if save_every and (epoch + 1) % save_every == 0:
            save_atomic(checkpoint, self.folder / f"checkpoint_{epoch + 1}.th")
        self.save_best(self.best_file)
        save_atomic(checkpoint, self.checkpoint_file)
        logger.debug("Checkpoint saved to %s", self.checkpoint_file.resolve())

    def _plot_curves(self) -> None:
        """`curves.png` in the XP folder; a failure to draw never stops the training."""
        try:
            plot_history(self.history, self.folder / "curves.png", self.args.test.metric,
                         title=f"XP {self.folder.name}")
        except Exception as error:  # matplotlib missing or failing: only the plot is lost
            logger.warning("Could not draw curves.png: %s", one_line(error))
