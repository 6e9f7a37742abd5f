"""Training augmentation: nnU-Net's transforms on real MSD cases, each doing what it says, and the streams the
training loop draws from (in line on a CPU, one batch ahead in a thread beside a GPU) giving exactly what each
call gives."""

import itertools
import json
import threading

import numpy as np
import pytest
from conftest import REPO, shared_data

from jointray.config import ConfigError, load_config
from jointray.data.augment import AUGMENT, Augmenter, stream_seed
from jointray.data.preprocess import preprocess_case
from jointray.data.volumes import read_volume

MSD = REPO / "configs" / "msd_nnunet_augment.yaml"
#: Every transform off: a test switches on the one it examines.
NOTHING = ["train.augment.flip_prob=0", "train.augment.affine_prob=0", "train.augment.shift_prob=0",
           "train.augment.noise_prob=0", "train.augment.blur_prob=0", "train.augment.brightness_prob=0",
           "train.augment.offset_prob=0", "train.augment.contrast_prob=0", "train.augment.lowres_prob=0",
           "train.augment.gamma_prob=0", "train.augment.gamma_inverted_prob=0"]


@pytest.fixture(scope="module")
def batch():
    """Four real MSD cases, prepared as the shards hold them: image (4, 1, 32, 64, 48), label (4, 32, 64, 48)."""
    root = shared_data("msd_hippocampus")
    cfg = load_config(MSD)
    entries = json.loads((root / "dataset.json").read_text())["training"][:4]
    images, labels = [], []
    for entry in entries:
        image, label = (read_volume(root / entry[k], cfg.data.max_voxels) for k in ("image", "label"))
        prepared = preprocess_case(image.array[None], label.array.astype(np.uint8), image.affine, cfg.preprocess)
        images.append(prepared.image)
        labels.append(prepared.label)
    return {"image": np.stack(images).astype(np.float32), "label": np.stack(labels),
            "subject_id": np.array([e["image"] for e in entries])}


def _only(*overrides: str) -> Augmenter:
    return Augmenter(load_config(MSD, [*NOTHING, *overrides]).train.augment)


def test_the_nnunet_config_switches_on_nnunets_transforms_and_a_zero_probability_draws_nothing():
    names = [type(t).__name__ for t in Augmenter(load_config(MSD).train.augment).transform.transforms]
    assert names == ["RandFlipd", "RandAffined", "RandIntegerShiftd", "RandGaussianNoised", "RandGaussianSmoothd",
                     "RandScaleIntensityd", "RandScaleIntensityFixedMeand", "RandSimulateLowResolutiond",
                     "RandAdjustContrastd", "RandAdjustContrastd"]
    assert _only().transform.transforms == ()


@pytest.mark.parametrize(("override", "message"), [
    ("train.augment.scale=[1.4, 0.7]", r"train.augment.scale.*low <= high"),
    ("train.augment.scale=1.2", r"train.augment.scale.*zoom factors > 0"),
    ("train.augment.lowres_zoom=[0.5, 2.0]", r"train.augment.lowres_zoom.*up to 1"),
    ("train.augment.gamma=[0.0, 1.5]", r"train.augment.gamma.*positive"),
    ("train.augment.rotate_deg=[10, -5, 10]", r"train.augment.rotate_deg.*>= 0"),
    ("train.augment.blur_prob=1.5", r"train.augment.blur_prob"),
])
def test_a_bad_augmentation_setting_fails_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MSD, [override])


def test_intensity_transforms_leave_the_label_and_do_what_they_say(batch):
    image = batch["image"]
    # Contrast about the mean, clipped to each case's own range.
    out = _only("train.augment.contrast_prob=1")(batch, 0)
    np.testing.assert_array_equal(out["label"], batch["label"])
    for before, after in zip(image, out["image"]):
        assert after.min() >= before.min() - 1e-5 and after.max() <= before.max() + 1e-5
        assert not np.allclose(after, before)
    # Gamma, plain and of the inverted image: mean and SD kept.
    for key in ("gamma_prob", "gamma_inverted_prob"):
        out = _only(f"train.augment.{key}=1")(batch, 0)
        np.testing.assert_array_equal(out["label"], batch["label"])
        for before, after in zip(image, out["image"]):
            assert not np.allclose(after, before)
            assert after.mean() == pytest.approx(before.mean(), abs=1e-4)
            assert after.std() == pytest.approx(before.std(), rel=1e-4)
    # Brightness: one factor per case in [0.75, 1.25].
    out = _only("train.augment.brightness_prob=1", "train.augment.brightness=0.25")(batch, 0)
    for before, after in zip(image, out["image"]):
        factor = float(np.median(after[before != 0] / before[before != 0]))
        assert 0.75 <= factor <= 1.25 and np.allclose(after, before * factor, atol=1e-5)
    # Low resolution: a smoother image (less energy in the voxel-to-voxel differences), same range of values.
    out = _only("train.augment.lowres_prob=1", "train.augment.lowres_zoom=[0.5, 0.5]")(batch, 0)
    for before, after in zip(image, out["image"]):
        assert np.abs(np.diff(after, axis=1)).mean() < 0.8 * np.abs(np.diff(before, axis=1)).mean()


