"""Sinkhorn, transition matrix, box masks and the random walk on hand-sized cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from affseg.refine.random_walk import box_masks, random_walk, sinkhorn, transition_matrix


def test_sinkhorn_rows_exact_columns_close():
    torch.manual_seed(0)
    affinity = torch.rand(2, 30, 30) + 0.05
    out = sinkhorn(affinity, iters=3)
    assert torch.allclose(out.sum(dim=-1), torch.ones(2, 30), atol=1e-6)
    assert (out.sum(dim=-2) - 1).abs().max() < 1e-2


def test_sinkhorn_one_round_by_hand():
    affinity = torch.tensor([[[1.0, 3.0], [1.0, 1.0]]])
    # columns: [[.5, .75], [.5, .25]]; rows: [[.4, .6], [2/3, 1/3]]
    expected = torch.tensor([[[0.4, 0.6], [2 / 3, 1 / 3]]])
    assert torch.allclose(sinkhorn(affinity, iters=1), expected)


def test_transition_exactly_symmetric():
    torch.manual_seed(1)
    transition = transition_matrix(torch.rand(3, 25, 25), iters=3)
    assert torch.equal(transition, transition.transpose(-2, -1))
    assert (transition.sum(dim=-1) - 1).abs().max() < 1e-2


TRANSITION = torch.tensor(
    [
        [0.5, 0.2, 0.2, 0.1],
        [0.2, 0.6, 0.1, 0.1],
        [0.2, 0.1, 0.4, 0.3],
        [0.1, 0.1, 0.3, 0.5],
    ]
)[None]
CAMS = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]], [[0.0, 0.2], [0.0, 1.0]]]])  # (1, 2, 2, 2): N = 4
ALL = torch.ones(1, 2, 2, 2, dtype=torch.bool)


@pytest.mark.parametrize("alpha", [1, 2])
def test_random_walk_is_matrix_power(alpha):
    vectors = CAMS.reshape(2, 4).T  # (N, K)
    expected = torch.linalg.matrix_power(TRANSITION[0], alpha) @ vectors
    out = random_walk(TRANSITION, CAMS, alpha, ALL, "output")
    assert torch.allclose(out.reshape(2, 4).T, expected, atol=1e-6)


def test_random_walk_alpha_two_by_hand():
    m = torch.tensor([1.0, 0.0, 0.5, 0.0])  # class 0
    step = torch.tensor([0.6, 0.25, 0.4, 0.25])  # T m, row by row
    twice = torch.tensor(
        [
            0.5 * 0.6 + 0.2 * 0.25 + 0.2 * 0.4 + 0.1 * 0.25,
            0.2 * 0.6 + 0.6 * 0.25 + 0.1 * 0.4 + 0.1 * 0.25,
            0.2 * 0.6 + 0.1 * 0.25 + 0.4 * 0.4 + 0.3 * 0.25,
            0.1 * 0.6 + 0.1 * 0.25 + 0.3 * 0.4 + 0.5 * 0.25,
        ]
    )
    assert torch.allclose(TRANSITION[0] @ m, step)
    out = random_walk(TRANSITION, CAMS, 2, ALL, "output")
    assert torch.allclose(out[0, 0].flatten(), twice, atol=1e-6)


def test_random_walk_box_modes():
    boxes = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    boxes[0, 0, 0, :] = True  # class 0 box = top row (cells 0, 1)
    boxes[0, 1] = True
    t2 = TRANSITION[0] @ TRANSITION[0]
    m = CAMS[0, 0].flatten()
    keep = boxes[0, 0].flatten().float()

    output = random_walk(TRANSITION, CAMS, 2, boxes, "output")
    assert torch.allclose(output[0, 0].flatten(), keep * (t2 @ m), atol=1e-6)
    source = random_walk(TRANSITION, CAMS, 2, boxes, "source")
    assert torch.allclose(source[0, 0].flatten(), (t2 * keep[None, :]) @ m, atol=1e-6)  # columns zeroed
    assert torch.allclose(source[0, 0].flatten(), t2 @ (keep * m), atol=1e-6)
    assert torch.allclose(output[0, 1], source[0, 1])  # a full box: both modes agree
    assert source[0, 0, 1].abs().sum() > 0  # mass reaches outside the box in source mode


def test_box_masks_two_blobs_and_border():
    cam = torch.zeros(6, 7)
    cam[0, 1] = 0.9  # blob A: an L touching the top border (rows 0–1, cols 1–2)
    cam[1, 1:3] = 0.8
    cam[4, 6] = 1.0  # blob B: diagonal pair touching the bottom-right corner (rows 4–5, cols 5–6)
    cam[5, 5] = 0.7
    cam[3, 3] = 0.3  # below 0.4 · max: not a region
    cams = torch.stack([cam, torch.zeros(6, 7)])[None]  # class 1 absent
    boxes = box_masks(cams, threshold=0.4)

    expected = torch.zeros(6, 7, dtype=torch.bool)
    expected[0:2, 1:3] = True
    expected[4:6, 5:7] = True  # last row and last column kept
    assert torch.equal(boxes[0, 0], expected)
    assert not boxes[0, 1].any()


def _scipy_boxes(cam: np.ndarray, threshold: float) -> np.ndarray:
    out = np.zeros(cam.shape, dtype=bool)
    if cam.max() <= 0:
        return out
    labels, _ = ndimage.label(cam > threshold * cam.max(), structure=np.ones((3, 3)))
    for region in ndimage.find_objects(labels):
        out[region] = True
    return out


def test_box_masks_match_scipy_on_random_maps():
    generator = torch.Generator().manual_seed(3)
    cams = torch.rand(3, 4, 9, 11, generator=generator).pow(4)
    cams[1, 2] = 0
    boxes = box_masks(cams, threshold=0.4)
    for b in range(3):
        for k in range(4):
            assert np.array_equal(boxes[b, k].numpy(), _scipy_boxes(cams[b, k].numpy(), 0.4))


def _one_map(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values)[None, None]  # (1, 1, h, w)


def test_box_clip_last_column_region():
    cams = torch.zeros(1, 1, 3, 4)
    cams[0, 0, 0, 0] = 1.0  # region A: top-left cell
    cams[0, 0, 1:, 3] = 1.0  # region B: only in the last column
    inclusive = box_masks(cams, 0.5, "inclusive")[0, 0]
    reference = box_masks(cams, 0.5, "reference")[0, 0]
    assert inclusive[1:, 3].all() and inclusive.sum() == 3
    # reference: B's box is [y0:min(3, 2), x0:min(4, 3)] = [1:2, 3:3] → empty; A keeps [0:1, 0:1]
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[0, 0] = True
    assert torch.equal(reference, expected)


def test_box_clip_reference_fills_exclusively_inside():
    cams = torch.zeros(1, 1, 5, 5)
    cams[0, 0, 1:3, 1:4] = 1.0  # rows 1–2, columns 1–3: away from the border
    reference = box_masks(cams, 0.5, "reference")[0, 0]
    assert torch.equal(reference, cams[0, 0] > 0)  # cv2 box x+w is exclusive: same rectangle


def test_box_clip_reference_quantises_before_threshold():
    cams = _one_map([[1.0, 0.501, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # 0.501 > 0.5 · 1, but quantised: int(0.501 · 255) = 127, not above int(0.5 · 254) = 127 (peak 254:
    # the reference scales by max + 1e-7 first)
    inclusive = box_masks(cams, 0.5, "inclusive")[0, 0]
    reference = box_masks(cams, 0.5, "reference")[0, 0]
    assert inclusive[0, 1] and not reference[0, 1]
    assert reference[0, 0]


def test_box_masks_only_present_maps_same_as_all():
    torch.manual_seed(3)
    cams = torch.rand(3, 20, 7, 9) ** 3
    cams[:, ::2] = 0.0  # absent classes are zero
    for clip in ("inclusive", "reference"):
        fast = box_masks(cams, 0.4, clip)
        one_by_one = torch.stack(
            [torch.stack([box_masks(cams[b : b + 1, k : k + 1], 0.4, clip)[0, 0] for k in range(20)]) for b in range(3)]
        )
        assert torch.equal(fast, one_by_one)
        assert not fast[:, ::2].any()
