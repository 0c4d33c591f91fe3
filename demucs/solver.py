"""The training loop of an XP: train, validate, test, checkpoint, resume.

`Solver(loaders, model, optimizer, args)` runs inside Dora's current XP (`dora.get_xp()`),
whose folder receives:
- `checkpoint.th`: everything needed to resume (model, optimizer, EMAs, best state,
  history, quantizer parameters, random generators), written atomically at the end of
  every epoch, so that a killed training resumes as if it had never stopped;
- `checkpoint_<epoch>.th`: copies kept every `save_every` epochs;
- `best.th`: a model package (see `demucs.states`) of the best state so far, the one that
  the test set evaluates (`test.best`) and `tools.export` exports;
- `history.json` (through Dora's link): one entry per epoch,
  `{"train": {...}, "valid": {...}, "test": {...}}` (`test` only when the test set ran).

The checkpoint is loaded when the solver is built (so `train.get_solver_from_sig(SIG)`
gives the trained weights and best state); without one, the weights come from
`continue_pretrained` (a model name in `pretrained_repo` or the remote repository) or
`continue_from` (another XP's signature, or a checkpoint path).

Each epoch evaluates on the validation set the live weights and every EMA of them
(`ema.batch`, `ema.epoch`); the best of these candidates (lowest valid loss, or highest
nSDR with `test.metric=nsdr`) gives the epoch's valid metrics and, if it beats all the
previous epochs, becomes the best state.
"""
from __future__ import annotations

import logging
import random
import typing as tp
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dora import get_xp
from dora.log import LogProgress, bold
from omegaconf import OmegaConf
from torch import nn

from . import distrib
from .apply import BagOfModels, apply_model
from .augment import get_augmentations
from .ema import ModelEMA
from .errors import ConfigError, ModelLoadingError
from .quantize import get_quantizer, model_size
from .states import copy_state, save_atomic, serialize_model, swap_state
from .svd import svd_penalty

logger = logging.getLogger(__name__)

Metrics = dict[str, float]
State = dict[str, tp.Any]
CHECKPOINT_VERSION = 1
QUANTIZER_SUFFIX = "_diffq"  # parameters DiffQ adds to a model


# ---------------------------------------------------------------------------------------
# Helpers: metrics, random generators, checkpoint files


