"""The configuration schema: one dataclass per part, each key on one line with its comment.

Every default is the number fixed in SPEC.md. Loading and coercion live in `affseg.config.loading`,
range checks in `affseg.config.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message is one line."""


CROP_MULTIPLE = 16  # the encoder's grid stride: a training crop is a whole number of grid cells
SWIN_STAGES = 4  # a Swin encoder's stages, numbered 1..SWIN_STAGES (SPEC §5.3)


@dataclass
class DataConfig:
    """Dataset location and augmentation (SPEC §3)."""

    root: str = "data/demo/VOCdevkit/VOC2012"  # a VOC2012 folder (JPEGImages, SegmentationClassAug, ...)
    demo: bool = True  # build the offline demo set at `root` when it is missing
    demo_seed: int = 0
    train_split: str = "train_aug"
    val_split: str = "val"
    cls_labels: str = "cls_labels_onehot.npy"  # relative to root
    crop_size: int = 224
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip_prob: float = 0.5
    num_workers: int = 0
    pseudo_subset: int = 200  # first N train ids scored for pseudo-label quality
    val_limit: int = 0  # 0 = whole val split; >0 caps it (quick runs)


@dataclass
class ModelConfig:
    """Frozen encoder, CAM source and decoder (SPEC §2.1–2.3; multi-stage features §5.3)."""

    encoder: str = "unicl_swin_tiny"  # registry name: unicl_swin_b | unicl_swin_tiny | clip_vit_b16 | clip_vit_tiny
    checkpoint: str = ""  # encoder weights file; "" = committed demo weights (tiny encoder); "random" = random init
    cam_method: Literal["gradcam", "gradcampp", "layercam"] = "gradcam"
    cam_block: int | None = None  # index among the stride-16 blocks; None = the encoder's default_cam_block
    prompt_template: str = "a clean origami {}."
    background_prompts: bool = True
    decoder_blocks: list[int] = field(default_factory=list)  # stride-16 block indices; [] = all of them
    affinity_blocks: list[int] = field(default_factory=list)  # stride-16 block indices; [] = all of them
    decoder_stages: list[int] = field(default_factory=lambda: [3])  # Swin stages (1-4) whose blocks feed the decoder
    affinity_stages: list[int] = field(default_factory=lambda: [3])  # Swin stages (1-4) feeding the encoder affinities
    decoder_dim: int = 256
    decoder_mlp_dim: int = 256
    decoder_layers: int = 3
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 4.0
    decoder_dropout: float = 0.1


@dataclass
class ParConfig:
    """Pixel-adaptive refinement (SPEC §2.4 step 9)."""

    enabled: bool = True
    iterations: int = 20
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    w1: float = 0.3
    w2: float = 0.01
    scale: float = 1.0  # 0.5 runs PAR at half resolution (AFA-style)


@dataclass
class RefineConfig:
    """Affinity refinement and pseudo-labels (SPEC §2.4)."""

    alpha: int = 2  # refinement strength: power of the transition matrix
    n0: int = 6  # candidate affinity blocks: the last n0
    warmup_blocks: int = 8  # before refine_start, R = mean of the last this-many encoder affinities
    deviation: Literal["abs", "signed"] = "abs"
    sinkhorn_iters: int = 3
    box_threshold: float = 0.4
    box_mask: Literal["output", "source"] = "output"
    box_clip: Literal["inclusive", "reference"] = "inclusive"  # reference: WeCLIP's exclusive fill + uint8 threshold
    refine_start: float = 1 / 3  # fraction of the schedule before A_f joins the refinement
    background: Literal["power", "constant"] = "power"
    bg_power: float = 1.0
    bg_score: float = 0.45
    ignore_band: bool = False
    low_threshold: float = 0.25
    high_threshold: float = 0.7
    par: ParConfig = field(default_factory=ParConfig)


@dataclass
class LossConfig:
    """L = L_seg + λ L_aff (SPEC §2.5)."""

    lam: float = 0.1
    seg: Literal["balanced", "plain"] = "balanced"
    aff: Literal["linear", "bce"] = "linear"
    aff_radius: int = 8  # grid cells


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and polynomial decay (SPEC §3)."""

    lr: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    warmup_iters: int = 500
    warmup_ratio: float = 1e-3
    poly_power: float = 1.0
    grad_clip: float = 0.0  # 0 = off; else max global grad norm


@dataclass
class TrainConfig:
    """Schedule, precision, checkpointing (SPEC §3). An iteration is one optimiser step."""

    iterations: int = 30_000
    batch_size: int = 4
    accumulation: int = 2
    val_interval: int = 2_000
    log_interval: int = 20
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto = bf16 on CUDA if supported, else fp16; off on CPU
    supervision: Literal["pseudo", "full"] = "pseudo"  # full: ground-truth masks, the fully supervised bound
    # A fused group's decoders as one vmap-ed call (SPEC §5.4). auto: on CUDA only; on CPU it measured
    # 1.3-3.4x slower (benchmarks/fused_trials.py), vmap having no CPU attention rule.
    batch_heads: Literal["auto", "always", "never"] = "auto"
    max_nonfinite: int = 10  # skipped steps (NaN/inf loss, or a rolled-back non-finite update) before training stops
    out_dir: str = "runs/train"


@dataclass
class EvalConfig:
    """Multi-scale evaluation and optional dense CRF (SPEC §3)."""

    long_side: int = 512
    scales: list[float] = field(default_factory=lambda: [1.0, 0.75])
    flip: bool = True
    crf: bool = False
    crf_iterations: int = 10
    crf_pos_xy: float = 3.0
    crf_pos_weight: float = 3.0
    crf_bi_xy: float = 64.0
    crf_bi_rgb: float = 5.0
    crf_bi_weight: float = 4.0


@dataclass
class TrackingConfig:
    """Where sweeps record results; server backends replace the local defaults on a cluster."""

    mlflow_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "affseg"
    optuna_storage: str = "sqlite:///mlflow/optuna.db"


@dataclass
class Config:
    """The whole training configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Keys that may differ between the members of a fused group (SPEC §5.4): they act after the teacher.
FUSABLE_PREFIXES = ("refine.", "loss.")
FUSABLE_KEYS = ("optim.lr", "optim.warmup_iters", "optim.weight_decay", "train.out_dir")


def fusable(key: str) -> bool:
    """Whether a dotted config key may differ between the members of a fused group."""
    return key.startswith(FUSABLE_PREFIXES) or key in FUSABLE_KEYS
