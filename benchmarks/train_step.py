"""Time and peak memory of ONE training iteration, phase by phase (not a test; prints tables).

One iteration = one micro-batch (accumulation 1) of `--batch` random images `--size`² with
CLASSES_PER_IMAGE present classes each, at an iteration past `refine_start` (A_f takes part in the
refinement). The phases call the model's own functions in the order `UniClAffSeg.forward` does:

| phase          | what runs                                                                |
|----------------|--------------------------------------------------------------------------|
| encoder        | `compute_cams` up to the end of the CAM block (the no-grad encoder part) |
| grad_cam       | the rest of `compute_cams`: forward from the CAM block, one backward per class slot |
| refine         | `encoder_affinities` + `refine_cams` (layer selection, Sinkhorn, random walk, boxes) |
| par_pseudo     | `pseudo_labels` (background, PAR, argmax)                                |
| decoder_loss   | `model.decoder` + `decoder_affinity`, and later `model.losses`           |
| backward       | `losses["loss"].backward()`                                              |

The encoder / Grad-CAM boundary is taken by a forward hook on the last module the CAM block calls.
`step` is the real `model(...)` + `model.losses` + backward, timed on its own (its runs alternate
with the phased ones) as a cross-check of the phase sum. Times: median of `--repeats` after one
warm-up, `torch.cuda.synchronize()` at every boundary on CUDA. Memory: the peak of allocated tensor
memory during a phase above what was allocated when the phase began (CUDA:
`torch.cuda.max_memory_allocated`; CPU: the allocation events of `torch.profiler` with
`profile_memory=True`, in one extra, untimed run). CUDA runs under autocast bf16, as training
does; CPU runs in fp32.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--encoders unicl_swin_tiny unicl_swin_b]
        [--batch 4] [--size 224] [--repeats 3] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from affseg.backbones.registry import ENCODER_NAMES
from affseg.cam import compute_cams
from affseg.config import load_config
from affseg.data.classes import NUM_FOREGROUND
from affseg.model import ModelOutput, UniClAffSeg, build_model
from affseg.refine.affinity import decoder_affinity, encoder_affinities
from affseg.refine.pseudo import pseudo_labels, refine_cams
from stages import PHASES, PhaseClock, block_end_module, cpu_phase_peaks  # benchmarks/stages.py

STEP = "step"
CLASSES_PER_IMAGE = 2  # present classes per image (VOC averages about 1.5)
WARMUP_RUNS = 1
SEED = 0
MIB = 2**20


def phased_step(model: UniClAffSeg, images: torch.Tensor, labels: torch.Tensor, iteration: int,
                autocast: Callable[[], contextlib.AbstractContextManager], clock: PhaseClock) -> None:
    """One training step, phase by phase, with the model's own functions (see the module docstring)."""
    model.train()
    model.decoder.zero_grad(set_to_none=True)
    config = model.config
    hook = block_end_module(model).register_forward_hook(lambda *_: clock.switch("grad_cam"))
    try:
        with autocast():
            clock.switch("encoder")
            cams, features = compute_cams(model.encoder, model.classifier, images, labels, model.cam_block,
                                          config.model.cam_method)
            clock.switch("decoder_loss")
            logits, fused = model.decoder([features.blocks[i] for i in model.decoder_blocks], images.shape[-2:])
            aff_dec = decoder_affinity(fused)
        # as in UniClAffSeg.pseudo_labels: no grad, float32 (autocast off)
        with torch.no_grad():
            clock.switch("refine")
            aff_enc = encoder_affinities([features.blocks[i].float() for i in model.affinity_blocks])
            decoder_aff = aff_dec.detach().float() if model.refinement_active(iteration) else None
            refined = refine_cams(cams.float(), aff_enc, decoder_aff, config.refine)
            clock.switch("par_pseudo")
            pseudo = pseudo_labels(refined, labels, images.float(), config.refine, use_par=config.refine.par.enabled)
        with autocast():
            clock.switch("decoder_loss")
            output = ModelOutput(logits=logits, aff_dec=aff_dec, cams=cams, refined=refined, pseudo=pseudo)
            losses = model.losses(output)
        clock.switch("backward")
        losses["loss"].backward()
        clock.stop()
    finally:
        hook.remove()


def whole_step(model: UniClAffSeg, images: torch.Tensor, labels: torch.Tensor, iteration: int,
               autocast: Callable[[], contextlib.AbstractContextManager], clock: PhaseClock) -> None:
    """The same step through `model(...)`, as `Trainer._step` runs it."""
    model.train()
    model.decoder.zero_grad(set_to_none=True)
    clock.switch(STEP)
    with autocast():
        losses = model.losses(model(images, labels, iteration))
    losses["loss"].backward()
    clock.stop()


def measure(name: str, device: torch.device, batch: int, size: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{phase: (median ms, peak MiB)} for one encoder on one device, `STEP` included."""
    config = load_config(None, [f"model.encoder={name}", "model.checkpoint=random", f"train.batch_size={batch}",
                                "train.accumulation=1", f"data.crop_size={size}"])
    torch.manual_seed(SEED)
    model = build_model(config, device)
    iteration = config.train.iterations  # past refine_start: A_f takes part
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.zeros(batch, NUM_FOREGROUND)
    for row in range(batch):
        labels[row, torch.randperm(NUM_FOREGROUND, generator=generator)[:CLASSES_PER_IMAGE]] = 1
    labels = labels.to(device)
    if device.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    phased: list[PhaseClock] = []
    whole: list[PhaseClock] = []
    for run in range(WARMUP_RUNS + repeats):  # interleaved: a load change on the machine hits both alike
        for step, clocks in ((phased_step, phased), (whole_step, whole)):
            clock = PhaseClock(device)
            step(model, images, labels, iteration, autocast, clock)
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
                model.decoder.zero_grad(set_to_none=True)  # free the last run's gradients before profiling
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
                    step(model, images, labels, iteration, autocast, PhaseClock(device))
                profiler.export_chrome_trace(str(trace))
                peaks.update(cpu_phase_peaks(trace, names))
    return {phase: (times[phase], peaks[phase] / MIB) for phase in (*PHASES, STEP)}


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
    tables = (("time (ms)", 0, (*PHASES, "sum", STEP)),
              ("peak memory above the phase's start (MiB)", 1, (*PHASES, STEP)))
    for title, index, columns in tables:
        print(f"\n{title}\n")
        print("| encoder | device | " + " | ".join(columns) + " |")
        print("|---|---|" + "---:|" * len(columns))
        for name, device, result in rows:
            values = {phase: value[index] for phase, value in result.items()}
            values["sum"] = sum(values[phase] for phase in PHASES)
            print(f"| {name} | {device.type} | " + " | ".join(f"{values[c]:.1f}" for c in columns) + " |")
    print(f"\nsum = the phases added up; {STEP} = the real model(...) + model.losses + backward, measured alone")


if __name__ == "__main__":
    main()
