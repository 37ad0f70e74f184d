import numpy as np
import torch

from affseg.metrics import ConfusionMatrix, scores_from_confusion


def test_hand_computed_three_classes():
    # truth rows, prediction columns
    matrix = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    scores = scores_from_confusion(matrix, ("background", "aeroplane", "bicycle"))
    # IoU bg = 8 / (10 + 9 - 8) = 8/11 ; aeroplane = 3 / (4 + 5 - 3) = 3/6 ; bicycle absent -> NaN
    assert np.isclose(scores.per_class.iou[0], 8 / 11)
    assert np.isclose(scores.per_class.iou[1], 0.5)
    assert np.isnan(scores.per_class.iou[2])
    assert np.isclose(scores.miou, (8 / 11 + 0.5) / 2)
    assert np.isclose(scores.pixel_acc, 11 / 14)
    assert np.isclose(scores.mean_acc, (8 / 10 + 3 / 4) / 2)
    assert list(scores.per_class["class"]) == ["background", "aeroplane", "bicycle"]


def test_predicted_but_absent_class_counts_as_zero():
    matrix = np.array([[5, 5], [0, 0]])  # class 1 never true but predicted: IoU 0, not NaN
    scores = scores_from_confusion(matrix, ("background", "aeroplane"))
    assert scores.per_class.iou[1] == 0.0
    assert np.isclose(scores.miou, (0.5 + 0.0) / 2)


def test_confusion_accumulates_and_ignores_255():
    cm = ConfusionMatrix(num_classes=3)
    truth = torch.tensor([[0, 1, 255], [2, 2, 1]])
    pred = torch.tensor([[0, 2, 1], [2, 1, 1]])
    cm.update(pred, truth)
    cm.update(pred[None], truth[None])  # batched form adds the same counts
    expected = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]]) * 2
    assert np.array_equal(cm.matrix.numpy(), expected)
    scores = cm.summary(("background", "aeroplane", "bicycle"))
    assert np.isclose(scores.per_class.iou[0], 1.0)
    assert np.isclose(scores.per_class.iou[1], 2 / 6)


def test_ignored_predictions_never_enter_the_matrix():
    # an ignore-band pseudo-label (255) is no class: that pixel is left out, never an out-of-range bin
    matrix = ConfusionMatrix(num_classes=3)
    truth = torch.tensor([[0, 1, 2, 255]])
    prediction = torch.tensor([[0, 255, 2, 1]])
    matrix.update(prediction, truth)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    expected[0, 0] = expected[2, 2] = 1
    assert matrix.matrix.shape == (3, 3)
    assert torch.equal(matrix.matrix, expected)
