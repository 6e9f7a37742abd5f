"""The inference core: prepare → forward → finish, MC dropout, sliding window, exported models, input sniffing."""

import contextlib
import gzip
import io
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import MSD_TRAIN_CASES, shared_data, zip_bytes

from jointray.artifacts import CheckpointError, export_artifact, load_model
from jointray.config import InferenceConfig
from jointray.data.spec import PreprocessSpec
from jointray.data.clinical import CategoricalFeature, ClinicalSchema, NumericFeature
from jointray.data.errors import InputError
from jointray.data.preprocess import preprocess_case, restore_to_original
from jointray.inference.cases import CasePreparer, PreparedCase, check_clinical
from jointray.inference.forward import ForwardResult
from jointray.inference.predictor import Predictor
from jointray.metrics import segmentation_metrics

STRUCTURES = {1: "anterior", 2: "posterior"}


def _held_out(index: int = 0) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A labelled MSD case the session's checkpoint never saw (image, label array)."""
    msd = shared_data("msd_hippocampus")
    meta = json.loads((msd / "dataset.json").read_text())
    entries = [e for e in meta["training"] if (msd / e["image"]).exists() and (msd / e["label"]).exists()]
    entry = entries[MSD_TRAIN_CASES + index]
    return nib.load(msd / entry["image"]), np.asarray(nib.load(msd / entry["label"]).dataobj).astype(np.uint8)


def _dice(mask: np.ndarray, label: np.ndarray) -> float:
    seg = segmentation_metrics(torch.from_numpy(mask[None]), torch.from_numpy(label[None]), STRUCTURES, (1, 1, 1))
    return float(np.mean([float(seg[f"dice/{name}"][0]) for name in STRUCTURES.values()]))


@pytest.fixture(scope="module")
def predictor(msd_checkpoint):
    return Predictor(msd_checkpoint, device="cpu")


def test_cases_inside_a_whole_head_volume_are_found_by_the_sliding_window(predictor):
    """Real MSD cases padded into a volume far larger than the training window, at random offsets: the mask
    lands where the structure is, as good as on the case itself (mean Dice over three held-out cases)."""
    rng = np.random.default_rng(7)
    big_shape = (150, 180, 140)  # ~ a whole head at 1 mm, far beyond the 32x64x48 window
    plain_dice, padded_dice = [], []
    for index in range(3):
        image, label = _held_out(index)
        array = np.asarray(image.dataobj).astype(np.float32)
        direct = predictor.prepare((array, image.affine), name="case")
        # The case itself is a few voxels wider than the 32-voxel window left to right: it is located too.
        assert array.shape[0] > predictor.spec.target_shape[0] and direct.path == "sliding_window"
        plain = predictor.finish(direct, predictor.forward([direct], 1)[0], 1, "heads")
        offset = rng.integers(0, np.array(big_shape) - array.shape)
        big, big_label = np.zeros(big_shape, np.float32), np.zeros(big_shape, np.uint8)
        box = tuple(slice(o, o + n) for o, n in zip(offset, array.shape))
        big[box], big_label[box] = array, label
        shift = np.eye(4)
        shift[:3, 3] = -offset  # the embedded case keeps its world coordinates
        padded = predictor.prepare((big, image.affine @ shift), name="whole head")
        assert padded.path == "sliding_window" and padded.image.shape[1:] == big_shape
        result = predictor.forward([padded], 4, "decoder")[0]
        found = predictor.finish(padded, result, 4, "decoder")
        assert found.path == "sliding_window" and found.mask.shape == big_shape
        # The outcome/MC window was centred on the structure it found, which it holds whole.
        start, window = np.array(result.focus_start), np.array(predictor.spec.target_shape)
        structure = np.argwhere(label > 0) + offset
        assert np.all(structure.min(0) >= start) and np.all(structure.max(0) < start + window)
        plain_dice.append(_dice(plain.mask, label))
        padded_dice.append(_dice(found.mask, big_label))
    assert np.mean(plain_dice) > 0.7, plain_dice  # the model finds the structures at all
    assert abs(np.mean(padded_dice) - np.mean(plain_dice)) <= 0.02, (plain_dice, padded_dice)