class Averager:
    """Mean of metrics over examples, each update weighted by its number of examples."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0.

    def update(self, metrics: tp.Mapping[str, float], count: float = 1.) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.) + float(value) * count
        self.count += count

    def mean(self) -> Metrics:
        return {key: value / max(self.count, 1e-12) for key, value in self.sums.items()}

    def reduce(self) -> Metrics:
        """The mean over every distributed worker."""
        return distrib.average(self.mean(), self.count)


def format_metrics(metrics: tp.Mapping[str, tp.Any]) -> str:
    return " | ".join(f"{key.capitalize()}={value:.4f}" if isinstance(value, float)
                      else f"{key.capitalize()}={value}" for key, value in metrics.items())


def get_rng_state() -> State:
    """The state of the generators of torch (CPU and CUDA), numpy and Python."""
    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state: State = {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": (name, torch.from_numpy(np.asarray(keys).astype(np.int64)), position,
                              has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: State) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> State:
    """Read a checkpoint written by the solver (plain tensors and containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types on corrupt data
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadingError(f"{path}: unreadable checkpoint ({first_line}).") from None


def _xp_reference(value: tp.Any) -> str:
    """`continue_from` as given: Hydra reads an all-digit signature as an integer."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ConfigError(f"continue_from={value!r} is not an XP signature or a checkpoint "
                          "path; quote it: continue_from=\"'SIG'\".")
    return f"{value:08d}" if isinstance(value, int) else str(value)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---------------------------------------------------------------------------------------
# The solver


class Solver:
    """Trains `model` with `optimizer` on `loaders` ({"train", "valid"}, or None to only
    load the XP's checkpoint), following the config `args` (see conf/config.yaml)."""

    def __init__(self, loaders: tp.Optional[dict[str, tp.Any]], model: nn.Module,
                 optimizer: torch.optim.Optimizer, args: tp.Any):
        self.args = args
        self.loaders = loaders
        self.model = model
        self.optimizer = optimizer
        self.device = next(iter(model.parameters())).device
        self.sources = list(args.dset.sources)
        self.weights = self._loss_weights()
        self._check_segment()
        self.quantizer = get_quantizer(model, args.quant, optimizer)  # before DDP
        self.dmodel = distrib.wrap(model)
        self.augment = get_augmentations(args).to(self.device)
        self.emas = {kind: [ModelEMA(model, decay, device=self.device)
                            for decay in args.ema[kind]] for kind in ("batch", "epoch")}
        self.penalty_rng = random.Random(args.seed)  # draws of svd.proba
        xp = get_xp()
        self.folder = xp.folder
        self.xp_argv = list(xp.argv)
        self.link = xp.link
        self.history: list[dict[str, tp.Any]] = self.link.history
        self.checkpoint_file = self.folder / "checkpoint.th"
        self.best_file = self.folder / "best.th"
        self.best_state: tp.Optional[State] = None
        self.best_score = float("inf")
        self._reset()

    # -- setup ----------------------------------------------------------------------

    def _loss_weights(self) -> torch.Tensor:
        weights = [float(weight) for weight in self.args.weights]
        if len(weights) != len(self.sources) or sum(weights) <= 0:
            raise ConfigError(f"weights={weights}: give one non-negative weight per source "
                              f"({', '.join(self.sources)}), not all zero.")
        tensor = torch.tensor(weights, device=self.device)
        return tensor / tensor.sum()

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

    def _load_model_state(self, state: State, origin: tp.Any, hint: str) -> None:
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatch
            raise ModelLoadingError(f"{origin}: weights from a different model "
                                    f"({_first_line(error)}); {hint}.") from None
        missing = [key for key in missing if not key.endswith(QUANTIZER_SUFFIX)]
        if missing or unexpected:
            keys = ", ".join((missing + unexpected)[:3])
            raise ModelLoadingError(f"{origin}: weights from a different model (keys "
                                    f"{keys} do not match); {hint}.")

    def _resume(self, package: State) -> None:
        hint = f"start the XP over with `{self._clear_hint()}`"
        self._load_model_state(package["state"], self.checkpoint_file, hint)
        try:
            self.optimizer.load_state_dict(package["optimizer"])
            for kind, emas in self.emas.items():
                for ema, state in zip(emas, package["emas"][kind], strict=True):
                    ema.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadingError(f"{self.checkpoint_file}: optimizer or EMA state does "
                                    f"not fit ({_first_line(error)}); {hint}.") from None
        self.best_state = package["best_state"]
        self.best_score = package["best_score"]
        self.history[:] = package["history"]
        set_rng_state(package["rng"])
        self.penalty_rng.setstate(package["penalty_rng"])
        logger.info("Resuming from %s after %d epochs.", self.checkpoint_file,
                    len(self.history))

    def _continue_pretrained(self, name: str) -> None:
        from .pretrained import get_model as get_pretrained_model
        model = get_pretrained_model(name, repo=self.args.pretrained_repo)
        if isinstance(model, BagOfModels):
            if len(model.models) != 1:
                raise ConfigError(f"continue_pretrained={name} is a bag of "
                                  f"{len(model.models)} models; name a single model.")
            model = model.models[0]
        self._load_model_state(model.state_dict(), f"continue_pretrained={name}",
                               "choose a model built with the same architecture")
        logger.info("Starting from the pretrained model %s.", name)

    def _parent_checkpoint(self, ref: str) -> Path:
        if Path(ref).is_file():
            return Path(ref)
        from .train import main  # the XP registry; train imports the solver lazily
        xp = main.get_xp_from_sig(ref)
        path = xp.folder / self.checkpoint_file.name
        if not path.is_file():
            raise ConfigError(f"continue_from={ref}: XP {ref} has no checkpoint ({path}); "
                              f"train it first with `dora run -f {ref}`.")
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
                                        f"fit ({_first_line(error)}).") from None
        logger.info("Starting from the %s of %s.", key, path)

    # -- training loop --------------------------------------------------------------

    def train(self) -> None:
        """Train the remaining epochs, checkpointing after each one."""
        for epoch, metrics in enumerate(self.history):
            self._log_epoch(epoch, metrics, replay=True)
        if len(self.history) >= self.args.epochs:
            logger.info("Training already done (%d epochs).", len(self.history))
        for epoch in range(len(self.history), self.args.epochs):
            metrics = self._run_epoch(epoch)
            self.link.push_metrics(metrics)
            self._save(epoch)

    def _run_epoch(self, epoch: int) -> dict[str, Metrics]:
        metrics = {"train": self._train_stage(epoch)}
        metrics["valid"] = self._valid_stage(epoch, metrics["train"])
        if self._is_test_epoch(epoch):
            metrics["test"] = self._test_stage(epoch)
        self._log_epoch(epoch, metrics)
        return metrics

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
        return epoch == self.args.epochs - 1 or bool(every and (epoch + 1) % every == 0)

    # -- train stage ----------------------------------------------------------------

    def _loader(self, name: str) -> tp.Any:
        if self.loaders is None:
            raise RuntimeError("This solver was built with model_only=True: no data.")
        return self.loaders[name]

    def _train_stage(self, epoch: int) -> Metrics:
        loader = self._loader("train")
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        total = len(loader)
        if total == 0:
            raise ConfigError(f"The train set has {len(loader.dataset)} examples: not one "
                              f"batch of batch_size={self.args.batch_size}; lower batch_size or "
                              "dset.segment, or add tracks.")
        if self.args.max_batches:
            total = min(total, self.args.max_batches)
        self.dmodel.train()
        self.augment.train()
        averager = Averager()
        progress = LogProgress(logger, islice(loader, total), total=total,
                               updates=self.args.misc.num_prints,
                               name=f"Train | Epoch {epoch + 1}")
        for sources in progress:
            step = self._train_step(sources)
            averager.update(step, len(sources))
            progress.update(**{key: f"{value:.4f}" for key, value in averager.mean().items()})
        for ema in self.emas["epoch"]:
            ema.update()
        return averager.reduce()

    def _reco_losses(self, estimate: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Loss per source (S,), averaged over batch, channels and time."""
        if estimate.shape != sources.shape:
            raise RuntimeError(f"The model returned {tuple(estimate.shape)} for sources of "
                               f"shape (B, S, C, T)={tuple(sources.shape)}.")
        if self.args.optim.loss == "l1":
            losses = F.l1_loss(estimate, sources, reduction="none")
        elif self.args.optim.loss == "mse":
            losses = F.mse_loss(estimate, sources, reduction="none")
        else:
            raise ConfigError(f"optim.loss={self.args.optim.loss!r} is not valid; "
                              "choose one of: l1, mse.")
        return losses.mean(dim=(0, 2, 3))

    def _penalties(self) -> tuple[torch.Tensor | float, Metrics]:
        """Penalty terms of the loss (SVD, DiffQ) and their values as metrics."""
        total: torch.Tensor | float = 0.
        metrics: Metrics = {}
        svd = self.args.svd
        if svd.penalty:
            penalty = svd_penalty(self.model, min_size=svd.min_size, dim=svd.dim,
                                  niters=svd.niters, powm=svd.powm, convtr=svd.convtr,
                                  proba=svd.proba, conv_only=svd.conv_only, bs=svd.bs,
                                  rng=self.penalty_rng)
            total = total + svd.penalty * penalty
            metrics["penalty"] = float(penalty.item() if isinstance(penalty, torch.Tensor)
                                       else penalty)
        if self.quantizer is not None:
            size = self.quantizer.model_size()
            if self.args.quant.diffq:
                total = total + self.args.quant.diffq * size
            metrics["ms"] = float(size.item() if isinstance(size, torch.Tensor) else size)
        return total, metrics

    def _train_step(self, sources: torch.Tensor) -> Metrics:
        sources = self.augment(sources.to(self.device))  # (B, S, C, T)
        mix = sources.sum(dim=1)  # (B, C, T)
        estimate = self.dmodel(mix)
        reco = (self._reco_losses(estimate, sources) * self.weights).sum()
        penalty, metrics = self._penalties()
        loss = reco + penalty
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        for ema in self.emas["batch"]:
            ema.update()
        return {"loss": loss.item(), "reco": reco.item(), "grad": grad_norm,
                "penalty": 0., **metrics}

    def _clip_gradients(self) -> float:
        params = [param for param in self.model.parameters() if param.grad is not None]
        max_norm = self.args.optim.clip_grad or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # -- valid stage ----------------------------------------------------------------

    def _candidates(self) -> tp.Iterator[tuple[str, tp.ContextManager]]:
        """The weights to validate: the live ones, then every EMA swapped in."""
        yield "main", nullcontext()
        for kind, emas in self.emas.items():
            for ema in emas:
                yield f"ema_{kind}_{ema.decay}", ema.swap()

    def _score(self, metrics: Metrics) -> float:
        """Lower is better: valid loss, or minus nSDR with test.metric=nsdr."""
        if self.args.test.metric == "nsdr":
            return -metrics["nsdr"]
        return metrics["loss"]

    def _valid_stage(self, epoch: int, train: Metrics) -> Metrics:
        chosen: tp.Optional[Metrics] = None
        chosen_name = ""
        for name, context in self._candidates():
            with context:
                metrics = self._validate(epoch, name)
                score = self._score(metrics)
                if chosen is None or score < self._score(chosen):
                    chosen, chosen_name = metrics, name
                if score < self.best_score:
                    self.best_score = score
                    self.best_state = copy_state(self.model.state_dict())
        assert chosen is not None  # "main" is always a candidate
        logger.info("Valid | Epoch %d | kept %s", epoch + 1, chosen_name)
        best = -self.best_score if self.args.test.metric == "nsdr" else self.best_score
        return {**chosen, "best": best, "penalty": train.get("penalty", 0.),
                "ms": model_size(self.model, self.quantizer)}

    def _validate(self, epoch: int, name: str) -> Metrics:
        self.model.eval()
        loader = self._loader("valid")
        averager = Averager()
        progress = LogProgress(logger, loader, updates=self.args.misc.num_prints,
                               name=f"Valid | Epoch {epoch + 1} | {name}")
        with torch.no_grad():
            for streams in progress:
                averager.update(self._valid_step(streams), len(streams))
        return averager.reduce()

    def _valid_step(self, streams: torch.Tensor) -> Metrics:
        from .evaluate import new_sdr
        streams = streams.to(self.device)
        mix, sources = streams[:, 0], streams[:, 1:]  # (B, C, T), (B, S, C, T)
        if self.args.valid_apply:
            estimate = apply_model(self.model, mix, split=self.args.test.split, overlap=0)
        else:
            estimate = self.model(mix)
        losses = self._reco_losses(estimate, sources)
        nsdrs = new_sdr(sources, estimate).mean(dim=0)  # (S,)
        loss = (losses * self.weights).sum().item()
        metrics = {"reco": loss, "loss": loss, "nsdr": nsdrs.mean().item()}
        for source, value, nsdr in zip(self.sources, losses.tolist(), nsdrs.tolist()):
            metrics[f"reco_{source}"] = value
            metrics[f"nsdr_{source}"] = nsdr
        return metrics

    # -- test stage -----------------------------------------------------------------

    def _test_stage(self, epoch: int) -> Metrics:
        from .evaluate import evaluate
        is_last = epoch == self.args.epochs - 1
        if self.args.test.best and self.best_state is not None:
            state = self.best_state
        else:
            state = copy_state(self.model.state_dict())
        logger.info("-" * 70)
        logger.info("Evaluating on the test set...")
        with swap_state(self.model, state), torch.no_grad():
            self.model.eval()
            return dict(evaluate(self, compute_sdr=bool(self.args.test.sdr and is_last)))

    # -- checkpoints ----------------------------------------------------------------

    def checkpoint(self) -> State:
        """The resumable state of the training (what `checkpoint.th` holds)."""
        return {
            "version": CHECKPOINT_VERSION,
            "state": copy_state(self.model.state_dict()),
            "best_state": self.best_state,
            "best_score": self.best_score,
            "optimizer": self.optimizer.state_dict(),
            "emas": {kind: [{"state": copy_state(ema.state), "count": ema.count}
                            for ema in emas] for kind, emas in self.emas.items()},
            "history": list(self.history),
            "rng": get_rng_state(),
            "penalty_rng": self.penalty_rng.getstate(),
            "args": OmegaConf.to_container(self.args, resolve=True),
        }

    def save_best(self, path: Path) -> None:
        """Write the model package of the best state (what `best.th` holds) to `path`."""
        state = self.best_state if self.best_state is not None else self.model.state_dict()
        with swap_state(self.model, state):
            # Saved inside the swap: on CPU the package's tensors are the parameters.
            save_atomic(serialize_model(self.model, self.args, self.quantizer, half=False),
                        path)

    def _save(self, epoch: int) -> None:
        if not distrib.is_master():
            return
        checkpoint = self.checkpoint()
        save_atomic(checkpoint, self.checkpoint_file)
        save_every = self.args.save_every
        if save_every and (epoch + 1) % save_every == 0:
            save_atomic(checkpoint, self.folder / f"checkpoint_{epoch + 1}.th")
        self.save_best(self.best_file)
        logger.debug("Checkpoint saved to %s", self.checkpoint_file.resolve())
