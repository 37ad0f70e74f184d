"""The promoted model's code (MLflow models-from-code): `affseg.sweep.promote` saves this file with the
model, and `mlflow.pyfunc.load_model` runs it (never an unpickled Python object).

Loading verifies the sha256 of the decoder checkpoint and of the encoder weights; prediction is the
function `affseg evaluate` uses (`affseg.evaluate.predict_mask`: multi-scale + flip, optional CRF, per
the checkpoint's eval config).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import numpy as np
from mlflow.pyfunc import PythonModel


class AffsegModel(PythonModel):
    """RGB images in, VOC class-index masks out."""

    def load_context(self, context) -> None:
        from affseg.evaluate import load_predictor
        from affseg.sweep.promote import checked_artifacts

        artifacts = {key: Path(path) for key, path in context.artifacts.items()}
        checkpoint, encoder = checked_artifacts(artifacts)
        self._predict = load_predictor(checkpoint, encoder_checkpoint=encoder)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB images → (N, H, W) uint8 class indices (0 background, 1..20)."""
        masks = [self._predict(image) for image in model_input]
        return np.stack(masks) if masks else np.zeros(model_input.shape[:3], np.uint8)


mlflow.models.set_model(AffsegModel())
