"""A head: one configuration trained on the shared teacher pass.

It owns the student, its optimiser, schedule and loss scaler, its pseudo-labeler and loss settings,
its callbacks, checkpoint folder, best result and non-finite count. The trainer drives every head
through `begin_step` → `micro_batch` × accumulation → `finish_step`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from affseg.callbacks import Callback, ValidationResult
from affseg.config import Config, from_dict, to_dict
from affseg.engine.checkpoint import CHECKPOINT_FORMAT, TrainingError, nonfinite_entry
from affseg.engine.runtime import RngStream, Runtime
from affseg.engine.schedule import build_optimiser, build_scheduler
from affseg.losses import method_losses
from affseg.method import PseudoLabeler, Student, StudentOutput, TeacherOutput

# Keys a resumed run must share with its checkpoint: they fix the lr schedule and the sample order.
SCHEDULE_KEYS = ("iterations", "accumulation", "batch_size", "seed")


class Head:
    """One student with everything that trains it. `out_dir` receives its `best.pt` / `last.pt`;
    `rng` is its own random stream (dropout), taken right after the student was built from it."""

    def __init__(self, config: Config, student: Student, labeler: PseudoLabeler, runtime: Runtime,
                 callbacks: Sequence[Callback], out_dir: Path, rng: RngStream):
        self.config = config
        self.rng = rng
        self.student = student
        self.labeler = labeler
        self.runtime = runtime
        self.callbacks = list(callbacks)
        self.out_dir = out_dir
        self.optimiser = build_optimiser(student.parameters(), config.optim)
        self.scheduler = build_scheduler(self.optimiser, config.optim, config.train.iterations)
        self.scaler = runtime.grad_scaler()
        self.best: ValidationResult | None = None
        self.history: list[ValidationResult] = []
        self.nonfinite = 0
        self.stopped = False
        self._failed = False
        self._totals: dict[str, float] = {}

    @property
    def failed(self) -> bool:
        """A loss of the current step was not finite: the head sits out its remaining micro-batches."""
        return self._failed

    @property
    def uses_pseudo_labels(self) -> bool:
        return self.config.train.supervision == "pseudo"

    # ------------------------------------------------------------ one optimiser step
    def begin_step(self) -> None:
        self.student.train()
        self.optimiser.zero_grad(set_to_none=True)
        self._failed, self._totals = False, {}

    def micro_batch(self, teacher: TeacherOutput, masks: torch.Tensor, iteration: int) -> None:
        """Forward, losses and backward of one micro-batch; a non-finite loss fails the whole step.

        masks (B, H, W): the ground truth, the target under `train.supervision=full`."""
        if self._failed:
            return
        with self.rng.active(), self.runtime.autocast():
            output = self.student(teacher.features, teacher.images.shape[-2:])
        scaled = self.scaled_loss(teacher, output, masks, iteration)
        if scaled is not None:
            scaled.backward()

    def scaled_loss(self, teacher: TeacherOutput, output: StudentOutput, masks: torch.Tensor,
                    iteration: int) -> torch.Tensor | None:
        """The loss of one micro-batch from this head's student `output`, scaled for accumulation and AMP
        (what to backpropagate), its parts added to the step's totals; None, failing the step, when not finite."""
        accumulation = self.config.train.accumulation
        with self.rng.active(), self.runtime.autocast():
            target = self.labeler(teacher, output.aff_dec, iteration).pseudo if self.uses_pseudo_labels else masks
            losses = method_losses(output.logits, output.aff_dec, target, teacher.grid, self.config.loss)
        if not torch.isfinite(losses["loss"]):
            self.optimiser.zero_grad(set_to_none=True)
            self._failed = True
            return None
        for key, value in losses.items():
            self._totals[key] = self._totals.get(key, 0.0) + value.item() / accumulation
        return self.scaler.scale(losses["loss"] / accumulation)

    def finish_step(self) -> dict[str, float] | None:
        """Apply the accumulated gradient. None when a loss was not finite or the step made a weight,
        optimiser or scaler tensor non-finite (then the step is rolled back)."""
        if self._failed:
            return None
        decoder = self.student.decoder
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), self.config.optim.grad_clip)
        snapshot = self._snapshot()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        if not self._state_finite():
            self._rollback(snapshot)
            return None
        return self._totals

    def _state_finite(self) -> bool:
        """Decoder weights, optimiser state and scaler all finite (one device sync)."""
        tensors = [*self.student.decoder.state_dict().values()]
        tensors += [v for state in self.optimiser.state.values() for v in state.values()]
        flags = [torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return bool(torch.stack(flags).all()) and nonfinite_entry(self.scaler.state_dict()) is None

    def _snapshot(self) -> dict:
        """Copies of decoder weights, optimiser and scaler state (the decoder is small next to the encoder pass)."""
        return {
            "decoder": {k: v.detach().clone() for k, v in self.student.decoder.state_dict().items()},
            "optimiser": copy.deepcopy(self.optimiser.state_dict()),
            "scaler": copy.deepcopy(self.scaler.state_dict()),
        }

    def _rollback(self, snapshot: dict) -> None:
        self.student.decoder.load_state_dict(snapshot["decoder"])
        self.optimiser.load_state_dict(snapshot["optimiser"])
        self.scaler.load_state_dict(snapshot["scaler"])
        self.optimiser.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ checkpoint state
    def state(self, iteration: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": to_dict(self.config),
            "iteration": iteration,
            "decoder": self.student.decoder.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": self.rng.cpu,
            "cuda_rng": self.rng.cuda,
            "nonfinite": self.nonfinite,
            "best": self.best.to_dict() if self.best else None,
        }

    def restore(self, state: dict) -> int:
        """Load a checkpoint of the same schedule; returns its iteration. One-line TrainingError otherwise."""
        saved = from_dict(state["config"])
        if saved.model.encoder != self.config.model.encoder:
            raise TrainingError(f"resume: checkpoint was trained with model.encoder={saved.model.encoder}, "
                                f"not {self.config.model.encoder}")
        for name in SCHEDULE_KEYS:
            old, new = getattr(saved.train, name), getattr(self.config.train, name)
            if old != new:
                raise TrainingError(f"resume: checkpoint was trained with train.{name}={old}, not {new}; "
                                    "resume with the same value or start a new run")
        self.student.decoder.load_state_dict(state["decoder"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.rng = RngStream(state["torch_rng"], list(state["cuda_rng"]))
        self.nonfinite = int(state["nonfinite"])
        self.best = ValidationResult.from_dict(state["best"]) if state["best"] else None
        return int(state["iteration"])
