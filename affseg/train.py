"""The training loop: accumulation, AMP, warm-up + poly schedule, validation, checkpoints, exact resume.

`train(config, callbacks, resume_from) -> TrainResult` is the one function the sweep layer calls.
Nothing here imports Ray or MLflow: observers are `affseg.callbacks.Callback`s.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from affseg.callbacks import Callback, TrainResult, ValidationResult
from affseg.config import Config, ConfigError, OptimConfig, from_dict, save_config, to_dict
from affseg.data.demo import DemoSpec, make_demo
from affseg.data.sampling import DrawDataset, ResumableBatches
from affseg.data.transforms import TrainAugment
from affseg.data.voc import VocSegmentation
from affseg.model import UniClAffSeg, build_model
from affseg.validate import validate

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
CHECKPOINT_FORMAT = 1
# Keys a resumed run must share with its checkpoint: they fix the lr schedule and the sample order.
SCHEDULE_KEYS = ("iterations", "accumulation", "batch_size", "seed")


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite losses, a checkpoint that does not fit)."""


def select_device(name: str) -> torch.device:
    """`auto` → cuda when present, else cpu. Chosen once and passed down."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: cuda requested but no GPU is visible; use train.device=auto or cpu")
    return torch.device(name)


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """Autocast dtype: None (fp32) on CPU or when off; bf16 where supported under `auto`."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def lr_factor(iteration: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at `iteration`: poly decay (1 − t/T)^p, times a linear warm-up
    from `warmup_ratio` to 1 over the first `warmup_iters` iterations."""
    poly = max(0.0, 1.0 - iteration / total) ** cfg.poly_power
    if iteration < cfg.warmup_iters:
        poly *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * iteration / cfg.warmup_iters
    return poly


def ensure_dataset(config: Config) -> None:
    """Build the demo set at `data.root` when it is missing and `data.demo` allows it."""
    root = Path(config.data.root)
    if config.data.demo and not root.is_dir():
        if root.parts[-2:] != ("VOCdevkit", "VOC2012"):
            raise TrainingError(f"data.root: {root} must end in VOCdevkit/VOC2012 to build the demo set there")
        log.info("building the demo dataset at %s", root)
        make_demo(root.parent.parent, DemoSpec(seed=config.data.demo_seed))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (temp file + rename): a killed process never leaves a torn checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def nonfinite_entry(state: object, key: str = "") -> str | None:
    """Dotted key of the first floating tensor or float in a (nested) state holding NaN/inf; None if all finite."""
    if isinstance(state, torch.Tensor):
        return key if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    if isinstance(state, float):
        return None if math.isfinite(state) else key
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for name, value in items:
        found = nonfinite_entry(value, f"{key}.{name}" if key else str(name))
        if found is not None:
            return found
    return None


def require_finite(state: dict, path: Path) -> None:
    """One-line TrainingError instead of writing a checkpoint with a NaN/inf tensor."""
    found = nonfinite_entry({k: state[k] for k in ("decoder", "optimiser", "scaler")})
    if found is not None:
        raise TrainingError(f"{path}: refusing to write a checkpoint with non-finite {found}; lower optim.lr")


def check_block_counts(config: Config, affinity_blocks: int) -> None:
    """`refine.n0` and `refine.warmup_blocks` count affinity blocks: at most as many as the encoder has."""
    for name in ("n0", "warmup_blocks"):
        value = getattr(config.refine, name)
        if value > affinity_blocks:
            raise ConfigError(f"refine.{name}: {value} must lie in [1, {affinity_blocks}] "
                              f"(the affinity blocks of model.encoder={config.model.encoder})")


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint as a dict; one-line TrainingError when unreadable or not ours."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for torn or foreign files
        raise TrainingError(f"{path}: unreadable checkpoint ({type(err).__name__}: {str(err)[:80]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not an affseg training checkpoint")
    return state


def writable_folder(folder: Path) -> Path:
    """`folder`, created if needed and probed with a temporary file: checkpoints must be writable before an hour
    of training, not after. TrainingError (one line, naming the folder) otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise TrainingError(f"{folder}: cannot write there ({err.strerror or type(err).__name__}); "
                            "set train.out_dir (affseg train --out) to a writable folder") from None
    return folder


