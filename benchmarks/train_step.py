"""Time and peak memory of ONE training iteration, phase by phase (not a test; prints tables).

One iteration = one micro-batch (accumulation 1) of `--batch` random images `--size`² with
CLASSES_PER_IMAGE present classes each, at an iteration past `refine_start` (A_f takes part in the
refinement). The phases call the method's own functions in the order `Trainer._step` does (the
teacher pass, then the head's student, pseudo-labeler and losses):

| phase          | what runs                                                                |
|----------------|--------------------------------------------------------------------------|
| encoder        | `compute_cams` up to the end of the CAM block (the no-grad encoder part) |
| grad_cam       | the rest of `compute_cams`: forward from the CAM block, one batched backward over the class slots |
| refine         | `encoder_affinities` + `refine_cams` (layer selection, Sinkhorn, random walk, boxes) |
| par_pseudo     | `pseudo_labels` (background, PAR, argmax)                                |
| decoder_loss   | the student (decoder + `decoder_affinity`), and later `method_losses`    |
| backward       | `losses["loss"].backward()`                                              |

The encoder / Grad-CAM boundary is taken by a forward hook on the last module the CAM block calls.
`step` is the real teacher pass + `Head.micro_batch` (student, pseudo-labels, losses, backward),
timed on its own (its runs alternate with the phased ones) as a cross-check of the phase sum. Times:
median of `--repeats` after one warm-up, `torch.cuda.synchronize()` at every boundary on CUDA.
Launches: counted by the torch profiler in one more, untimed run (`stages.phase_launches`). Memory: the
peak of allocated tensor memory during a phase above what was allocated when the phase
began (CUDA: `torch.cuda.max_memory_allocated`; CPU: the allocation events of `torch.profiler` with
`profile_memory=True`, in one extra, untimed run). CUDA runs under autocast bf16, as training does;
CPU runs in fp32.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--encoders unicl_swin_tiny unicl_swin_b]
        [--batch 4] [--size 224] [--repeats 3] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from affseg.backbones.registry import ENCODER_NAMES
from affseg.cam import compute_cams
from affseg.config import load_config
from affseg.data.classes import NUM_FOREGROUND
from affseg.engine.head import Head
from affseg.engine.runtime import RngStream, Runtime
from affseg.losses import method_losses
from affseg.method import Teacher, build_pseudo_labeler, build_student, build_teacher
from affseg.refine.affinity import encoder_affinities
from affseg.refine.pseudo import pseudo_labels, refine_cams
from stages import PHASES, PhaseClock, block_end_module, cpu_phase_peaks, phase_launches  # benchmarks/stages.py

STEP = "step"
CLASSES_PER_IMAGE = 2  # present classes per image (VOC averages about 1.5)
WARMUP_RUNS = 1
SEED = 0
MIB = 2**20


def phased_step(teacher: Teacher, head: Head, images: torch.Tensor, labels: torch.Tensor, iteration: int,
                clock: PhaseClock) -> None:
    """One training step, phase by phase, with the method's own functions (see the module docstring)."""
    head.begin_step()
    config, student, autocast = head.config, head.student, head.runtime.autocast
    hook = block_end_module(teacher).register_forward_hook(lambda *_: clock.switch("grad_cam"))
    try:
        with autocast():
            clock.switch("encoder")
            cams, features = compute_cams(teacher.encoder, teacher.classifier, teacher.encoder_input(images), labels,
                                          teacher.cam_block, teacher.cam_method)
            clock.switch("decoder_loss")
            output = student([features.blocks[i] for i in teacher.decoder_blocks], images.shape[-2:])
        # as in Teacher.forward and PseudoLabeler: no grad, float32 (autocast off)
        with torch.no_grad():
            clock.switch("refine")
            aff_enc = encoder_affinities([features.blocks[i].float() for i in teacher.affinity_blocks])
            decoder_aff = output.aff_dec.detach().float() if head.labeler.uses_decoder(iteration) else None
            refined = refine_cams(cams.float(), aff_enc, decoder_aff, config.refine)
            clock.switch("par_pseudo")
            pseudo = pseudo_labels(refined, labels, images.float(), config.refine, use_par=config.refine.par.enabled)
        with autocast():
            clock.switch("decoder_loss")
            losses = method_losses(output.logits, output.aff_dec, pseudo, tuple(cams.shape[-2:]), config.loss)
        clock.switch("backward")
        losses["loss"].backward()
        clock.stop()
    finally:
        hook.remove()


def whole_step(teacher: Teacher, head: Head, images: torch.Tensor, labels: torch.Tensor, iteration: int,
               clock: PhaseClock) -> None:
    """The same step as `Trainer._step` runs one micro-batch: the teacher pass, then `Head.micro_batch`."""
    head.begin_step()
    clock.switch(STEP)
    with head.runtime.autocast():
        taught = teacher(images, labels)
    masks = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long, device=images.device)  # unused: pseudo
    head.micro_batch(taught, masks, iteration)
    clock.stop()


