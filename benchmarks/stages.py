"""Shared timing code of the training-step benchmarks (`train_step.py`, `gpu_check.py`).

`PhaseClock` times consecutive phases (CUDA-synchronised at every boundary, CUDA peak memory per
phase, a `torch.profiler` range per phase); `instrumented(teacher, students, clock)` attributes the
time of the REAL teacher pass, student forward, pseudo-labels, losses and `.backward()` (as
`Trainer._step` runs them) to the phases by wrapping the functions `affseg.method.teacher`,
`affseg.method.student`, `affseg.method.labeler` and `affseg.engine.head` call (a stack: a nested
call resumes its caller's phase when it returns):

| phase        | what runs                                                                   |
|--------------|-----------------------------------------------------------------------------|
| encoder      | `compute_cams` up to the end of the CAM block (the no-grad encoder part)    |
| grad_cam     | the rest of `compute_cams`: forward from the CAM block, one batched backward over the class slots |
| refine       | encoder affinities and `PseudoLabeler` without PAR: Sinkhorn, random walk, boxes |
| par_pseudo   | `label_scores`, `par`, `labels_from_scores` (background, PAR, argmax; `pseudo_labels` in validation) |
| decoder_loss | the student's decoder, `decoder_affinity`, `method_losses`                  |
| backward     | `Tensor.backward` (the decoder's backward)                                  |
| rest         | everything else inside the timed call (optimiser step, glue)                |
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function

import affseg.engine.head as head_module
import affseg.method.labeler as labeler_module
import affseg.method.student as student_module
import affseg.method.teacher as teacher_module
from affseg.method import PseudoLabeler, Student, Teacher

PHASES = ("encoder", "grad_cam", "refine", "par_pseudo", "decoder_loss", "backward")
REST = "rest"
# (module, function name) wrapped by `instrumented`, and their phase
MODULE_PHASES = {
    (teacher_module, "compute_cams"): "encoder",
    (teacher_module, "encoder_affinities"): "refine",
    (student_module, "decoder_affinity"): "decoder_loss",
    (labeler_module, "checked_refine_cams"): "refine",
    (labeler_module, "pseudo_labels"): "par_pseudo",
    (labeler_module, "label_scores"): "par_pseudo",
    (labeler_module, "par"): "par_pseudo",
    (labeler_module, "labels_from_scores"): "par_pseudo",
    (head_module, "method_losses"): "decoder_loss",
}
MIB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of `fn`, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class PhaseClock:
    """Wall time, CUDA peak memory and profiler ranges of consecutive phases.

    `switch(name)` ends the running phase (if any) and starts `name`; `stop()` ends it. `push` /
    `pop` nest phases (pop resumes the caller's phase). A phase may run several times: times add
    up, peaks (bytes above the phase's start) take the maximum; `peak_total` is the absolute peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.peak_total = 0
        self._phase: str | None = None
        self._stack: list[str] = []
        self._range: contextlib.AbstractContextManager | None = None
        self._start = 0.0
        self._allocated = 0

    def stop(self) -> None:
        if self._phase is None:
            return
        sync(self.device)
        elapsed = time.perf_counter() - self._start
        self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + elapsed
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_total = max(self.peak_total, peak)
            self.peak_bytes[self._phase] = max(self.peak_bytes.get(self._phase, 0), peak - self._allocated)
        self._range.__exit__(None, None, None)
        self._phase = None

    def switch(self, phase: str) -> None:
        self.stop()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._allocated = torch.cuda.memory_allocated(self.device)
        self._phase = phase
        self._range = record_function(phase)
        self._range.__enter__()
        sync(self.device)
        self._start = time.perf_counter()

    def push(self, phase: str) -> None:
        self._stack.append(phase)
        self.switch(phase)

    def replace(self, phase: str) -> None:
        """The running (innermost) phase becomes `phase`."""
        if self._stack:
            self._stack[-1] = phase
        self.switch(phase)

    def pop(self) -> None:
        self._stack.pop()
        if self._stack:
            self.switch(self._stack[-1])
        else:
            self.stop()

    def ms(self, phase: str) -> float:
        return self.seconds.get(phase, 0.0) * 1e3


def block_end_module(teacher: Teacher) -> nn.Module:
    """The last module that the CAM block calls: its forward hook marks the end of the no-grad part.

    UniCL Swin blocks run through `swin.run_block`, whose last module call is the block's MLP;
    CLIP ViT blocks are called as modules.
    """
    encoder = teacher.encoder
    if hasattr(encoder, "image_encoder"):
        blocks = [block for layer in encoder.image_encoder.layers for block in layer.blocks]
        return blocks[teacher.cam_block].mlp
    return encoder.model.visual.transformer.resblocks[teacher.cam_block]


def _in_phase(function: Callable, phase: str, clock: PhaseClock) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        clock.push(phase)
        try:
            return function(*args, **kwargs)
        finally:
            clock.pop()
    return wrapper


@contextlib.contextmanager
def instrumented(teacher: Teacher, students: Sequence[Student], clock: PhaseClock) -> Iterator[None]:
    """Within: calls of `teacher`, of the `students`' decoders, of any `PseudoLabeler` and of `method_losses`
    from a head (and any `.backward()`) report their phases to `clock` (see module docstring).

    A name missing from its module raises AttributeError naming it (the method changed: update MODULE_PHASES).
    """
    originals = {(module, name): getattr(module, name) for module, name in MODULE_PHASES}
    labeler_call = PseudoLabeler.__call__
    backward = torch.Tensor.backward
    handles = [block_end_module(teacher).register_forward_hook(lambda *_: clock.replace("grad_cam"))]
    for student in students:
        handles += [student.decoder.register_forward_pre_hook(lambda *_: clock.push("decoder_loss")),
                    student.decoder.register_forward_hook(lambda *_: clock.pop())]
    try:
        for (module, name), phase in MODULE_PHASES.items():
            setattr(module, name, _in_phase(originals[module, name], phase, clock))
        PseudoLabeler.__call__ = _in_phase(labeler_call, "refine", clock)
        torch.Tensor.backward = _in_phase(backward, "backward", clock)
        yield
    finally:
        torch.Tensor.backward = backward
        PseudoLabeler.__call__ = labeler_call
        for (module, name), function in originals.items():
            setattr(module, name, function)
        for handle in handles:
            handle.remove()


def timed(function: Callable[[], object], clock: PhaseClock) -> None:
    """Run `function` with everything outside the named phases counted as `REST`."""
    clock.push(REST)
    try:
        function()
    finally:
        clock.pop()


def cpu_phase_peaks(trace: Path, phases: tuple[str, ...]) -> dict[str, int]:
    """Per phase name: the largest rise of allocated CPU memory above its level at the phase's start.

    Reads a chrome trace of `torch.profiler` (profile_memory=True): `[memory]` instant events carry
    signed `Bytes`; phases are the `record_function` ranges of those names.
    """
    events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    ranges = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events
              if e.get("ph") == "X" and e.get("name") in phases]
    peaks = dict.fromkeys(phases, 0)
    for name, start, end in ranges:
        level = peak = 0
        for stamp, size in memory:
            if stamp < start:
                continue
            if stamp > end:
                break
            level += size
            peak = max(peak, level)
        peaks[name] = max(peaks[name], peak)
    return peaks


KERNEL_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


# aten operators that move no data and would launch no kernel on a GPU: views, aliases, allocation, queries
NO_WORK_OPS = frozenset(f"aten::{name}" for name in (
    "as_strided", "view", "_unsafe_view", "_reshape_alias", "alias", "detach", "resolve_conj", "resolve_neg",
    "empty", "empty_strided", "empty_like", "resize_", "_nnpack_available", "lift_fresh", "result_type",
    "expand", "expand_as", "permute", "transpose", "t", "numpy_T", "select", "slice", "narrow", "unsqueeze",
    "squeeze", "reshape", "flatten", "unflatten", "view_as", "split", "split_with_sizes", "chunk", "unbind",
    "contiguous", "to", "type_as", "movedim", "diagonal", "unfold", "size", "stride", "dim", "dropout",
    "set_", "lift", "_has_compatible_shallow_copy_type",
))


def _does_work(event) -> bool:
    """An aten operator that moves data: itself (outside `NO_WORK_OPS`) or through a callee (a `reshape` that
    has to copy)."""
    return event.name.startswith("aten::") and (
        event.name not in NO_WORK_OPS or any(_does_work(child) for child in event.cpu_children))


def is_launch(event, device: torch.device) -> bool:
    """A profiler event that launches work: a CUDA kernel launch call on a GPU; on the CPU, an aten operator
    that the Python code (or the autograd engine) called and that does work (`_does_work`): `aten::linear`
    counts once, not the `addmm` and `copy_` it calls on the CPU; views, aliases and allocations not at all.
    That is the CPU's closest count of what would be a kernel launch on a GPU."""
    if device.type == "cuda":
        return event.name in KERNEL_LAUNCH_CALLS
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return _does_work(event)


def phase_launches(events, phases: Sequence[str], device: torch.device) -> dict[str, int]:
    """Per phase name: the launches (`is_launch`) inside that phase's `record_function` ranges.
    events: `torch.profiler.profile(...).events()`."""
    counts = dict.fromkeys(phases, 0)
    for event in events:
        if not is_launch(event, device):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in counts:
            parent = parent.cpu_parent
        if parent is not None:
            counts[parent.name] += 1
    return counts
