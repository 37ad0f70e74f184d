"""The `reference` preset (SPEC §5.1, issue 9 item 10): with it our pseudo-labels equal, pixel for pixel, those
of the WeCLIP reference implementation, ported below in numpy from its `perform_single_voc_cam`,
`compute_trans_mat`, `scoremap2bbox`, `generate_cam_label` and pytorch-grad-cam's `scale_cam_image`.

Both sides get the same raw Grad-CAMs (ReLU'd, not normalised), encoder affinities, decoder affinity (or
none: the warm-up) and images; ours normalise the CAMs as `compute_cams` does. Without PAR the labels are
equal everywhere. PAR (WeCLIP's `PAR`, ported too) is the same formula as `affseg.refine.par` summed in
another order, so with it the labels are equal except at float32 ties of the two best scores (a few pixels).
"""

from __future__ import annotations

import functools
import json
import types

import numpy as np
import pytest
import torch
from scipy import ndimage

from affseg.cam import minmax_normalise
from affseg.cli import main
from affseg.config import ConfigError, RefineConfig, load_config, preset_overrides
from affseg.refine.pseudo import pseudo_labels, refine_cams
from affseg.refine.random_walk import box_masks
from affseg.sweep.space import load_space

NUM_FG = 20
CELL = 16  # pixels per grid cell; the reference's training crops are whole cells
BLOCKS = 10  # encoder affinity blocks (the reference keeps the last 6 with A_f, the last 8 without)
GRIDS = [(14, 14), (10, 13)]
SEEDS = [0, 1, 2]
BATCH = 3

# The reference's constants.
REF_CANDIDATES = 6  # attn_weight[-6:] once the decoder affinity joins
REF_WARMUP = 8  # attn_weight[-8:] before that
REF_BOX_THRESHOLD = 0.4
REF_MEAN_EPS = 1e-5  # sum(mask · A) / (sum(mask) + 1e-5)
REF_SCALE_EPS = 1e-7  # scale_cam_image: x / (1e-7 + max)
REF_SINKHORN_EXTRA = 2  # one column/row round, then `for _ in range(2)` more
UINT8_SCALE = 255
REF_PAR_DILATIONS = [1, 2, 4, 8, 12, 24]  # WeCLIP: PAR(num_iter=20, dilations=[1, 2, 4, 8, 12, 24]), w1 0.3, w2 0.01
REF_PAR_ITERS = 20
REF_PAR_W1, REF_PAR_W2 = 0.3, 0.01
REF_PAR_STD_EPS = 1e-8
FLOAT_TIE = 1e-5  # with PAR, pixels whose two best reference scores lie closer than this are float32 ties


# ------------------------------------------------------------------ the reference, ported


