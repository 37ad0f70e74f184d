"""The promoted model's code (MLflow models-from-code): `affseg.sweep.promote` saves this file with the
model, and `mlflow.pyfunc.load_model` runs it (never an unpickled Python object).

Loading verifies the sha256 of the decoder checkpoint and of the encoder weights; prediction is the
`affseg.predict.Predictor` that `affseg evaluate` uses (multi-scale + flip, optional CRF, per the
checkpoint's eval config).
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
        self._predictor = load_predictor(checkpoint, encoder_checkpoint=encoder)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB images → (N, H, W) uint8 class indices (0 background, 1..20)."""
        return self._predictor.predict(model_input)


mlflow.models.set_model(AffsegModel())
