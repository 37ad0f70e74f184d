"""One-command GPU check: training step, data pipeline, a short real-size sweep, evaluation (prints a table).

Everything it needs is generated into a work folder (nothing is downloaded): random encoder weights
saved in the published UniCL layout (`save_unicl`), and a VOC-layout set of VOC-sized JPEGs
(500x375) rendered with the demo generator. Sections (each under a time budget; a failure becomes
one row with its one-line error and the next section runs):

- train_step: `Trainer._step` (batch 4 x accumulation 2, bf16 on CUDA) at 224 and 448 px on batches
  from the real data pipeline: images/s and peak memory of the plain step, per-phase ms of an
  instrumented one (phases: benchmarks/stages.py).
- data_pipeline: the training DataLoader (decode, rescale, crop, flip) with 0/4/8 workers: images/s.
- sweep: `affseg sweep --space refine --profile voc` with 2 trials of 40 iterations (subprocess).
- evaluate: `affseg.evaluate.evaluate` at long side 512, scales 1.0/0.75 + flip: images/s.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--work DIR] [--smoke]

`--smoke` runs the same code on CPU with the tiny encoder and tiny sizes (CI).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from stages import PHASES, REST, PhaseClock, instrumented, sync, timed  # noqa: E402  (benchmarks/stages.py)

from affseg.backbones.checkpoint import save_unicl  # noqa: E402
from affseg.backbones.unicl import UNICL_CONFIGS, UniCLEncoder  # noqa: E402
from affseg.config import load_config, packaged_config  # noqa: E402
from affseg.data.classes import NUM_FOREGROUND, voc_palette  # noqa: E402
from affseg.data.demo import render_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
SEED = 0
SWEEP_NAME = "gpu-check"


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets (seconds) of one check."""

    encoder: str
    image_hw: tuple[int, int]  # generated JPEG size (VOC: about 375 x 500)
    train_images: int
    val_images: int
    crop_sizes: tuple[int, ...]
    batch: int
    accumulation: int
    warmup: int  # untimed steps per size
    repeats: int  # timed steps per size (fewer when the budget runs out)
    workers: tuple[int, ...]
    loader_batches: int  # timed batches per worker setting (>> workers x prefetch 2, already buffered)
    sweep_iterations: int
    sweep_trials: int
    sweep_val: int  # data.val_limit and data.pseudo_subset of each trial
    sweep_overrides: tuple[str, ...]  # extra key=value for the sweep
    long_side: int
    eval_images: int
    budgets: dict


FULL = Profile(
    encoder="unicl_swin_b", image_hw=(375, 500), train_images=64, val_images=24, crop_sizes=(224, 448), batch=4,
    accumulation=2, warmup=2, repeats=5, workers=(0, 4, 8), loader_batches=150, sweep_iterations=40, sweep_trials=2,
    sweep_val=16, sweep_overrides=(), long_side=512, eval_images=16,
    budgets={"setup": 60, "train_step": 120, "data_pipeline": 45, "sweep": 180, "evaluate": 45},
)
SMOKE = Profile(
    encoder="unicl_swin_tiny", image_hw=(72, 96), train_images=12, val_images=4, crop_sizes=(64, 96), batch=4,
    accumulation=2, warmup=1, repeats=2, workers=(0, 2), loader_batches=16, sweep_iterations=4, sweep_trials=2,
    sweep_val=4, sweep_overrides=("cpus_per_trial=1", "data.num_workers=0", "data.crop_size=64",
                                  "model.encoder=unicl_swin_tiny"),
    long_side=96, eval_images=4,
    budgets={"setup": 30, "train_step": 60, "data_pipeline": 30, "sweep": 150, "evaluate": 30},
)


class SectionTimeout(Exception):
    """A section ran past its budget."""


@dataclass
class Row:
    section: str
    setting: str
    metric: str
    value: float | str


# ---------------------------------------------------------------- generated inputs