def test_one_sample_is_the_deterministic_pass_and_dropout_spreads_the_samples(predictor):
    image, _ = _held_out(1)
    case = predictor.prepare((np.asarray(image.dataobj), image.affine), name="case")
    single = predictor.finish(case, predictor.forward([case], 1, "full")[0], 1, "full")
    for name, estimate in single.volume_estimates.items():
        # one pass: no spread, and on a 1 mm input the prepared-grid count is the mask's own volume
        assert estimate.std == 0 and estimate.interval == (estimate.point, estimate.point)
        assert estimate.mean == single.volumes_mm3[name] > 0
    assert all(u["mutual_information"] == 0 for u in single.uncertainty.values())
    for mode in ("full", "decoder"):
        sampled = predictor.finish(case, predictor.forward([case], 12, mode)[0], 12, mode)
        np.testing.assert_array_equal(sampled.mask, single.mask)  # MC quantifies the answer, never changes it
        for name, estimate in sampled.volume_estimates.items():
            assert estimate.std > 0 and estimate.interval[0] < estimate.interval[1], (mode, name)
        assert all(u["mutual_information"] > 0 for u in sampled.uncertainty.values()), mode
    heads = predictor.finish(case, predictor.forward([case], 12, "heads")[0], 12, "heads")
    assert all(e.std == 0 for e in heads.volume_estimates.values())  # heads mode does not sample the segmentation


def test_mc_modes_do_less_work_than_full_passes(predictor):
    """For the same T, ``heads`` and ``decoder`` push fewer cases through the image encoder than ``full``, and
    ``heads`` fewer through the decoder; every mode draws all T samples."""
    image, _ = _held_out(2)
    # The case's first 32 voxels left to right: it fits the window, so each pass below is one window.
    case = predictor.prepare((np.asarray(image.dataobj)[:predictor.spec.target_shape[0]], image.affine), name="case")
    assert case.path == "window"
    model = predictor.models[0]
    seen = {"encoder": 0, "decoder": 0}

    def count(name):
        def hook(module, args, output):
            first = args[0]  # the encoder reads an image, the decoder a list of feature maps
            seen[name] += (first[0] if isinstance(first, list) else first).shape[0]
        return hook

    hooks = [model.encoder.register_forward_hook(count("encoder")),
             model.decoder.register_forward_hook(count("decoder"))]
    work = {}
    try:
        for mode in ("full", "decoder", "heads"):
            seen.update(encoder=0, decoder=0)
            result = predictor.forward([case, case], 10, mode)[0]
            assert result.outcome_samples["mmse"].shape == (10,) and result.sample_volumes.shape == (10, 2)
            work[mode] = dict(seen)
    finally:
        for hook in hooks:
            hook.remove()
    mirrors = 1 + len(predictor.settings.mirrors)
    assert work["full"] == {"encoder": 2 * mirrors + 20, "decoder": 2 * mirrors + 20}
    assert work["decoder"] == {"encoder": 2 * mirrors + 2 * mirrors, "decoder": 2 * mirrors + 20}
    assert work["heads"] == {"encoder": 2 * mirrors, "decoder": 2 * mirrors}


def test_probabilities_are_mapped_back_before_the_argmax():
    """nnU-Net's order: a structure one prepared voxel thick, with a soft shoulder, survives the way back to a
    coarser input grid; resampling the argmax label by nearest neighbour would drop it."""
    spec = PreprocessSpec(target_spacing=(1.0, 1.0, 1.0), target_shape=(16, 16, 16))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # input at 2 mm → prepared at 1 mm
    image = np.random.default_rng(0).normal(size=(1, 8, 8, 8)).astype(np.float32)
    geometry = preprocess_case(image, None, affine, spec, keep_whole=True).geometry
    foreground = np.full((16, 16, 16), 0.1, np.float32)
    foreground[8] = 0.9  # the structure: one voxel thick at 1 mm
    foreground[9] = 0.3  # its shoulder, still background by argmax
    probabilities = np.stack([1 - foreground, foreground])
    by_probability = restore_to_original(probabilities, geometry, mode="linear").argmax(0)
    by_label = restore_to_original(probabilities.argmax(0).astype(np.uint8), geometry, mode="nearest")
    assert by_probability[4].all() and not by_label.any()

    predictor = object.__new__(Predictor)  # finish reads only these settings, no network
    predictor.calibration = None
    predictor.structures, predictor.trained_heads, predictor.inference = {1: "structure"}, [], InferenceConfig()
    predictor.largest_component = []
    case = PreparedCase(name="sheet", image=np.zeros((1, 16, 16, 16), np.float32), geometry=geometry, clinical={},
                        window=(16, 16, 16))
    result = ForwardResult(probabilities=probabilities, entropy=np.zeros((16,) * 3, np.float32),
                           mutual_information=np.zeros((16,) * 3, np.float32),
                           sample_volumes=np.array([[float((probabilities.argmax(0) == 1).sum())]]))
    prediction = predictor.finish(case, result, 1, "heads")
    np.testing.assert_array_equal(prediction.mask, by_probability)
    assert prediction.volumes_mm3["structure"] == pytest.approx(64 * 8.0)  # one 8x8 slab of 2 mm voxels


