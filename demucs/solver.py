"""The training loop of an XP: epochs of a train stage, a valid stage and, some epochs,
a test stage, each epoch ending with its checkpoint.

`Solver(loaders, model, optimizer, args, find_xp)` runs inside Dora's current XP, whose
folder receives, at the end of every epoch: `checkpoint.th` (everything needed to resume,
the parts declared once in `Solver._checkpoint_parts`; `checkpoint_EPOCH.th` every
`save_every` epochs), `best.th` (a model package of the best state), `curves.png` and,
through Dora's link, `history.json` (one `{"train", "valid", "test"}` entry per epoch,
with the original's keys, see docs/training.md). The checkpoint is loaded when the
solver is built; without one, the weights may come from another XP or a package
(`demucs.resume`).

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
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import torch
from dora import get_xp
from dora.log import LogProgress, bold
from omegaconf import OmegaConf
from torch import nn

from . import distrib, failures, resume
from .apply import apply_model
from .augment import get_augmentations
from .checkpoints import (VERSION, ema_key, get_rng_state, save_package, set_rng_state,
                          write_epoch)
from .checks import AMP_DTYPES, warn_emulated_bf16
from .cuda_graph import GraphedStep, check_cuda_graph
from .curves import draw_curves, is_maximized
from .ema import ModelEMA
from .evaluate import evaluate, get_test_set, new_sdr
from .losses import LossOptions, MultiStftSettings, reco_losses
from .metrics import (Averager, Metrics, diverged, epoch_line, format_duration, is_better,
                      scalar, summary_lines)
from .quantize import get_quantizer
from .resume import Part
from .states import copy_state, swap_state
from .svd import SVD_KEYS, svd_penalty
from .utils import reset_peak_memory

logger = logging.getLogger(__name__)

State = dict[str, tp.Any]
EMA_KINDS = ("batch", "epoch")


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
        self.weights = torch.tensor([float(w) for w in args.weights], device=self.device)
        self.loss_options = LossOptions(
            multi_stft=getattr(model, "multi_stft", MultiStftSettings()), q=args.optim.loss_q)
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
                parts[ema_key(kind, index)] = Part(ema.state_dict, ema.load_state_dict)
        return parts

    def _weighted(self, values: torch.Tensor) -> torch.Tensor:
        """`sum_s w_s * values_s / sum_s w_s` over the sources (last axis)."""
        return (values * self.weights).sum(-1) / self.weights.sum()

    def _reset(self) -> None:
        """Resume from the XP's checkpoint, or start from other weights if asked to."""
        if self.checkpoint_file.exists():
            resume.restore(self.parts, self.checkpoint_file, self._start_over())
            logger.info("Resuming from %s after %d epochs.", self.checkpoint_file,
                        len(self.history))
        elif self.args.continue_pretrained:
            resume.continue_pretrained(self.model, self.args)
        elif self.args.continue_from:
            resume.continue_from(self.model, self.optimizer, self.args, self.find_xp,
                                 self.checkpoint_file.name)

    def _start_over(self) -> str:
        return f"start the XP over with `{' '.join(['dora run --clear', *self.xp_argv])}`"

    def _load_weights(self, state: State) -> None:
        resume.load_model_state(self.model, state, self.checkpoint_file, self._start_over())

    def _load_best_state(self, state: tp.Optional[State]) -> None:
        self.best_state = state

    def _load_history(self, history: list[dict[str, tp.Any]]) -> None:
        self.history[:] = history

    # -- training loop --------------------------------------------------------------

    def train(self) -> None:
        """Train the remaining epochs, checkpointing after each one."""
        for epoch, metrics in enumerate(self.history):
            self._log_epoch(epoch, metrics, replay=True)
        if self.history and diverged(self.args.optim.loss, len(self.history) - 1,
                                     self.history[-1]["valid"]):
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
            logger.info(epoch_line(epoch, per_epoch, self.args.epochs - epoch - 1,
                                   failures.peak_memory_line(self.device)))

    def _run_epoch(self, epoch: int) -> tuple[dict[str, tp.Any], bool]:
        """The metrics of one epoch, and whether training stops after it."""
        metrics: dict[str, tp.Any] = {"train": self._train_stage(epoch)}
        with self._stopping_out_of_memory(f"in the validation of epoch {epoch + 1}", "valid"):
            metrics["valid"] = self._valid_stage(epoch)
        stop = diverged(self.args.optim.loss, epoch, metrics["valid"])
        if stop:
            logger.warning("Valid reco %.4f at epoch %d: the model diverged, stopping.",
                           metrics["valid"]["main"]["reco"], epoch + 1)
        is_last, every = stop or epoch == self.args.epochs - 1, self.args.test.every
        if is_last or (every and (epoch + 1) % every == 0):
            with self._stopping_out_of_memory(f"in the test of epoch {epoch + 1}", "test"):
                metrics["test"] = self._test_stage(
                    compute_sdr=bool(self.args.test.sdr and is_last))
        self._log_epoch(epoch, metrics)
        return metrics, stop

    def _log_epoch(self, epoch: int, metrics: tp.Mapping[str, Metrics],
                   replay: bool = False) -> None:
        for line in summary_lines(epoch, metrics, replay):
            logger.info(bold(line))

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

    def _batch_metrics(self, estimate: torch.Tensor, sources: torch.Tensor,
                       train: bool) -> tuple[torch.Tensor, Metrics]:
        """The loss of a batch (with the DiffQ size penalty) and its metrics."""
        losses, recos = reco_losses(self.args.optim.loss, estimate, sources,
                                    self.loss_options, train)
        loss = self._weighted(losses)
        size = self.quantizer.model_size() if self.quantizer is not None else 0.
        if self.args.quant.diffq:
            loss = loss + self.args.quant.diffq * size
        metrics = {"reco": scalar(self._weighted(recos)), "ms": scalar(size)}
        metrics.update({f"reco_{source}": scalar(reco)
                        for source, reco in zip(self.sources, recos)})
        return loss, metrics

    # -- train stage ----------------------------------------------------------------

    def _train_stage(self, epoch: int) -> Metrics:
        loader = self._loader("train")
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
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
            raise failures.fp16_overflow(epoch, self._kept())
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
                loss, metrics = self._batch_metrics(estimate, sources, train=True)
            svd = self.args.svd
            if svd.penalty > 0:  # of the float32 weights, in float32 whatever optim.amp
                penalty = self._svd_penalty(exact=False)
                metrics["penalty"] = scalar(penalty)
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
        raise failures.non_finite_loss(loss, *where, self._kept())

    def _stopping_out_of_memory(self, where: str, stage: str = "train") -> tp.ContextManager:
        """Out of device memory inside: one line saying what to change (`failures`)."""
        return failures.stopping_out_of_memory(lambda: failures.out_of_memory(
            self.args, self.device, where, stage, float(getattr(self.model, "segment", 0)),
            self.graphed is not None, self._kept()))

    def _kept(self, epochs: tp.Optional[int] = None) -> str:
        """What a stop now keeps: the checkpoint of the last complete epoch (of epoch
        `epochs` when given, for a stop while the next one is being saved)."""
        return failures.kept(self.checkpoint_file,
                             len(self.history) if epochs is None else epochs)

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
        return svd_penalty(self.model, **{key: svd[key] for key in SVD_KEYS}, exact=exact,
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
                valid["penalty"] = scalar(self._svd_penalty(exact=True))
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
        loss, metrics = self._batch_metrics(estimate, sources, train=False)
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
        save_package(self.model, state, self.args, self.quantizer, path)

    def _save(self, epoch: int) -> None:
        """Write the checkpoints of `epoch` (0-based), on the first worker. A write that
        fails (a full disk) stops the training with one line, the previous files intact
        (atomic writes); with several workers, every one stops there (one scalar exchange
        per epoch) rather than waiting for the first at its next exchange until a timeout."""
        failure: tp.Optional[OSError] = None
        if distrib.is_master():
            try:
                write_epoch(self.folder, epoch + 1, self.checkpoint(), self.save_best,
                            self.args.save_every)
            except OSError as error:
                failure = error
        if distrib.total(float(failure is not None)):
            raise failures.save_failed(epoch, failure, self._kept(epoch)) from failure
        if distrib.is_master():
            draw_curves(self.history, self.folder, self.args.test.metric)
