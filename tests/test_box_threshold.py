"""Box masks: a cell exactly at box_threshold · max is not active (issue 9, item 20)."""

import torch

from affseg.refine.random_walk import box_masks

THRESHOLD = 0.5  # 0.5 · 1.0 is exact in float32: the comparison, not rounding, decides


def test_cell_exactly_at_threshold_is_excluded_and_just_above_included():
    cams = torch.zeros(1, 2, 5, 5)
    cams[0, :, 0, 0] = 1.0  # the peak, top-left
    cams[0, 0, 4, 4] = THRESHOLD  # exactly at threshold · max: not active, no box reaches it
    cams[0, 1, 4, 4] = torch.nextafter(torch.tensor(THRESHOLD), torch.tensor(1.0))  # just above: active
    boxes = box_masks(cams, THRESHOLD)
    assert not boxes[0, 0, 4, 4] and boxes[0, 0].sum() == 1  # only the peak's own 1×1 box
    assert boxes[0, 1, 4, 4] and boxes[0, 1].sum() == 2
