"""Post-processing: the largest connected component, kept only where the out-of-fold Dice says it helps."""

import numpy as np
import torch
from monai.metrics import compute_dice

from jointray.inference.postprocess import ComponentEvidence, keep_largest_component


def _monai_dice(pred: np.ndarray, target: np.ndarray) -> float:
    as_tensor = [torch.from_numpy(x[None, None].astype(np.float32)) for x in (pred, target)]
    return float(compute_dice(*as_tensor, include_background=True)[0, 0])


def test_only_the_largest_component_of_the_chosen_labels_is_kept():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:5, 1:5, 1:5] = 1      # label 1: 64 voxels
    mask[8:10, 8:10, 8:10] = 1   # label 1: 8 voxels, apart
    mask[9, 1, 1] = 2            # label 2: two single voxels, apart
    mask[1, 9, 9] = 2
    kept = keep_largest_component(mask, [1])
    assert (kept == 1).sum() == 64 and (kept[8:10, 8:10, 8:10] == 0).all()  # removed voxels become background
    assert (kept == 2).sum() == 2  # label 2 was not chosen
    mask[5, 5, 5] = 1  # touches the big block at a corner only: one component under 26-connectivity
    assert (keep_largest_component(mask, [1]) == 1).sum() == 65
    assert keep_largest_component(mask, []) is mask


def test_the_decision_follows_the_mean_dice_of_each_structure():
    """Label 1's predictions carry a stray blob (removing it helps); label 2's reference has two parts
    (keeping one hurts). Dice figures match MONAI's."""
    structures = {1: "left", 2: "right"}
    evidence = ComponentEvidence(structures)
    expected = {"left": ([], []), "right": ([], [])}
    for shift in range(3):
        label = np.zeros((16, 16, 16), np.uint8)
        label[2:7, 2:7, 2 + shift:7 + shift] = 1
        label[10:14, 10:14, 2:5] = 2
        label[10:12, 10:12, 10:12] = 2
        mask = label.copy()
        mask[2:7, 2:7, 2 + shift] = 0        # a slice missed
        mask[13:15, 2:4, 12:14] = 1          # a false-positive blob of label 1
        evidence.add(mask, label)
        largest = keep_largest_component(mask, [1, 2])
        for k, name in structures.items():
            expected[name][0].append(_monai_dice(mask == k, label == k))
            expected[name][1].append(_monai_dice(largest == k, label == k))
    figures = evidence.figures()
    for name, (plain, largest) in expected.items():
        assert figures[name]["cases"] == 3
        assert abs(figures[name]["dice"] - np.mean(plain)) < 1e-6
        assert abs(figures[name]["dice_largest_component"] - np.mean(largest)) < 1e-6
    assert figures["left"]["dice_largest_component"] > figures["left"]["dice"]
    assert figures["right"]["dice_largest_component"] < figures["right"]["dice"]
    assert evidence.decide() == ["left"]


def test_cases_without_a_structure_on_either_side_do_not_count():
    evidence = ComponentEvidence({1: "a"})
    evidence.add(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8))
    assert evidence.figures()["a"]["cases"] == 0 and evidence.decide() == []