def test_finish_keeps_only_the_largest_component_of_the_structures_post_processing_names():
    """An ensemble's post-processing is applied to the mask, and the volumes are the post-processed mask's."""
    spec = PreprocessSpec(target_spacing=(1.0, 1.0, 1.0), target_shape=(16, 16, 16))
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    geometry = preprocess_case(image, None, np.eye(4), spec, keep_whole=True).geometry
    foreground = np.full((16, 16, 16), 0.1, np.float32)
    foreground[2:6, 2:6, 2:6] = 0.9      # the structure: 64 voxels
    foreground[11:13, 11:13, 11:13] = 0.9  # a stray blob: 8 voxels
    probabilities = np.stack([1 - foreground, foreground])
    predictor = object.__new__(Predictor)  # finish reads only these settings, no network
    predictor.calibration = None
    predictor.structures, predictor.trained_heads, predictor.inference = {1: "structure"}, [], InferenceConfig()
    case = PreparedCase(name="blobs", image=image, geometry=geometry, clinical={}, window=(16, 16, 16))
    result = ForwardResult(probabilities=probabilities, entropy=np.zeros((16,) * 3, np.float32),
                           mutual_information=np.zeros((16,) * 3, np.float32), sample_volumes=np.array([[72.0]]))
    for chosen, voxels in (([], 72), ([1], 64)):
        predictor.largest_component = chosen
        prediction = predictor.finish(case, result, 1, "heads")
        assert (prediction.mask == 1).sum() == voxels and prediction.volumes_mm3["structure"] == voxels, chosen
        assert prediction.mask[2:6, 2:6, 2:6].all()


@pytest.mark.parametrize("volume, mean, std, entropy, reasons", [
    (2000.0, 2000.0, 100.0, 0.3, []),
    (0.0, 0.0, 0.0, 0.0, ["anterior: not found"]),
    (2000.0, 2000.0, 300.0, 0.3, ["anterior: volume SD 15% of its mean > 10%"]),
    (2000.0, 2000.0, 100.0, 0.9, ["anterior: mean entropy 0.90 > 0.75 nats"]),
])
def test_review_flag_rules(volume, mean, std, entropy, reasons):
    from jointray.inference.predictor import CasePrediction, Estimate

    predictor = object.__new__(Predictor)
    predictor.inference, predictor.calibration = InferenceConfig(), None  # uncalibrated: the fixed limits
    prediction = CasePrediction(record=None, name="case", mask=None, affine=np.eye(4),
                                volumes_mm3={"anterior": volume},
                                volume_estimates={"anterior": Estimate(volume, mean, std, (mean - std, mean + std))},
                                uncertainty={"anterior": {"entropy": entropy, "mutual_information": 0.0}})
    assert predictor.review(prediction) == (bool(reasons), reasons)


def test_an_exported_model_predicts_exactly_what_its_checkpoint_does(msd_checkpoint, predictor, tmp_path):
    exported = export_artifact(msd_checkpoint, tmp_path / "model")
    assert sorted(p.name for p in exported.iterdir()) == ["artifact.json", "config.yaml", "metrics.json", "model.pt",
                                                          "schema.json", "spec.json"]
    weights = torch.load(exported / "model.pt", weights_only=True)
    assert set(weights) == set(predictor.models[0].state_dict())  # the weights and nothing else: no optimizer state
    loaded = load_model(exported)
    assert loaded.trained_heads == [] and loaded.spec == predictor.spec  # MSD has no clinical targets
    image, _ = _held_out(3)
    source = (np.asarray(image.dataobj), image.affine)
    served = Predictor(exported, device="cpu")
    a = predictor.forward([predictor.prepare(source)], 1)[0]
    b = served.forward([served.prepare(source)], 1)[0]
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    finished = served.finish(served.prepare(source), b, 1, "heads")
    assert finished.outcomes == {} and finished.outcome_estimates == {}  # untrained heads are never reported
    (exported / "model.pt").write_bytes((exported / "model.pt").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="model.pt"):
        load_model(exported)


