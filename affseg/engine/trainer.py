"""The loop: one teacher pass per micro-batch, every active head trained on it; accumulation, AMP,
warm-up + poly schedule, validation, checkpoints and exact resume (through the hooks)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from affseg.callbacks import Callback, TrainResult
from affseg.config import Config, ConfigError, fusable, save_config, to_dict
from affseg.data.demo import DemoSpec, make_demo
from affseg.data.sampling import DrawDataset, ResumableBatches
from affseg.data.transforms import TrainAugment
from affseg.data.voc import VocSegmentation
from affseg.engine.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, TrainingError, load_checkpoint, writable_folder
from affseg.engine.batched import StackedDecoders, batch_heads_enabled
from affseg.engine.head import Head
from affseg.engine.memory import fit_message, free_bytes, head_bytes
from affseg.engine.hooks import DEFAULT_HOOKS
from affseg.engine.runtime import RngStream, Runtime
from affseg.method import Refinement, build_pseudo_labeler, build_student, build_teacher, refine_together
from affseg.slots import max_present

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Member:
    """One configuration of a fused group, with its observers and the checkpoint it resumes from."""

    config: Config
    callbacks: Sequence[Callback] = ()
    resume_from: str | Path | None = None


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_fusable(configs: Sequence[Config]) -> None:
    """One-line ConfigError naming the first key outside the fusable set that differs between members,
    or a train.out_dir they share."""
    first = _flat(to_dict(configs[0]))
    for config in configs[1:]:
        for key, value in _flat(to_dict(config)).items():
            if value != first[key] and not fusable(key):
                raise ConfigError(f"{key}: {first[key]!r} vs {value!r} inside one fused group; it cannot be fused "
                                  "(only refine.*, loss.*, optim.lr, optim.warmup_iters, optim.weight_decay can)")
    out_dirs = [config.train.out_dir for config in configs]
    if len(set(out_dirs)) != len(out_dirs):
        raise ConfigError(f"train.out_dir: fused members need one folder each, got {out_dirs}")


def ensure_dataset(config: Config) -> None:
    """Build the demo set at `data.root` when it is missing and `data.demo` allows it."""
    root = Path(config.data.root)
    if config.data.demo and not root.is_dir():
        if root.parts[-2:] != ("VOCdevkit", "VOC2012"):
            raise TrainingError(f"data.root: {root} must end in VOCdevkit/VOC2012 to build the demo set there")
        log.info("building the demo dataset at %s", root)
        make_demo(root.parent.parent, DemoSpec(seed=config.data.demo_seed))


class Trainer:
    """Teacher, data and heads for one run; `run()` executes it. One head per configuration: `Trainer(config)`
    trains one, `Trainer.fused(members)` a group sharing data, augmentation and the teacher pass (SPEC §5.4)."""

    def __init__(self, config: Config, callbacks: Sequence[Callback] = (), resume_from: str | Path | None = None):
        self._setup([Member(config, tuple(callbacks), resume_from)])

    @classmethod
    def fused(cls, members: Sequence[Member]) -> "Trainer":
        """K configurations that differ only in fusable keys, each with its own out_dir and callbacks."""
        trainer = cls.__new__(cls)
        trainer._setup(list(members))
        return trainer

    def _setup(self, members: list[Member]) -> None:
        configs = [member.config for member in members]
        check_fusable(configs)
        config = self.config = configs[0]
        out_dirs = [writable_folder(Path(c.train.out_dir)) for c in configs]
        self.runtime = Runtime.create(config.train.device, config.train.amp)
        torch.manual_seed(config.train.seed)
        ensure_dataset(config)
        self.teacher = build_teacher(config, self.runtime.device, group=configs)
        after_teacher = RngStream.capture()  # every member's student is drawn from here, as when trained alone
        self.heads = []
        for member, out_dir in zip(members, out_dirs):
            after_teacher.restore()
            student = build_student(member.config, self.teacher)
            self.heads.append(Head(member.config, student, build_pseudo_labeler(member.config), self.runtime,
                                   member.callbacks, out_dir, RngStream.capture()))
        batched = len(self.heads) > 1 and batch_heads_enabled(config.train.batch_heads, self.runtime.device)
        if len(self.heads) > 1:
            self._check_memory(batched)
        self.stacked = StackedDecoders(self.heads[0].student.decoder) if batched else None
        starts = {head.restore(load_checkpoint(m.resume_from)) for head, m in zip(self.heads, members)
                  if m.resume_from is not None}
        if len(starts) > 1 or (starts and any(m.resume_from is None for m in members)):
            raise TrainingError(f"resume: the members of a fused group resume from one iteration, got {sorted(starts)}")
        self.iteration = starts.pop() if starts else 0
        self.hooks = [hook() for hook in DEFAULT_HOOKS]
        self.step_values: dict[Head, dict[str, torch.Tensor]] = {}  # each head's loss totals, on the device
        self.validations: dict[Head, bool] = {}  # heads validated this iteration → is_best
        data = config.data
        augment = TrainAugment(data.crop_size, data.scale_min, data.scale_max, data.flip_prob)
        self.train_set = VocSegmentation(data.root, data.train_split, augment, data.cls_labels, seed=config.train.seed)
        self.val_set = VocSegmentation(data.root, data.val_split, None, data.cls_labels, limit=data.val_limit)
        self.pseudo_set = VocSegmentation(data.root, data.train_split, None, data.cls_labels, limit=data.pseudo_subset)

    def _check_memory(self, batched: bool) -> None:
        """One-line TrainingError, with the largest K that fits, when the group's heads would not fit the device."""
        parameters = sum(p.numel() for p in self.heads[0].student.parameters())
        per_head = head_bytes(self.config, parameters, batched)
        problem = fit_message(len(self.heads), per_head, free_bytes(self.runtime.device), self.runtime.device)
        if problem:
            raise TrainingError(problem)

    def active_heads(self) -> list[Head]:
        return [head for head in self.heads if not head.stopped]

    def _loader(self) -> DataLoader:
        cfg = self.config
        sampler = ResumableBatches(len(self.train_set), cfg.train.batch_size, cfg.train.seed,
                                   start_batch=self.iteration * cfg.train.accumulation)
        # The loader's own generator: drawing its base seed from the global RNG would shift the
        # dropout stream of a resumed run (its loader is created after the RNG state is restored).
        generator = torch.Generator().manual_seed(cfg.train.seed)
        return DataLoader(DrawDataset(self.train_set, cfg.train.seed), batch_sampler=sampler,
                          num_workers=cfg.data.num_workers, pin_memory=self.runtime.device.type == "cuda",
                          persistent_workers=cfg.data.num_workers > 0, generator=generator)

    def _step(self, batches) -> dict[Head, dict[str, torch.Tensor]]:
        """One optimiser step of every active head over `accumulation` micro-batches, one teacher pass each.

        Always consumes exactly `accumulation` micro-batches, so batch t stays a function of (seed, t); a
        step whose loss or update was not finite is rolled back on the device (`Head.finish_step`)."""
        heads = self.active_heads()
        for head in heads:
            head.begin_step()
        device = self.runtime.device
        for _ in range(self.config.train.accumulation):
            batch = next(batches)
            slots = max_present(batch["labels"])  # on the CPU labels: no device sync
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            valid = batch["valid"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            with self.runtime.autocast():
                teacher = self.teacher(images, labels, valid, slots)
            if len(heads) > 1:
                self._group_micro_batch(heads, teacher, masks)
            else:
                heads[0].micro_batch(teacher, masks, self.iteration)
        return {head: head.finish_step() for head in heads}

    def _group_micro_batch(self, heads: list[Head], teacher, masks: torch.Tensor) -> None:
        """`Head.micro_batch` of every head of a fused group at once: the decoders one by one or in one
        batched call (`train.batch_heads`), the pseudo-labels of all heads with one PAR per PAR setting
        (`refine_together`), and one backward."""
        if self.stacked is not None:
            with self.runtime.autocast():
                outputs = self.stacked([h.student.decoder for h in heads], [h.rng for h in heads],
                                       teacher.features, teacher.images.shape[-2:])
        else:
            outputs = [head.forward(teacher) for head in heads]
        labelled = [index for index, head in enumerate(heads) if head.uses_pseudo_labels]
        refinements: list[Refinement | None] = [None] * len(heads)
        together = refine_together([heads[i].labeler for i in labelled], teacher,
                                   [outputs[i].aff_dec for i in labelled], self.iteration)
        for index, refinement in zip(labelled, together):
            refinements[index] = refinement
        scaled = [head.scaled_loss(teacher, output, masks, self.iteration, refinement)
                  for head, output, refinement in zip(heads, outputs, refinements)]
        torch.stack(scaled).sum().backward()

    def is_log_step(self) -> bool:
        """Every `train.log_interval` iterations, and at the first."""
        return self.iteration == 1 or self.iteration % self.config.train.log_interval == 0

    def reads_host(self) -> bool:
        """Whether this iteration reads device values on the host anyway: a log step, a validation or the
        end. Only then are the heads' counters read, so that other steps never wait for the device."""
        cfg, done = self.config.train, self.iteration
        return self.is_log_step() or done % cfg.val_interval == 0 or done == cfg.iterations

    def _read_counters(self) -> None:
        """Every active head's skipped steps and unconverged box masks since the last read: a warning for
        each, and a one-line TrainingError past `train.max_nonfinite`."""
        cfg = self.config.train
        for head in self.active_heads():
            unconverged = head.unconverged
            skipped = head.read_counters()
            if skipped:
                log.warning("iteration %d: %d non-finite loss or update step(s) skipped since the last log "
                            "(%d so far)", self.iteration, skipped, head.nonfinite)
            if head.unconverged > unconverged:
                log.warning("iteration %d: the box masks' connected components missed their fixed point in %d "
                            "micro-batch(es) (boxes split, still covering the CAM regions)", self.iteration,
                            head.unconverged - unconverged)
            if head.nonfinite > cfg.max_nonfinite:
                raise TrainingError(f"{head.nonfinite} non-finite losses or updates (train.max_nonfinite="
                                    f"{cfg.max_nonfinite}); lower optim.lr or check the data")

    def results(self) -> list[TrainResult]:
        """One `TrainResult` per head, in head order."""
        return [
            TrainResult(
                best=head.best,
                best_checkpoint=head.out_dir / BEST_CHECKPOINT if head.best else None,
                last_checkpoint=head.out_dir / LAST_CHECKPOINT if head.history else None,
                iterations_done=self.iteration,
                stopped_early=head.stopped,
                history=head.history,
            )
            for head in self.heads
        ]

    def run(self) -> TrainResult:
        """Train until `train.iterations` or until every head has stopped; the first head's result."""
        for head in self.heads:
            save_config(head.config, head.out_dir / "config.yaml")
        for hook in self.hooks:
            hook.before_train(self)
        batches = iter(self._loader())
        while self.iteration < self.config.train.iterations and self.active_heads():
            self.step_values = self._step(batches)
            for head in self.step_values:
                head.scheduler.step()
            self.iteration += 1
            if self.reads_host():
                self._read_counters()
            for hook in self.hooks:
                hook.after_step(self)
        for hook in self.hooks:
            hook.after_train(self)
        return self.results()[0]