class Trainer:
    """Owns model, optimiser, schedule and data for one run; `run()` executes it."""

    def __init__(self, config: Config, callbacks: Sequence[Callback] = (), resume_from: str | Path | None = None):
        self.config = config
        self.callbacks = list(callbacks)
        self.out_dir = writable_folder(Path(config.train.out_dir))
        self.device = select_device(config.train.device)
        self.autocast_dtype = amp_dtype(self.device, config.train.amp)
        torch.manual_seed(config.train.seed)
        ensure_dataset(config)
        self.model: UniClAffSeg = build_model(config, self.device)
        check_block_counts(config, len(self.model.affinity_blocks))
        params = [p for p in self.model.decoder.parameters() if p.requires_grad]
        optim = config.optim
        self.optimiser = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                           weight_decay=optim.weight_decay)
        total = config.train.iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimiser, lambda t: lr_factor(t, total, optim))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.iteration = 0
        self.nonfinite = 0
        self.best: ValidationResult | None = None
        self.history: list[ValidationResult] = []
        if resume_from is not None:
            self._restore(load_checkpoint(resume_from))
        data = config.data
        augment = TrainAugment(data.crop_size, data.scale_min, data.scale_max, data.flip_prob)
        self.train_set = VocSegmentation(data.root, data.train_split, augment, data.cls_labels, seed=config.train.seed)
        self.val_set = VocSegmentation(data.root, data.val_split, None, data.cls_labels, limit=data.val_limit)
        self.pseudo_set = VocSegmentation(data.root, data.train_split, None, data.cls_labels, limit=data.pseudo_subset)

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": to_dict(self.config),
            "iteration": self.iteration,
            "decoder": self.model.decoder.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "nonfinite": self.nonfinite,
            "best": self.best.to_dict() if self.best else None,
        }

    def _restore(self, state: dict) -> None:
        saved = from_dict(state["config"])
        if saved.model.encoder != self.config.model.encoder:
            raise TrainingError(
                f"resume: checkpoint was trained with model.encoder={saved.model.encoder}, "
                f"not {self.config.model.encoder}"
            )
        for name in SCHEDULE_KEYS:
            old, new = getattr(saved.train, name), getattr(self.config.train, name)
            if old != new:
                raise TrainingError(f"resume: checkpoint was trained with train.{name}={old}, not {new}; "
                                    "resume with the same value or start a new run")
        self.model.decoder.load_state_dict(state["decoder"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.iteration = int(state["iteration"])
        self.nonfinite = int(state["nonfinite"])
        self.best = ValidationResult.from_dict(state["best"]) if state["best"] else None

    # ------------------------------------------------------------ loop
    def _loader(self) -> DataLoader:
        cfg = self.config
        sampler = ResumableBatches(len(self.train_set), cfg.train.batch_size, cfg.train.seed,
                                   start_batch=self.iteration * cfg.train.accumulation)
        # The loader's own generator: drawing its base seed from the global RNG would shift the
        # dropout stream of a resumed run (its loader is created after the RNG state is restored).
        generator = torch.Generator().manual_seed(cfg.train.seed)
        return DataLoader(DrawDataset(self.train_set, cfg.train.seed), batch_sampler=sampler,
                          num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=cfg.data.num_workers > 0, generator=generator)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _step(self, batches) -> dict[str, float] | None:
        """One optimiser step over `accumulation` micro-batches; None when the loss was not finite
        or the step made a weight, optimiser or scaler tensor non-finite (then the step is rolled back).

        Always consumes exactly `accumulation` micro-batches, so batch t stays a function of (seed, t).
        """
        self.model.train()
        self.optimiser.zero_grad(set_to_none=True)
        accumulation = self.config.train.accumulation
        totals: dict[str, float] = {}
        for index in range(accumulation):
            batch = next(batches)
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            valid = batch["valid"].to(self.device, non_blocking=True)
            with self._autocast():
                output = self.model(images, labels, self.iteration, valid)
                losses = self.model.losses(output)
            if not torch.isfinite(losses["loss"]):
                self.optimiser.zero_grad(set_to_none=True)
                for _ in range(accumulation - index - 1):
                    next(batches)
                return None
            self.scaler.scale(losses["loss"] / accumulation).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.item() / accumulation
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(self.model.decoder.parameters(), self.config.optim.grad_clip)
        snapshot = self._snapshot()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        if not self._state_finite():
            self._rollback(snapshot)
            return None
        return totals

    def _state_finite(self) -> bool:
        """Decoder weights, optimiser state and scaler all finite (one device sync)."""
        tensors = [*self.model.decoder.state_dict().values()]
        tensors += [v for state in self.optimiser.state.values() for v in state.values()]
        flags = [torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return bool(torch.stack(flags).all()) and nonfinite_entry(self.scaler.state_dict()) is None

    def _snapshot(self) -> dict:
        """Copies of decoder weights, optimiser and scaler state (the decoder is small next to the encoder pass)."""
        return {
            "decoder": {k: v.detach().clone() for k, v in self.model.decoder.state_dict().items()},
            "optimiser": copy.deepcopy(self.optimiser.state_dict()),
            "scaler": copy.deepcopy(self.scaler.state_dict()),
        }

    def _rollback(self, snapshot: dict) -> None:
        self.model.decoder.load_state_dict(snapshot["decoder"])
        self.optimiser.load_state_dict(snapshot["optimiser"])
        self.scaler.load_state_dict(snapshot["scaler"])
        self.optimiser.zero_grad(set_to_none=True)

    def _validate(self) -> bool:
        """Validate, checkpoint, notify; returns True when a callback asks to stop."""
        result = validate(self.model, self.val_set, self.pseudo_set, self.iteration, self.device,
                          self.out_dir / "figures", self._autocast)
        is_best = self.best is None or result.miou > self.best.miou
        if is_best:
            self.best = result
        self.history.append(result)
        state = self.state()
        require_finite(state, self.out_dir / LAST_CHECKPOINT)
        save_checkpoint(self.out_dir / LAST_CHECKPOINT, state)
        if is_best:
            save_checkpoint(self.out_dir / BEST_CHECKPOINT, state)
        for callback in self.callbacks:
            callback.on_validation(result, self.out_dir / LAST_CHECKPOINT, is_best)
        return any(callback.should_stop() for callback in self.callbacks)

    def run(self) -> TrainResult:
        cfg = self.config.train
        save_config(self.config, self.out_dir / "config.yaml")
        for callback in self.callbacks:
            callback.on_start(self.config, self.iteration)
        batches = iter(self._loader())
        stopped = False
        tick = time.perf_counter()
        while self.iteration < cfg.iterations and not stopped:
            values = self._step(batches)
            if values is None:
                self.nonfinite += 1
                log.warning("iteration %d: non-finite loss or update, step skipped (%d so far)",
                            self.iteration, self.nonfinite)
                if self.nonfinite > cfg.max_nonfinite:
                    raise TrainingError(
                        f"{self.nonfinite} non-finite losses or updates (train.max_nonfinite={cfg.max_nonfinite}); "
                        "lower optim.lr or check the data"
                    )
            self.scheduler.step()
            self.iteration += 1
            if values is not None and (self.iteration % cfg.log_interval == 0 or self.iteration == 1):
                values["lr"] = self.optimiser.param_groups[0]["lr"]
                values["sec_per_iter"] = (time.perf_counter() - tick) / max(1, cfg.log_interval)
                values["nonfinite"] = float(self.nonfinite)
                tick = time.perf_counter()
                for callback in self.callbacks:
                    callback.on_log(self.iteration, values)
            if self.iteration % cfg.val_interval == 0 or self.iteration == cfg.iterations:
                stopped = self._validate() and self.iteration < cfg.iterations
        result = TrainResult(
            best=self.best,
            best_checkpoint=self.out_dir / BEST_CHECKPOINT if self.best else None,
            last_checkpoint=self.out_dir / LAST_CHECKPOINT if self.history else None,
            iterations_done=self.iteration,
            stopped_early=stopped,
            history=self.history,
        )
        for callback in self.callbacks:
            callback.on_end(result)
        return result


def train(config: Config, callbacks: Sequence[Callback] = (), resume_from: str | Path | None = None) -> TrainResult:
    """Train UniCL-AffSeg per `config`; see `Trainer`. Resuming continues the schedule exactly."""
    return Trainer(config, callbacks, resume_from).run()
