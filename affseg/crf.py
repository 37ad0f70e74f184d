"""Dense CRF post-processing (pydensecrf2), with the SPEC §3 parameters from `EvalConfig`."""

from __future__ import annotations

import numpy as np

from affseg.config import EvalConfig

PROB_FLOOR = 1e-8  # keeps −log p finite for zero probabilities


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """image (H, W, 3) uint8, probs (K, H, W) float softmax → refined probs (K, H, W) float32."""
    import pydensecrf.densecrf as dcrf

    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    unary = -np.log(np.clip(probs, PROB_FLOOR, 1.0)).reshape(classes, -1).astype(np.float32)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=cfg.crf_pos_xy, compat=cfg.crf_pos_weight)
    crf.addPairwiseBilateral(sxy=cfg.crf_bi_xy, srgb=cfg.crf_bi_rgb, rgbim=np.ascontiguousarray(image),
                             compat=cfg.crf_bi_weight)
    refined = crf.inference(cfg.crf_iterations)
    return np.asarray(refined, np.float32).reshape(classes, height, width)