def write_voc_set(root: Path, profile: Profile) -> Path:
    """A VOC2012-layout folder (JPEGImages, SegmentationClassAug, train_aug/val lists, cls labels) of
    `image_hw` images rendered by the demo generator; returns the VOC2012 folder."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    height, width = profile.image_hw
    labels: dict[str, np.ndarray] = {}
    for split, count in (("train_aug", profile.train_images), ("val", profile.val_images)):
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for image_id in ids:
            image, mask, _ = render_image(rng, max(height, width))
            image, mask = image[:height, :width], mask[:height, :width]
            Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(voc_palette())
            png.save(voc / "SegmentationClassAug" / f"{image_id}.png")
            onehot = np.zeros(NUM_FOREGROUND, np.float32)
            present = np.unique(mask)
            onehot[present[present > 0] - 1] = 1.0
            labels[image_id] = onehot
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    np.save(voc / "cls_labels_onehot.npy", labels, allow_pickle=True)
    return voc


def write_weights(path: Path, encoder: str) -> Path:
    """Random weights of `encoder` in the published UniCL layout."""
    torch.manual_seed(SEED)
    save_unicl(UniCLEncoder(UNICL_CONFIGS[encoder]), path)
    return path


def voc_config(work: Path, profile: Profile, overrides: list[str]):
    """The packaged VOC configuration on the generated set and weights."""
    return load_config(packaged_config("voc"), [
        f"data.root={work / 'VOCdevkit' / 'VOC2012'}", f"model.encoder={profile.encoder}",
        f"model.checkpoint={work / 'encoder.pth'}", f"train.batch_size={profile.batch}",
        f"train.accumulation={profile.accumulation}", "train.amp=bf16", f"train.out_dir={work / 'train'}",
        *overrides])


def peak_memory(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "peak_gpu_mib", torch.cuda.max_memory_allocated(device) / MIB
    return "peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- sections


def setup_section(work: Path, profile: Profile, device: torch.device) -> list[tuple[str, str, float]]:
    start = time.perf_counter()
    write_weights(work / "encoder.pth", profile.encoder)
    weights_s = time.perf_counter() - start
    start = time.perf_counter()
    write_voc_set(work, profile)
    images = profile.train_images + profile.val_images
    return [("weights", "seconds", weights_s), (f"{images} images {profile.image_hw[1]}x{profile.image_hw[0]}",
                                                 "images_per_s", images / (time.perf_counter() - start))]


def train_step_section(work: Path, profile: Profile, device: torch.device, deadline: float):
    from affseg.engine.trainer import Trainer

    rows = []
    per_size = (deadline - time.perf_counter()) / len(profile.crop_sizes)
    for size in profile.crop_sizes:
        size_deadline = time.perf_counter() + per_size
        config = voc_config(work, profile, [f"data.crop_size={size}", "data.num_workers=0"])
        trainer = Trainer(config)
        trainer.iteration = trainer.heads[0].labeler.refine_start  # A_f takes part
        loader = iter(trainer._loader())
        batches = itertools.cycle([next(loader) for _ in range(2 * profile.accumulation)])
        for _ in range(profile.warmup):
            trainer._step(batches)
        sync(device)
        plain, clocks = [], []
        reset_peak(device)
        while len(plain) < profile.repeats and (not plain or time.perf_counter() < size_deadline):
            start = time.perf_counter()
            trainer._step(batches)
            sync(device)
            plain.append(time.perf_counter() - start)
            clock = PhaseClock(device)
            with instrumented(trainer.teacher, [head.student for head in trainer.heads], clock):
                timed(functools.partial(trainer._step, batches), clock)
            clocks.append(clock)
        step_s = statistics.median(plain)
        setting = f"{size}px b{profile.batch}x{profile.accumulation}"
        rows += [(setting, "images_per_s", profile.batch * profile.accumulation / step_s),
                 (setting, "step_ms", step_s * 1e3), (setting, *peak_memory(device))]
        for phase in (*PHASES, REST):
            rows.append((setting, f"{phase}_ms", statistics.median(c.ms(phase) for c in clocks)))
        rows.append((setting, "timed_steps", float(len(plain))))
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def data_pipeline_section(work: Path, profile: Profile, device: torch.device, deadline: float):
    from affseg.engine.trainer import Trainer

    rows = []
    for workers in profile.workers:
        trainer_config = voc_config(work, profile, [f"data.num_workers={workers}", f"data.crop_size={profile.crop_sizes[0]}"])
        trainer = Trainer.__new__(Trainer)  # only the data side of a Trainer: no teacher, no heads
        _data_side(trainer, trainer_config, device)
        loader = iter(trainer._loader())
        next(loader)  # worker start-up
        start = time.perf_counter()
        count = 0
        while count < profile.loader_batches and (count == 0 or time.perf_counter() < deadline):
            count += len(next(loader)["image"])
        rows.append((f"{workers} workers", "images_per_s", count / (time.perf_counter() - start)))
        del loader
    return rows


def _data_side(trainer, config, device: torch.device) -> None:
    """The attributes `Trainer._loader` reads, built as `Trainer.__init__` builds them."""
    from affseg.data.transforms import TrainAugment
    from affseg.data.voc import VocSegmentation
    from affseg.engine.runtime import Runtime

    data = config.data
    trainer.config, trainer.runtime, trainer.iteration = config, Runtime(device, None), 0
    augment = TrainAugment(data.crop_size, data.scale_min, data.scale_max, data.flip_prob)
    trainer.train_set = VocSegmentation(data.root, data.train_split, augment, data.cls_labels, seed=config.train.seed)


def sweep_section(work: Path, profile: Profile, device: torch.device, deadline: float):
    import optuna

    overrides = [f"trials={profile.sweep_trials}", f"train.iterations={profile.sweep_iterations}",
                 f"train.val_interval={profile.sweep_iterations}", f"train.log_interval={profile.sweep_iterations}",
                 f"data.val_limit={profile.sweep_val}", f"data.pseudo_subset={profile.sweep_val}",
                 f"train.batch_size={profile.batch}", f"train.accumulation={profile.accumulation}",
                 *profile.sweep_overrides]
    env = {**os.environ, "VOC_ROOT": str(work / "VOCdevkit" / "VOC2012"), "UNICL": str(work / "encoder.pth"),
           "AFFSEG_SWEEP_ROOT": str(work / "sweeps"), "PYTHONPATH": str(REPO)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    command = [sys.executable, "-m", "affseg.cli", "sweep", "--space", "refine", "--profile", "voc",
               "--name", SWEEP_NAME, *overrides]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(1.0, deadline - time.perf_counter()))
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    wall = time.perf_counter() - start
    (work / "sweep.log").write_text(output)
    if process.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        raise RuntimeError(f"affseg sweep exit {process.returncode}: {lines[-1] if lines else 'no output'}")
    study = optuna.load_study(study_name=SWEEP_NAME, storage=f"sqlite:///{work / 'mlflow' / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < profile.sweep_trials:
        raise RuntimeError(f"{len(done)} of {profile.sweep_trials} trials completed; see {work / 'sweep.log'}")
    trial_s = statistics.mean((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    setting = f"{profile.sweep_trials} trials x {profile.sweep_iterations} it"
    return [(setting, "wall_s", wall), (setting, "trial_s", trial_s),
            (setting, "trials_completed", float(len(done))), (setting, "best_val_miou", float(study.best_value))]


def evaluate_section(work: Path, profile: Profile, device: torch.device, deadline: float):
    from affseg.evaluate import TrainedModel, evaluate
    from affseg.method import build_student, build_teacher

    config = voc_config(work, profile, [f"eval.long_side={profile.long_side}", "eval.scales=[1.0,0.75]",
                                        "eval.flip=true", "eval.crf=false"])
    torch.manual_seed(SEED)
    teacher = build_teacher(config, device)
    trained = TrainedModel(teacher.eval(), build_student(config, teacher).eval(), config, device)
    evaluate(trained, "val", crf=False, limit=1)  # warm-up
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    evaluate(trained, "val", crf=False, limit=profile.eval_images)
    sync(device)
    setting = f"long side {profile.long_side}, scales 1.0+0.75, flip"
    return [(setting, "images_per_s", profile.eval_images / (time.perf_counter() - start)),
            (setting, *peak_memory(device))]


# ---------------------------------------------------------------- driver


def _alarm(signum, frame):
    raise SectionTimeout


def run_section(name: str, function: Callable, budget: float, *args) -> tuple[list[Row], dict]:
    """Rows of one section, or one error row; `function(..., deadline)` sees its soft deadline."""
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget * 1.25 + 5)  # hard stop past the soft deadline
    try:
        values = function(*args, start + budget) if name != "setup" else function(*args)
        rows = [Row(name, setting, metric, float(value)) for setting, metric, value in values]
        error = None
    except SectionTimeout:
        error = f"ran past its budget of {budget:.0f} s"
    except Exception as err:  # the check goes on: one row per failed section
        error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        traceback.print_exc(file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if error is not None:
        rows = [Row(name, "-", "error", error)]
    return rows, {"status": "ok" if error is None else "error", "seconds": time.perf_counter() - start,
                  "error": error}


def markdown(rows: list[Row]) -> str:
    lines = ["| section | setting | metric | value |", "|---|---|---|---:|"]
    for row in rows:
        value = f"{row.value:.1f}" if isinstance(row.value, float) and abs(row.value) >= 10 else (
            f"{row.value:.3g}" if isinstance(row.value, float) else row.value)
        lines.append(f"| {row.section} | {row.setting} | {row.metric} | {value} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON result file")
    parser.add_argument("--work", default=None, help="work folder for generated data (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny encoder and sizes (CI)")
    args = parser.parse_args()
    profile = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = Path(args.work or scratch).resolve()
        work.mkdir(parents=True, exist_ok=True)
        os.environ.update({"VOC_ROOT": str(work / "VOCdevkit" / "VOC2012"), "UNICL": str(work / "encoder.pth")})
        sections = {"setup": setup_section, "train_step": train_step_section,
                    "data_pipeline": data_pipeline_section, "sweep": sweep_section, "evaluate": evaluate_section}
        rows, status = [], {}
        for name, function in sections.items():
            if name != "setup" and status["setup"]["status"] != "ok":
                section_rows, status[name] = [Row(name, "-", "error", "setup failed")], {
                    "status": "error", "seconds": 0.0, "error": "setup failed"}
            else:
                section_rows, status[name] = run_section(name, function, profile.budgets[name], work, profile, device)
            rows += section_rows
            print(f"{name}: {status[name]['status']} in {status[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": device_name, "torch": torch.__version__, "smoke": args.smoke, "profile": asdict(profile),
              "wall_s": time.perf_counter() - start, "sections": status, "rows": [asdict(r) for r in rows]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"gpu_check on {device_name}, torch {torch.__version__}, {result['wall_s']:.0f} s\n")
    print(markdown(rows))
    return 0 if all(s["status"] == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