def _ref_scale(cam: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image without resize: (x − min) / (1e-7 + max), float32."""
    cam = cam - np.min(cam)
    return (cam / (np.float32(REF_SCALE_EPS) + np.max(cam))).astype(np.float32)


def _ref_grayscale_cam(raw: np.ndarray) -> np.ndarray:
    """What WeCLIP's GradCAM returns for one target layer: ReLU, scale (per layer), mean over the single
    layer, ReLU, scale again (aggregate_multi_layers)."""
    per_layer = _ref_scale(np.maximum(raw, 0).astype(np.float32))
    return _ref_scale(np.maximum(per_layer[None], 0).mean(axis=0))


def _ref_affinity(aff_enc: np.ndarray, aff_dec: np.ndarray | None) -> np.ndarray:
    """perform_single_voc_cam's attn_weight. aff_enc: (L, N, N); aff_dec: (N, N) or None → (N, N)."""
    if aff_dec is None:
        return aff_enc[-REF_WARMUP:].mean(axis=0)
    candidates = aff_enc[-REF_CANDIDATES:]
    diff = (aff_dec[None] - candidates).reshape(len(candidates), -1).sum(axis=1)
    mask = np.zeros_like(diff)
    mask[diff <= diff.mean()] = 1
    mask = np.broadcast_to(mask[:, None, None], candidates.shape)
    mean = (mask * candidates).sum(axis=0) / (mask.sum(axis=0) + np.float32(REF_MEAN_EPS))
    return mean * aff_dec


def _ref_trans_mat(affinity: np.ndarray) -> np.ndarray:
    """compute_trans_mat: Sinkhorn (columns, then rows) three times, symmetrised, squared."""
    trans = affinity / affinity.sum(axis=0, keepdims=True)
    trans = trans / trans.sum(axis=1, keepdims=True)
    for _ in range(REF_SINKHORN_EXTRA):
        trans = trans / trans.sum(axis=0, keepdims=True)
        trans = trans / trans.sum(axis=1, keepdims=True)
    trans = (trans + trans.T) / 2
    return trans @ trans


def _ref_box_mask(scoremap: np.ndarray) -> np.ndarray:
    """scoremap2bbox(threshold=0.4, multi_contour_eval=True) and the aff_mask fill. (h, w) → (h, w) float32.

    cv2.threshold(q, int(t · max q), BINARY) keeps q > int(t · max q); findContours' outer contours are the
    8-connected regions, boundingRect gives x, y, x + w, y + h; x1/y1 are clipped to w − 1/h − 1 and the
    fill [y0:y1, x0:x1] is exclusive.
    """
    height, width = scoremap.shape
    quantised = (scoremap * UINT8_SCALE).astype(np.uint8)
    binary = quantised > int(REF_BOX_THRESHOLD * np.max(quantised))
    regions, _ = ndimage.label(binary, structure=np.ones((3, 3)))
    mask = np.zeros((height, width), dtype=np.float32)
    for rows, cols in ndimage.find_objects(regions):
        mask[rows.start : min(rows.stop, height - 1), cols.start : min(cols.stop, width - 1)] = 1
    return mask


def _ref_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) of a float32 (h, w) map: half-pixel centres, edge pixels repeated."""

    def axis(size_out: int, size_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
        low = np.floor(position).astype(int)
        frac = (position - low).astype(np.float32)
        frac[low < 0] = 0
        low = np.clip(low, 0, size_in - 1)
        return low, np.minimum(low + 1, size_in - 1), frac

    r0, r1, fy = axis(height, image.shape[0])
    c0, c1, fx = axis(width, image.shape[1])
    rows = image[:, c0] * (1 - fx) + image[:, c1] * fx
    return (rows[r0] * (1 - fy)[:, None] + rows[r1] * fy[:, None]).astype(np.float32)


def _ref_scores(raw: np.ndarray, aff_enc: np.ndarray, aff_dec: np.ndarray | None) -> np.ndarray:
    """One image: raw (S, h, w) Grad-CAMs of its present classes → (1 + S, 16h, 16w) background + refined CAMs
    (perform_single_voc_cam, generate_cam_label and the background of WeCLIP.forward)."""
    _, height, width = raw.shape
    trans = _ref_trans_mat(_ref_affinity(aff_enc, aff_dec)).astype(np.float32)
    refined = []
    for cam in raw:
        grayscale = _ref_grayscale_cam(cam)
        masked = trans * _ref_box_mask(grayscale).reshape(1, -1)
        refined.append((masked @ grayscale.reshape(-1, 1)).reshape(height, width))
    maps = np.stack([_ref_resize(_ref_scale(r), CELL * height, CELL * width) for r in refined])
    background = np.power(1 - maps.max(axis=0, keepdims=True), 1)
    return np.concatenate([background, maps])


def _ref_labels(scores: np.ndarray, keys: list[int]) -> np.ndarray:
    """argmax, then valid_key: slot 0 → 0 (background), slot s → keys[s − 1] + 1 (VOC index space)."""
    valid_key = np.pad(np.asarray(keys) + 1, (1, 0), mode="constant")
    return valid_key[scores.argmax(axis=0)]


def _ref_neighbours(x: np.ndarray) -> np.ndarray:
    """PAR.get_dilated_neighbors: (C, H, W) → (C, 48, H, W), replicate padding, kernel order per dilation."""
    height, width = x.shape[-2:]
    out = []
    for d in REF_PAR_DILATIONS:
        padded = np.pad(x, ((0, 0), (d, d), (d, d)), mode="edge")
        out += [padded[:, i * d : i * d + height, j * d : j * d + width]
                for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    return np.stack(out, axis=1)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _ref_par(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """WeCLIP's PAR.forward for one image: image (3, H, W), masks (K, H, W) → (K, H, W)."""
    near = _ref_neighbours(image)
    std = near.std(axis=1, ddof=1, keepdims=True)
    aff = -((np.abs(near - image[:, None]) / (std + np.float32(REF_PAR_STD_EPS)) / np.float32(REF_PAR_W1)) ** 2)
    ring = np.array([np.sqrt(2), 1, np.sqrt(2), 1, 1, np.sqrt(2), 1, np.sqrt(2)], dtype=np.float32)
    pos = np.concatenate([ring * d for d in REF_PAR_DILATIONS]).astype(np.float32)
    pos_aff = -((pos / (pos.std(ddof=1) + np.float32(REF_PAR_STD_EPS)) / np.float32(REF_PAR_W1)) ** 2)
    kernel = _softmax(aff.mean(axis=0, keepdims=True), 1) + np.float32(REF_PAR_W2) * _softmax(pos_aff, 0)[:, None, None]
    for _ in range(REF_PAR_ITERS):
        masks = (_ref_neighbours(masks) * kernel).sum(axis=1)
    return masks


