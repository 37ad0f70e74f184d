"""A head: one configuration trained on the shared teacher pass.

It owns the student, its optimiser, schedule and loss scaler, its pseudo-labeler and loss settings,
its callbacks, checkpoint folder, best result and non-finite count. The trainer drives every head
through `begin_step` → `micro_batch` × accumulation → `finish_step`, and reads its device counters
at log steps (`read_counters`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from affseg.callbacks import Callback, ValidationResult
from affseg.config import Config, from_dict, to_dict
from affseg.engine.checkpoint import CHECKPOINT_FORMAT, TrainingError
from affseg.engine.runtime import RngStream, Runtime
from affseg.engine.schedule import build_optimiser, build_scheduler
from affseg.losses import method_losses
from affseg.method import PseudoLabeler, Refinement, Student, StudentOutput, TeacherOutput

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
        # capturable: AdamW's step count lives on the device, so a rollback there needs no host read
        self.optimiser = build_optimiser(student.parameters(), config.optim, capturable=runtime.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimiser, config.optim, config.train.iterations)
        self.scaler = runtime.grad_scaler()
        self.best: ValidationResult | None = None
        self.history: list[ValidationResult] = []
        self.nonfinite = 0  # skipped steps, as of the last `read_counters`
        self.unconverged = 0  # micro-batches whose box components missed their fixed point, idem
        self.stopped = False
        self.last_step_ok = True  # whether the last step counted, as of the last `read_counters`
        device = runtime.device
        self._pending_nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self._pending_unconverged = torch.zeros((), dtype=torch.long, device=device)
        self._ok = torch.ones((), dtype=torch.bool, device=device)
        self._totals: dict[str, torch.Tensor] = {}

    @property
    def uses_pseudo_labels(self) -> bool:
        return self.config.train.supervision == "pseudo"

    # ------------------------------------------------------------ one optimiser step
    # Nothing here reads a device value on the host: a non-finite loss or update is detected, counted and
    # rolled back on the device (SPEC §5.1, issue 13), and the host reads the counters at log steps.
    def begin_step(self) -> None:
        self.student.train()
        self.optimiser.zero_grad(set_to_none=True)
        self._ok = torch.ones((), dtype=torch.bool, device=self.runtime.device)
        self._totals = {}

    def micro_batch(self, teacher: TeacherOutput, masks: torch.Tensor, iteration: int) -> None:
        """Forward, losses and backward of one micro-batch; a non-finite loss voids the whole step.

        masks (B, H, W): the ground truth, the target under `train.supervision=full`."""
        self.scaled_loss(teacher, self.forward(teacher), masks, iteration).backward()

    def forward(self, teacher: TeacherOutput) -> StudentOutput:
        """This head's student on the teacher's features (its own dropout stream)."""
        with self.rng.active(), self.runtime.autocast():
            return self.student(teacher.features, teacher.images.shape[-2:])

    def scaled_loss(self, teacher: TeacherOutput, output: StudentOutput, masks: torch.Tensor,
                    iteration: int, refinement: Refinement | None = None) -> torch.Tensor:
        """The loss of one micro-batch from this head's student `output`, scaled for accumulation and AMP
        (what to backpropagate), its parts added to the step's totals on the device. A non-finite loss
        marks the step void (`finish_step` then rolls it back); 0 is backpropagated in its place.
        refinement: this head's pseudo-labels of `output` when the caller made them with other heads'
        (`affseg.method.refine_together`)."""
        accumulation = self.config.train.accumulation
        with self.rng.active(), self.runtime.autocast():
            if self.uses_pseudo_labels:
                if refinement is None:
                    refinement = self.labeler(teacher, output.aff_dec, iteration)
                target = refinement.pseudo
                self._pending_unconverged += (~refinement.converged).long()
            else:
                target = masks
            losses = method_losses(output.logits, output.aff_dec, target, teacher.grid, self.config.loss)
        finite = torch.isfinite(losses["loss"])
        self._ok &= finite
        for key, value in losses.items():
            self._totals[key] = self._totals.get(key, 0.0) + value.detach() / accumulation
        loss = torch.where(finite, losses["loss"], torch.zeros_like(losses["loss"]))
        return self.scaler.scale(loss / accumulation)

    def finish_step(self) -> dict[str, torch.Tensor]:
        """Apply the accumulated gradient, then keep the step only when its losses were finite and it left
        every weight and optimiser tensor finite; otherwise restore both, on the device. Returns the
        step's loss totals, device tensors (read them with `read_values`)."""
        decoder = self.student.decoder
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), self.config.optim.grad_clip)
        before = {key: tensor.clone() for key, tensor in self._state_tensors()}
        self.scaler.step(self.optimiser)
        self.scaler.update()
        after = self._state_tensors()
        finite = [torch.isfinite(tensor).all() for _, tensor in after if tensor.is_floating_point()]
        ok = self._ok & torch.stack(finite).all()
        with torch.no_grad():
            for key, tensor in after:  # state the optimiser's first step created was all zeros before it
                old = before.get(key)
                tensor.copy_(torch.where(ok, tensor, torch.zeros_like(tensor) if old is None else old))
        self._ok = ok
        self._pending_nonfinite += (~ok).long()
        return self._totals

    def _state_tensors(self) -> list[tuple[tuple, torch.Tensor]]:
        """(key, tensor) of the decoder's weights and buffers and of every optimiser state tensor."""
        pairs = [(("decoder", name), t) for name, t in self.student.decoder.state_dict(keep_vars=True).items()]
        for index, parameter in enumerate(self.optimiser.param_groups[0]["params"]):
            pairs += [(("optimiser", index, name), value) for name, value in self.optimiser.state.get(parameter, {}).items()
                      if isinstance(value, torch.Tensor)]
        return [(key, tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor) for key, tensor in pairs]

    def read_counters(self) -> int:
        """Read the device counters on the host (one sync): updates `nonfinite`, `unconverged` and
        `last_step_ok`; returns how many steps were skipped since the previous read."""
        pending = torch.stack([self._pending_nonfinite, self._pending_unconverged, self._ok.long()]).tolist()
        self._pending_nonfinite.zero_()
        self._pending_unconverged.zero_()
        self.nonfinite += pending[0]
        self.unconverged += pending[1]
        self.last_step_ok = bool(pending[2])
        return pending[0]

    @staticmethod
    def read_values(values: dict[str, torch.Tensor]) -> dict[str, float]:
        """A step's loss totals on the host (one sync)."""
        return dict(zip(values, torch.stack(list(values.values())).tolist())) if values else {}

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
            "nonfinite": self.nonfinite + int(self._pending_nonfinite),
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