def _nifti_bytes(array: np.ndarray, compress: bool) -> bytes:
    data = nib.Nifti1Image(array, np.eye(4)).to_bytes()
    return gzip.compress(data) if compress else data


BAD_UPLOADS = [
    (b"", "empty upload"),
    (b"hello, this is not an image", "neither a NIfTI image"),
    (_nifti_bytes(np.ones((8, 8, 8), np.float32), True)[:60], "corrupt gzip|truncated"),
    (_nifti_bytes(np.ones((8, 8), np.float32), False), "not a 3D volume"),
    (_nifti_bytes(np.ones((8, 8, 8, 3), np.float32), False), "not a 3D volume"),
    (_nifti_bytes(np.full((8, 8, 8), np.nan, np.float32), True), "non-finite"),
    (_nifti_bytes(np.ones((8, 8, 8), np.float32), True), "constant"),
    (zip_bytes({}), "no DICOM|no image"),
    (zip_bytes({"../../etc/passwd": b"x"}), "points outside the archive"),
    (zip_bytes({"/abs/slice.dcm": b"x"}), "points outside the archive"),
    (b"\x00" * 128 + b"DICM" + b"\x00" * 64, "a single DICOM file"),
]


@pytest.mark.parametrize("data, message", BAD_UPLOADS)
def test_bad_uploads_are_refused_with_the_reason(data, message):
    preparer = CasePreparer(PreprocessSpec(target_shape=(16, 16, 16)), ClinicalSchema(), {0, 1, 2}, 10**7)
    with pytest.raises(InputError, match=message) as caught:
        preparer.upload(data, "upload.bin", max_bytes=10**6)
    assert caught.value.path == "upload.bin" and "jointray-upload-" not in caught.value.reason


def test_a_header_claiming_billions_of_voxels_is_refused_before_reading():
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.float32)
    data = header.binaryblock + b"\x00" * 4 + b"\x00" * 1000  # a header and a sliver of data
    preparer = CasePreparer(PreprocessSpec(), ClinicalSchema(), {0, 1, 2}, 64 * 1024**2)
    with pytest.raises(InputError, match="64,000,000,000 voxels"):
        preparer.upload(data, "huge.nii")


def test_a_zip_over_the_size_limit_is_refused_before_inflating():
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", b"\x00" * 5_000_000)  # 5 MB of zeros deflate to a few kB
    preparer = CasePreparer(PreprocessSpec(), ClinicalSchema(), {0, 1, 2}, 10**7)
    assert len(bomb.getvalue()) < 50_000
    with pytest.raises(InputError, match="5,000,000 bytes uncompressed"):
        preparer.upload(bomb.getvalue(), "bomb.zip", max_bytes=1_000_000)


SCHEMA = ClinicalSchema(numeric=[NumericFeature(name="age", mean=70.0, std=8.0)],
                        categorical=[CategoricalFeature(name="sex", categories=["F", "M"])])


@pytest.mark.parametrize("values, message", [
    ({"agee": 70}, r"unknown clinical key\(s\) \['agee'\]"),
    ({"age": "old"}, "is not a number"),
    ({"age": True}, "is not a number"),
    ({"age": float("inf")}, "not finite"),
    ({"age": 1000}, r"outside \[-10, 150\]"),
    ({"sex": ["F"]}, "not a category"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_clinical_records_are_refused(values, message):
    with pytest.raises(InputError, match=message):
        check_clinical(values, SCHEMA, "request")


def test_good_clinical_records_pass_with_missing_values():
    assert check_clinical({"age": 71, "sex": None}, SCHEMA, "r") == {"age": 71.0}
    assert check_clinical({"sex": "M"}, SCHEMA, "r") == {"sex": "M"}


def test_inference_precision_is_chosen_for_the_device_not_inherited(msd_checkpoint, predictor):
    # The MSD config trains in bf16; on a CPU inference runs fp32 unless asked otherwise.
    assert predictor.config.train.precision == "bf16"
    assert predictor.autocast is contextlib.nullcontext