# ------------------------------------------------------------------ structured random inputs


def _smooth(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    """(channels, h, w) spatially smooth noise."""
    noise = rng.standard_normal((channels, height, width))
    return ndimage.gaussian_filter(noise, sigma=(0, 1.5, 1.5), mode="nearest")


def _raw_cam(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ReLU'd Grad-CAM-like (h, w) map: a few Gaussian blobs (some on the border) plus noise, any scale."""
    ys, xs = np.mgrid[0:height, 0:width]
    cam = np.zeros((height, width))
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(-1, height), rng.uniform(-1, width)  # centres may sit on the last row/column
        sigma = rng.uniform(0.8, 3.0)
        cam += rng.uniform(0.3, 1.0) * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))
    cam += 0.15 * rng.standard_normal((height, width))
    return (np.maximum(cam, 0) * np.exp(rng.uniform(-4, 3))).astype(np.float32)


def _affinities(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(L, N, N) encoder affinities (cosine of smooth features, clamped at 0, raised to a per-block power so
    that blocks differ in sharpness and their sums spread) and an (N, N) decoder affinity sigmoid(FᵀF)."""
    cells = height * width
    blocks = []
    for sharpness in rng.permutation(np.linspace(1.0, 6.0, BLOCKS)):
        tokens = _smooth(rng, 16, height, width).reshape(16, cells)
        tokens /= np.linalg.norm(tokens, axis=0, keepdims=True)
        blocks.append(np.maximum(tokens.T @ tokens, 0) ** sharpness)
    fused = _smooth(rng, 8, height, width).reshape(8, cells)
    fused *= 3 / np.linalg.norm(fused, axis=0, keepdims=True)
    decoder = 1 / (1 + np.exp(-(fused.T @ fused)))
    return np.stack(blocks).astype(np.float32), decoder.astype(np.float32)


def _inputs(seed: int, grid: tuple[int, int]) -> dict:
    """A batch: raw CAMs (B, 20, h, w) (absent classes 0), labels (B, 20), affinities, images (B, 3, H, W)."""
    rng = np.random.default_rng(seed)
    height, width = grid
    labels = np.zeros((BATCH, NUM_FG), dtype=np.float32)
    raw = np.zeros((BATCH, NUM_FG, height, width), dtype=np.float32)
    enc, dec = zip(*(_affinities(rng, height, width) for _ in range(BATCH)))
    for b in range(BATCH):
        for k in rng.choice(NUM_FG, size=rng.integers(2, 4), replace=False):
            labels[b, k] = 1
            raw[b, k] = _raw_cam(rng, height, width)
    images = torch.from_numpy(rng.standard_normal((BATCH, 3, CELL * height, CELL * width)).astype(np.float32))
    return {"raw": raw, "labels": labels, "aff_enc": np.stack(enc), "aff_dec": np.stack(dec), "images": images}


# ------------------------------------------------------------------ the two sides


def _ours(batch: dict, cfg: RefineConfig, with_decoder: bool, use_par: bool = False) -> np.ndarray:
    labels = torch.from_numpy(batch["labels"])
    cams = minmax_normalise(torch.from_numpy(batch["raw"])) * labels[:, :, None, None]  # as compute_cams
    aff_dec = torch.from_numpy(batch["aff_dec"]) if with_decoder else None
    refined = refine_cams(cams=cams, aff_enc=torch.from_numpy(batch["aff_enc"]), aff_dec=aff_dec, cfg=cfg)
    out = pseudo_labels(fg_maps=refined, labels=labels, images=batch["images"], cfg=cfg, use_par=use_par)
    return out.numpy()


def _reference(batch: dict, with_decoder: bool, use_par: bool = False) -> np.ndarray:
    """(B, H, W) reference labels; with PAR, pixels where its two best scores tie (< FLOAT_TIE) are −1."""
    out = []
    for b in range(BATCH):
        keys = np.flatnonzero(batch["labels"][b]).tolist()
        aff_dec = batch["aff_dec"][b] if with_decoder else None
        scores = _ref_scores(batch["raw"][b, keys], batch["aff_enc"][b], aff_dec)
        if not use_par:
            out.append(_ref_labels(scores, keys))
            continue
        scores = _ref_par(batch["images"][b].numpy(), scores)
        top2 = np.sort(scores, axis=0)[-2:]
        out.append(np.where(top2[1] - top2[0] < FLOAT_TIE, -1, _ref_labels(scores, keys)))
    return np.stack(out)


def _preset() -> RefineConfig:
    return load_config(None, preset_overrides("reference")).refine


CASES = [(seed, grid, with_decoder) for seed in SEEDS for grid in GRIDS for with_decoder in (True, False)]
CASE_IDS = [f"seed{seed}-{h}x{w}-{'decoder' if decoder else 'warmup'}" for seed, (h, w), decoder in CASES]


@functools.cache
def _case(seed: int, grid: tuple[int, int], with_decoder: bool) -> tuple[dict, np.ndarray]:
    """The inputs of one case and the reference's labels for them."""
    batch = _inputs(seed, grid)
    return batch, _reference(batch, with_decoder)


@pytest.mark.parametrize(("seed", "grid", "with_decoder"), CASES, ids=CASE_IDS)
def test_reference_preset_equals_the_reference_pixel_for_pixel(seed, grid, with_decoder):
    batch, expected = _case(seed, grid, with_decoder)
    got = _ours(batch, _preset(), with_decoder)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} of {got.size} pixels differ"


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_box_masks_equal_the_reference(seed):
    for grid in GRIDS:
        batch = _inputs(seed, grid)
        cams = minmax_normalise(torch.from_numpy(batch["raw"])) * torch.from_numpy(batch["labels"])[:, :, None, None]
        boxes = box_masks(cams, REF_BOX_THRESHOLD, "reference").numpy()
        for b, k in zip(*np.nonzero(batch["labels"])):
            assert np.array_equal(boxes[b, k], _ref_box_mask(_ref_grayscale_cam(batch["raw"][b, k])) > 0)


