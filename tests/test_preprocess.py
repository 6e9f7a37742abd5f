"""Preprocessing geometry, checked against nibabel's canonical reorientation and world coordinates."""

import nibabel as nib
import numpy as np
import pytest

from jointray.data.spec import PreprocessSpec
from jointray.data.preprocess import preprocess_case, restore_to_original


def _case(shape=(30, 36, 20), affine=None, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, size=(1, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[8:14, 10:20, 5:12] = 1
    label[14:18, 12:22, 6:10] = 2
    if affine is None:  # LPS-like, as DICOM-derived NIfTI often are, with an axis permutation
        affine = np.array([[0, -1.0, 0, 40], [-1.0, 0, 0, 50], [0, 0, 2.0, -10], [0, 0, 0, 1]])
    return image, label, affine


def _spec(**kw):
    return PreprocessSpec(**({"target_spacing": None, "target_shape": (48, 48, 48)} | kw))


def test_reorientation_matches_nibabel_canonical():
    image, label, affine = _case()
    canonical = nib.as_closest_canonical(nib.Nifti1Image(label, affine))
    spec = _spec(target_shape=canonical.shape)
    out = preprocess_case(image, label, affine, spec)
    np.testing.assert_array_equal(out.label, np.asarray(canonical.dataobj))
    np.testing.assert_allclose(out.geometry.affine, canonical.affine)
    assert nib.aff2axcodes(out.geometry.affine) == ("R", "A", "S")


@pytest.mark.parametrize("target_shape", [(48, 48, 48), (24, 40, 16)])
def test_label_round_trip_is_exact_without_resampling(target_shape):
    image, label, affine = _case()
    out = preprocess_case(image, label, affine, _spec(target_shape=target_shape))
    assert out.image.shape == (1, *target_shape) and out.label.shape == target_shape
    assert out.label_voxels_cropped == 0  # the label-centred crop keeps the structure
    restored = restore_to_original(out.label, out.geometry)
    assert restored.dtype == label.dtype
    np.testing.assert_array_equal(restored, label)


def test_prepared_voxels_keep_their_world_position():
    image, label, affine = _case()
    out = preprocess_case(image, label, affine, _spec(target_shape=(24, 40, 16)))
    for value in (1, 2):
        before = affine @ np.append(np.argwhere(label == value).mean(0), 1)
        after = out.geometry.affine @ np.append(np.argwhere(out.label == value).mean(0), 1)
        np.testing.assert_allclose(after, before, atol=1e-9)


def test_resampling_sets_spacing_and_keeps_world_centroid():
    image, label, affine = _case()
    out = preprocess_case(image, label, affine, _spec(target_spacing=(1.0, 1.0, 1.0), target_shape=(48, 48, 48)))
    assert out.geometry.resampled_shape == (36, 30, 40)  # RAS axes; z doubled from 2 mm to 1 mm
    np.testing.assert_allclose(np.linalg.norm(out.geometry.affine[:3, :3], axis=0), 1.0)
    for value in (1, 2):
        before = affine @ np.append(np.argwhere(label == value).mean(0), 1)
        after = out.geometry.affine @ np.append(np.argwhere(out.label == value).mean(0), 1)
        np.testing.assert_allclose(after[:3], before[:3], atol=0.5)
    restored = restore_to_original(out.label, out.geometry)
    assert restored.shape == label.shape
    assert (restored == label).mean() > 0.99  # nearest neighbour both ways: only boundary voxels may move


def test_crop_is_centred_on_the_label_and_counts_lost_voxels():
    image, label, affine = _case(affine=np.eye(4))
    out = preprocess_case(image, label, affine, _spec(target_shape=(8, 8, 6)))
    bbox_centre = np.array([(i.min() + i.max() + 1) / 2 for i in np.nonzero(label)])  # bbox is 10 x 12 x 7
    window_centre = np.array(out.geometry.crop_start) + np.array([8, 8, 6]) / 2
    np.testing.assert_allclose(window_centre, bbox_centre, atol=0.5)
    assert out.label_voxels_cropped == np.count_nonzero(label) - np.count_nonzero(out.label) > 0
    image_centred = preprocess_case(image, label, affine, _spec(target_shape=(12, 12, 8), crop_center="image"))
    np.testing.assert_array_equal(image_centred.geometry.crop_start, [9, 12, 6])


def test_pad_is_symmetric_and_uses_pad_value():
    image, label, affine = _case(shape=(20, 20, 20), affine=np.eye(4))
    out = preprocess_case(image, label, affine, _spec(target_shape=(24, 26, 20), pad_value=-5.0))
    assert out.geometry.crop_start == (-2, -3, 0)
    assert np.all(out.image[:, :2] == -5.0) and np.all(out.image[:, -2:] == -5.0)


def test_intensity_normalisation_modes():
    image, label, affine = _case(affine=np.eye(4))
    image[0, :5] = 0.0  # a zero background slab, excluded from the z-score statistics
    z = preprocess_case(image, label, affine, _spec(target_shape=(30, 36, 20)))
    foreground = z.image[0, 5:]
    assert abs(foreground.mean()) < 1e-4 and abs(foreground.std() - 1) < 1e-3
    assert np.all(z.image[0, :5] == 0)
    p = preprocess_case(image, label, affine, _spec(target_shape=(30, 36, 20), intensity={"mode": "percentile"}))
    assert p.image.min() == 0.0 and p.image.max() == 1.0