def measure(name: str, device: torch.device, batch: int, size: int,
            repeats: int) -> dict[str, tuple[float, float, int]]:
    """{phase: (median ms, peak MiB, launches)} for one encoder on one device, `STEP` included."""
    config = load_config(None, [f"model.encoder={name}", "model.checkpoint=random", f"train.batch_size={batch}",
                                "train.accumulation=1", f"data.crop_size={size}"])
    torch.manual_seed(SEED)
    runtime = Runtime(device, torch.bfloat16 if device.type == "cuda" else None)  # CPU: fp32
    teacher = build_teacher(config, device)
    out_dir = Path(tempfile.gettempdir())  # never written: no hook runs, no checkpoint is saved
    head = Head(config, build_student(config, teacher), build_pseudo_labeler(config), runtime, [], out_dir,
                RngStream.capture())
    iteration = config.train.iterations  # past refine_start: A_f takes part
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.zeros(batch, NUM_FOREGROUND)
    for row in range(batch):
        labels[row, torch.randperm(NUM_FOREGROUND, generator=generator)[:CLASSES_PER_IMAGE]] = 1
    labels = labels.to(device)

    phased: list[PhaseClock] = []
    whole: list[PhaseClock] = []
    for run in range(WARMUP_RUNS + repeats):  # interleaved: a load change on the machine hits both alike
        for step, clocks in ((phased_step, phased), (whole_step, whole)):
            clock = PhaseClock(device)
            step(teacher, head, images, labels, iteration, clock)
            if run >= WARMUP_RUNS:
                clocks.append(clock)
    times = {phase: statistics.median(c.seconds[phase] for c in phased) * 1e3 for phase in PHASES}
    times[STEP] = statistics.median(c.seconds[STEP] for c in whole) * 1e3
    if device.type == "cuda":
        peaks = {phase: max(c.peak_bytes[phase] for c in phased) for phase in PHASES}
        peaks[STEP] = max(c.peak_bytes[STEP] for c in whole)
    else:
        peaks = {}
        with tempfile.TemporaryDirectory() as folder:
            for step, names in ((phased_step, PHASES), (whole_step, (STEP,))):
                trace = Path(folder) / "trace.json"
                head.optimiser.zero_grad(set_to_none=True)  # free the last run's gradients before profiling
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
                    step(teacher, head, images, labels, iteration, PhaseClock(device))
                profiler.export_chrome_trace(str(trace))
                peaks.update(cpu_phase_peaks(trace, names))
    counts = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for step, names in ((phased_step, PHASES), (whole_step, (STEP,))):
        with profile(activities=activities) as profiler:
            step(teacher, head, images, labels, iteration, PhaseClock(device))
        counts.update(phase_launches(profiler.events(), names, device))
    return {phase: (times[phase], peaks[phase] / MIB, counts[phase]) for phase in (*PHASES, STEP)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["unicl_swin_tiny", "unicl_swin_b"], choices=ENCODER_NAMES)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cpu, and cuda too when a GPU is visible")
    args = parser.parse_args()
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]

    rows = [(name, device, measure(name, device, args.batch, args.size, args.repeats))
            for device in devices for name in args.encoders]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}", end="")
    print(f", CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    print(f"one iteration: batch {args.batch}, {args.size}x{args.size}, accumulation 1, "
          f"{CLASSES_PER_IMAGE} classes per image; median of {args.repeats} after {WARMUP_RUNS} warm-up; "
          "CUDA under autocast bf16")
    tables = (("time (ms)", 0, (*PHASES, "sum", STEP), "{:.1f}"),
              ("peak memory above the phase's start (MiB)", 1, (*PHASES, STEP), "{:.1f}"),
              ("kernel launches (CPU: aten operators that call no other; CUDA: kernel launch calls)", 2,
               (*PHASES, "sum", STEP), "{:d}"))
    for title, index, columns, form in tables:
        print(f"\n{title}\n")
        print("| encoder | device | " + " | ".join(columns) + " |")
        print("|---|---|" + "---:|" * len(columns))
        for name, device, result in rows:
            values = {phase: value[index] for phase, value in result.items()}
            values["sum"] = sum(values[phase] for phase in PHASES)
            print(f"| {name} | {device.type} | " + " | ".join(form.format(values[c]) for c in columns) + " |")
    print(f"\nsum = the phases added up; {STEP} = the real teacher pass + Head.micro_batch "
          "(student, pseudo-labels, losses, backward), measured alone")


if __name__ == "__main__":
    main()