@pytest.mark.parametrize("grid", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
def test_with_par_equal_to_the_reference_except_float_ties(grid):
    """PAR as the reference runs it (same formula as ours, other summation order): equal labels wherever the
    reference's two best scores are not a float32 tie; ties are a handful of pixels."""
    batch = _inputs(SEEDS[1], grid)
    expected = _reference(batch, with_decoder=True, use_par=True)
    got = _ours(batch, _preset(), with_decoder=True, use_par=True)
    decided = expected >= 0
    assert decided.mean() > 0.999
    assert np.array_equal(got[decided], expected[decided])


def test_reference_threshold_uses_the_reference_uint8_peak():
    """The reference's CAM peaks at 1 − 1.2e-7 (x / (max + 1e-7), twice), so it quantises to 254 and the
    threshold is int(0.4 · 254) = 101: a cell at 0.4005 (quantised 102) is in its box; a peak of 255 would
    give the threshold 102 and leave it out."""
    cams = torch.zeros(1, 1, 4, 4)
    cams[0, 0, 1, 1], cams[0, 0, 1, 2] = 1.0, 0.4005
    raw = cams[0, 0].numpy()
    assert int((_ref_grayscale_cam(raw) * UINT8_SCALE).astype(np.uint8).max()) == UINT8_SCALE - 1
    expected = _ref_box_mask(_ref_grayscale_cam(raw)) > 0
    assert expected[1, 2]
    assert np.array_equal(box_masks(cams, REF_BOX_THRESHOLD, "reference")[0, 0].numpy(), expected)


# Each preset key set to another value (the default where the preset differs from it): the labels differ.
WRONG = {"deviation": "abs", "box_mask": "output", "box_clip": "inclusive", "background": "constant",
         "bg_power": 2.0, "ignore_band": True}


@pytest.mark.parametrize("key", sorted(WRONG))
def test_every_preset_key_matters(key):
    preset = _preset()
    wrong = load_config(None, [*preset_overrides("reference"), f"refine.{key}={json.dumps(WRONG[key])}"]).refine
    assert getattr(wrong, key) != getattr(preset, key)
    cases = [case for case in CASES if case[2] or key != "deviation"]  # layers are chosen only with A_f
    differing = sum(int((_ours(_case(*case)[0], wrong, case[2]) != _case(*case)[1]).sum()) for case in cases)
    assert differing > 0


def test_preset_sets_the_spec_keys_and_user_overrides_win():
    cfg = _preset()
    assert (cfg.deviation, cfg.box_mask, cfg.box_clip, cfg.background) == ("signed", "source", "reference", "power")
    assert cfg.bg_power == 1.0 and cfg.ignore_band is False
    later = load_config(None, [*preset_overrides("reference"), "refine.box_clip=inclusive"]).refine
    assert later.box_clip == "inclusive" and later.deviation == "signed"


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"no preset 'nope'; choose one of reference") as err:
        preset_overrides("nope")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ CLI --preset