def test_spatial_transforms_move_image_and_label_together(batch):
    # Mirroring: exactly the flipped arrays.
    out = _only("train.augment.flip_prob=1")(batch, 0)
    np.testing.assert_array_equal(out["image"], batch["image"][:, :, ::-1])
    np.testing.assert_array_equal(out["label"], batch["label"][:, ::-1])
    # Rotation + zoom, and elastic deformation: the label stays a label map, and the image's bright
    # hippocampus stays under it (the mean image intensity inside the structure moves little).
    for overrides in (["train.augment.affine_prob=1"],
                      ["train.augment.elastic_prob=1", "train.augment.elastic_magnitude=[300, 300]"]):
        out = _only(*overrides)(batch, 3)
        assert set(np.unique(out["label"])) <= {0, 1, 2} and out["label"].dtype == batch["label"].dtype
        for k in range(len(image := batch["image"])):
            assert not np.array_equal(out["label"][k], batch["label"][k])
            inside_before = image[k, 0][batch["label"][k] > 0].mean()
            inside_after = out["image"][k, 0][out["label"][k] > 0].mean()
            outside_after = out["image"][k, 0][out["label"][k] == 0].mean()
            assert abs(inside_after - inside_before) < 0.25 * abs(inside_before - outside_after), overrides


def _moved(array: np.ndarray, offset: tuple[int, ...]) -> np.ndarray:
    """``array`` (…, X, Y, Z) moved by whole voxels along its last three axes, zeros where nothing moved in."""
    out = np.zeros_like(array)
    src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, array.shape[-3:]))
    dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, array.shape[-3:]))
    out[(..., *dst)] = array[(..., *src)]
    return out


def test_the_shift_moves_image_and_label_by_the_same_whole_voxels(batch):
    """Every case comes out exactly moved (no interpolation), image and label by the same offset, each axis's
    offset within train.augment.shift_voxels, and the cases do not all move alike."""
    out = _only("train.augment.shift_prob=1", "train.augment.shift_voxels=3")(batch, 0)
    offsets = set()
    for k in range(len(batch["image"])):
        found = [o for o in itertools.product(range(-3, 4), repeat=3)
                 if np.array_equal(_moved(batch["label"][k], o), out["label"][k])
                 and np.array_equal(_moved(batch["image"][k], o), out["image"][k])]
        assert len(found) == 1, (k, found)
        offsets.add(found[0])
    assert len(offsets) > 1 and (0, 0, 0) not in offsets
    assert out["label"].dtype == batch["label"].dtype and out["image"].dtype == np.float32


def test_augmenting_in_line_or_one_batch_ahead_gives_what_each_call_gives(batch):
    augment = Augmenter(load_config(MSD).train.augment)
    batches = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2, 0, 2)]
    seed = lambda i: stream_seed(0, AUGMENT, 1, 0, i)
    inline = [augment(b, seed(i)) for i, b in enumerate(batches)]
    assert len({float(b["image"].sum()) for b in inline}) == 4  # a fresh draw per batch, also for repeated input
    for stream in (augment.in_line(iter(batches), seed), augment.ahead(iter(batches), seed)):
        out = list(stream)
        assert len(out) == 4
        for a, b in zip(inline, out):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    # A caller that stops after the first batch stops the thread too (the generator closes cleanly).
    stream = augment.ahead(iter(batches), seed)
    np.testing.assert_array_equal(next(stream)["image"], inline[0]["image"])
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("augment")]
