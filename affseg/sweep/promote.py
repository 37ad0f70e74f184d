"""Promotion: a sweep's best trial → a new version of registered model `affseg` (an MLflow pyfunc model)
with alias `champion`; and back: `models:/affseg@champion` → a local decoder checkpoint + encoder weights.

The model bundles the decoder checkpoint (`best.pt`, which holds the training config) and the encoder:
the weights file itself when small (the tiny demo encoder), otherwise its path. `promoted.json` records
the sha256 of both; loading (pyfunc or `affseg evaluate --model`) refuses a file that changed.
The model is saved from code (`pyfunc_model.py`, MLflow models-from-code; no pickled Python object),
with the affseg package as its code path, an explicit signature and pinned requirements.
Serving: `mlflow.pyfunc.load_model(uri).predict(images)`: (N, H, W, 3) uint8 → (N, H, W) uint8 masks.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow.artifacts
import mlflow.exceptions
import mlflow.pyfunc
import numpy as np
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from packaging.requirements import Requirement

import affseg
from affseg.backbones.demo_weights import RANDOM_WEIGHTS, default_checkpoint
from affseg.config import Config, ConfigError, TrackingConfig, from_dict
from affseg.engine.checkpoint import BEST_CHECKPOINT, load_checkpoint
from affseg.sweep.tracking import (
    BEST_MIOU, CHECKPOINT_DIR, ROLE_TAG, STATE_TAG, SWEEP_TAG, TRIAL_TAG, open_experiment, tag_filter, tracking_uri,
)

MODEL_NAME = "affseg"
CHAMPION_ALIAS = "champion"
BUNDLE_LIMIT_BYTES = 50 * 1024**2  # encoders smaller than this travel inside the model
MODEL_ARTIFACT_DIR = "model"  # each promotion logs its pyfunc model at model/<UTC time> in the best trial's run
MODEL_RECORD = "promoted.json"  # {"decoder": {sha256, bytes}, "encoder": encoder_record(...)}
MODEL_CACHE = Path("runs/models")  # registered versions downloaded for evaluation
HASH_CHUNK_BYTES = 1024**2
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
ARTIFACT_KEYS = ("checkpoint", "encoder", "record")  # names inside the pyfunc model
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # the models-from-code file
PACKAGE_DIR = Path(affseg.__file__).parent  # travels with the model as its code path
PACKAGE_SKIP = ("__pycache__", "*.pyc", "*.pth")  # not copied: caches and weights (the encoder is an artifact)
SWEEP_ONLY_REQUIREMENTS = frozenset({"ray", "optuna", "optuna-dashboard"})  # serving never imports these
SIGNATURE = ModelSignature(  # RGB images of one size in, VOC class-index masks (0..20) out
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
)
EXAMPLE_SIDE = 32  # the stored input example: one black EXAMPLE_SIDE² image


class PromotionError(ConfigError):
    """No sweep / trial / model version to promote or resolve, or encoder weights that do not match."""


@dataclass(frozen=True)
class ResolvedModel:
    """A registered model version on local disk, ready for `affseg.evaluate.load_trained`."""

    checkpoint: Path  # the decoder training checkpoint (holds the config)
    encoder_checkpoint: str  # encoder weights: the bundled copy, the verified referenced file, or "random"
    version: str


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_record(config: Config) -> dict:
    """Which encoder weights a checkpoint was trained with: path, sha256, size, and whether to bundle them."""
    weights = default_checkpoint(config.model.encoder, config.model.checkpoint)
    if weights is None:
        return {"encoder": config.model.encoder, "path": RANDOM_WEIGHTS, "bundled": False}
    path = Path(weights).resolve()
    if not path.is_file():
        raise PromotionError(f"{path}: encoder weights of the best trial not found; restore the file first")
    size = path.stat().st_size
    return {"encoder": config.model.encoder, "path": str(path), "sha256": sha256(path), "bytes": size,
            "bundled": size < BUNDLE_LIMIT_BYTES}


def checked_file(path: Path, expected: str, what: str) -> Path:
    """`path` if its sha256 is `expected`; else a one-line PromotionError naming the file."""
    if not path.is_file():
        raise PromotionError(f"{path}: {what} of the promoted model are missing; restore the file or promote again")
    found = sha256(path)
    if found != expected:
        raise PromotionError(f"{path}: {what} changed since promotion (sha256 {found[:12]}… != "
                             f"{expected[:12]}…); restore the file or promote again")
    return path


def checked_encoder(record: dict, bundled: Path | None) -> str:
    """The encoder weights file to load (its sha256 verified), or "random"."""
    if record["path"] == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    path = bundled if bundled is not None else Path(record["path"])
    return str(checked_file(path, record["sha256"], "encoder weights"))


def checked_artifacts(artifacts: Mapping[str, Path]) -> tuple[Path, str]:
    """A promoted model's artifact paths (keys of ARTIFACT_KEYS) → (decoder checkpoint, encoder weights),
    both verified against the sha256 in `promoted.json`."""
    record_path = artifacts.get("record")
    if record_path is None:
        raise PromotionError(f"{artifacts['checkpoint'].parent}: promoted model has no {MODEL_RECORD} "
                             "(promoted by an older affseg); promote again")
    record = json.loads(Path(record_path).read_text())
    checkpoint = checked_file(Path(artifacts["checkpoint"]), record["decoder"]["sha256"], "decoder checkpoint")
    return checkpoint, checked_encoder(record["encoder"], artifacts.get("encoder"))


# ---------------------------------------------------------------- promote


def sweep_parent(client: MlflowClient, experiment_id: str, sweep: str | None):
    """The parent run of sweep `sweep` (default: the latest sweep); one-line PromotionError when there is none."""
    try:
        query = tag_filter({ROLE_TAG: "parent", **({SWEEP_TAG: sweep} if sweep else {})})
    except ValueError as err:
        raise PromotionError(f"--sweep {err}") from None
    found = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise PromotionError(f"no sweep {sweep!r} in the tracking store" if sweep else
                             "no sweep in the tracking store; run `make sweep` first")
    return found[0]


def best_trial_run(client: MlflowClient, experiment_id: str, sweep: str | None = None):
    """The sweep's (default: latest sweep's) completed child run with the highest best val mIoU and a
    checkpoint; ties go to the lower trial number, exactly as the sweep summary picks its best trial."""
    parent = sweep_parent(client, experiment_id, sweep)
    children = client.search_runs([experiment_id], tag_filter({"mlflow.parentRunId": parent.info.run_id}))
    completed = [run for run in children
                 if run.data.tags.get(STATE_TAG) == "completed" and BEST_MIOU in run.data.metrics]
    completed.sort(key=lambda run: (-run.data.metrics[BEST_MIOU], int(run.data.tags[TRIAL_TAG])))
    for run in completed:
        files = client.list_artifacts(run.info.run_id, CHECKPOINT_DIR)
        if any(a.path.endswith(BEST_CHECKPOINT) for a in files):
            return run
    raise PromotionError(f"sweep {parent.data.tags[SWEEP_TAG]!r} has no finished trial with a best checkpoint")


def pinned_requirements() -> list[str]:
    """affseg's runtime requirements (from its installed metadata) minus the sweep-only ones, each pinned
    to the installed version: `torch==2.14.1`, `numpy==2.3.1`, ... (affseg itself travels as code)."""
    try:
        declared = importlib.metadata.requires("affseg") or []
    except importlib.metadata.PackageNotFoundError:
        raise PromotionError("affseg is not installed (no package metadata); run `make setup` first") from None
    requirements = [Requirement(text) for text in declared]
    names = [r.name for r in requirements if r.marker is None and r.name not in SWEEP_ONLY_REQUIREMENTS]
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def _save_pyfunc(checkpoint: Path, out: Path) -> None:
    """Write the pyfunc model to `out` (a folder that must not exist); scratch files go beside it."""
    config = from_dict(load_checkpoint(checkpoint)["config"])
    encoder = encoder_record(config)
    record = {"decoder": {"sha256": sha256(checkpoint), "bytes": checkpoint.stat().st_size}, "encoder": encoder}
    record_path = out.parent / MODEL_RECORD
    record_path.write_text(json.dumps(record, indent=1))
    artifacts = {"checkpoint": str(checkpoint), "record": str(record_path)}
    if encoder["bundled"]:
        artifacts["encoder"] = encoder["path"]
    package = out.parent / "code" / PACKAGE_DIR.name
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns(*PACKAGE_SKIP))
    mlflow.pyfunc.save_model(
        path=str(out), python_model=str(PYFUNC_CODE), artifacts=artifacts, code_paths=[str(package)],
        signature=SIGNATURE, input_example=np.zeros((1, EXAMPLE_SIDE, EXAMPLE_SIDE, 3), np.uint8),
        pip_requirements=pinned_requirements(),
    )


def promote(sweep_name: str | None = None, tracking: TrackingConfig | None = None) -> str:
    """Register the best trial of `sweep_name` (default: the latest sweep) as a new version of model
    `affseg`, point alias `champion` at it; returns `models:/affseg/<version>`."""
    client, experiment_id = open_experiment(tracking or TrackingConfig())
    run = best_trial_run(client, experiment_id, sweep_name)
    run_id = run.info.run_id
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    artifact_path = f"{MODEL_ARTIFACT_DIR}/{stamp}"  # versions never share (and overwrite) files
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{BEST_CHECKPOINT}", tmp))
        model_dir = Path(tmp) / "pyfunc" / MODEL_ARTIFACT_DIR
        model_dir.parent.mkdir()
        _save_pyfunc(checkpoint, model_dir)
        client.log_artifacts(run_id, str(model_dir), artifact_path)
    if not client.search_registered_models(f"name = '{MODEL_NAME}'"):
        client.create_registered_model(MODEL_NAME, description="UniCL-AffSeg decoder + encoder, promoted from sweeps")
    tags = {"sweep": run.data.tags[SWEEP_TAG], "trial": run.data.tags[TRIAL_TAG], BEST_MIOU: str(run.data.metrics[BEST_MIOU])}
    version = client.create_model_version(MODEL_NAME, f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
                                          tags=tags).version
    client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version)
    return f"models:/{MODEL_NAME}/{version}"


# ---------------------------------------------------------------- resolve and evaluate


def resolve_model_uri(uri: str, tracking: TrackingConfig | None = None) -> ResolvedModel:
    """`models:/affseg@champion` or `models:/affseg/3` → the version's checkpoint and verified encoder on disk
    (downloaded once into runs/models/)."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise PromotionError(f"--model {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    uri_of_store = tracking_uri(tracking or TrackingConfig())
    client = MlflowClient(uri_of_store)
    name = match["name"]
    try:
        version = (client.get_model_version_by_alias(name, match["alias"]) if match["alias"]
                   else client.get_model_version(name, match["version"]))
    except mlflow.exceptions.MlflowException as err:
        raise PromotionError(f"--model {uri}: not in the registry ({err.error_code}); run `make promote` first") from None
    model_dir = MODEL_CACHE.resolve() / f"{name}-v{version.version}"
    if not (model_dir / "MLmodel").is_file():
        shutil.rmtree(model_dir, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            fetched = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=tmp,
                                                          tracking_uri=uri_of_store)
            model_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(fetched, model_dir)
    artifacts = Model.load(str(model_dir / "MLmodel")).flavors["python_function"]["artifacts"]
    paths = {key: model_dir / artifacts[key]["path"] for key in ARTIFACT_KEYS if key in artifacts}
    checkpoint, encoder = checked_artifacts(paths)
    return ResolvedModel(checkpoint, encoder, str(version.version))


def evaluate_registered(model_uri: str, split: str = "val", crf: bool | None = None, export: str | None = None,
                        limit: int = 0) -> int:
    """`affseg evaluate --model URI`: resolve, evaluate (crf None: the checkpoint's eval.crf), print; exit status."""
    from affseg.evaluate import evaluate, format_scores, load_trained

    resolved = resolve_model_uri(model_uri)
    trained = load_trained(resolved.checkpoint, encoder_checkpoint=resolved.encoder_checkpoint)
    print(f"{model_uri}: version {resolved.version}, checkpoint {resolved.checkpoint}")
    scores = evaluate(trained, split, crf, export, limit)
    if scores is not None:
        print(format_scores(scores))
    if export:
        print(f"palette PNGs written to {export}")
    return 0