def test_train_preset_comes_before_the_user_overrides(monkeypatch):
    seen = {}

    def fake_train(config, callbacks, resume_from=None):
        seen["refine"] = config.refine
        return types.SimpleNamespace(best=1.0)

    monkeypatch.setattr("affseg.train.train", fake_train)
    assert main(["train", "--preset", "reference", "refine.deviation=abs"]) == 0
    assert seen["refine"].box_clip == "reference" and seen["refine"].box_mask == "source"
    assert seen["refine"].deviation == "abs"  # the user's override wins


def test_sweep_preset_reaches_the_base_config_and_sampled_keys_stay_sampled(monkeypatch):
    seen = {}

    def fake_run_sweep(space, profile, resume=False, overrides=(), name=None):
        seen["overrides"] = list(overrides)
        return types.SimpleNamespace(best=None)

    monkeypatch.setattr("affseg.sweep.tuner.run_sweep", fake_run_sweep)
    main(["sweep", "--space", "refine", "--preset", "reference", "trials=2"])
    assert seen["overrides"] == [*preset_overrides("reference"), "trials=2"]
    spec = load_space("refine", "demo", seen["overrides"])
    trial = spec.trial_config({"refine.deviation": "abs"})
    assert trial.refine.box_clip == "reference" and trial.refine.deviation == "abs"


def test_unknown_preset_at_the_cli_is_one_line(capsys):
    assert main(["train", "--preset", "weclip"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["affseg train: error: no preset 'weclip'; choose one of reference"]
