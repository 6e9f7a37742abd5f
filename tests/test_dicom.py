"""Tests for :mod:`jointray.data.dicom` on real cropped MR series, with SimpleITK (GDCM) as the oracle.

The shared studies are axial, 1 mm isotropic and start at the origin, which cannot tell a swapped
PixelSpacing or a wrong direction apart from a right one; one test therefore rewrites a copy into an
oblique, anisotropic, reversed, rescaled series and compares that with SimpleITK too.
"""

from __future__ import annotations

import os
import random
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # test oracle only (dev dependency), not used by jointray
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from conftest import shared_data
from jointray.data import dicom
from jointray.data.dicom import read_dicom_series
from jointray.data.errors import InputError


MAX_VOXELS = 10_000_000
#: (columns, rows, slices) of each shared study.
SHAPES = {"study1": (35, 51, 32), "study2": (36, 48, 35), "study3": (34, 50, 40)}


@pytest.fixture(scope="module")
def hippocrop() -> Path:
    return shared_data("dicom_hippocrop")


@pytest.fixture
def study1(hippocrop: Path, tmp_path: Path) -> Path:
    """A writable copy of study1."""
    return Path(shutil.copytree(hippocrop / "study1", tmp_path / "study1"))


def _sitk_read(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SimpleITK's (volume as (x, y, z), RAS affine, spacing) for a flat folder of one series."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    spacing = np.array(image.GetSpacing())
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * spacing  # column c scaled by spacing[c]
    lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, spacing


def _edit(file: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(file)
    change(ds)
    ds.save_as(file)


def _file_at(folder: Path, z: float) -> Path:
    """The file of the axial slice at height ``z`` (mm)."""
    (found,) = [f for f in folder.glob("*.dcm") if _position(f)[2] == z]
    return found


def _position(file: Path) -> np.ndarray:
    return np.array(pydicom.dcmread(file, stop_before_pixels=True).ImagePositionPatient, dtype=float)


def _reason(path: Path, max_voxels: int = MAX_VOXELS) -> str:
    with pytest.raises(InputError) as info:
        read_dicom_series(path, max_voxels)
    return info.value.reason


# --- real data against SimpleITK -------------------------------------------------------------------


@pytest.mark.parametrize("study", sorted(SHAPES))
def test_volume_and_affine_match_simpleitk(hippocrop: Path, study: str) -> None:
    volume, affine = read_dicom_series(hippocrop / study, MAX_VOXELS)
    expected_volume, expected_affine, _ = _sitk_read(hippocrop / study)
    assert volume.shape == SHAPES[study]
    assert volume.dtype == np.float32 and affine.dtype == np.float64
    np.testing.assert_array_equal(volume, expected_volume)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-6)


@pytest.mark.parametrize("study", sorted(SHAPES))
def test_spacing_from_positions_matches_simpleitk(hippocrop: Path, study: str) -> None:
    _, affine = read_dicom_series(hippocrop / study, MAX_VOXELS)
    _, _, expected_spacing = _sitk_read(hippocrop / study)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), expected_spacing, atol=1e-6)
    np.testing.assert_allclose(expected_spacing, [1.0, 1.0, 1.0])


def test_voxel_convention_is_pixel_array_transposed(hippocrop: Path) -> None:
    volume, affine = read_dicom_series(hippocrop / "study1", MAX_VOXELS)
    top = pydicom.dcmread(_file_at(hippocrop / "study1", 32.0))  # highest slice: last along +z
    np.testing.assert_array_equal(volume[:, :, -1], top.pixel_array.T)
    # Identity orientation in LPS: columns go to patient Left, rows to Posterior, slices Superior.
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    np.testing.assert_allclose(affine[:3, 3], [0.0, 0.0, 1.0])  # IPP of the lowest slice, LPS (0,0,1)


def test_nifti_round_trip(hippocrop: Path, tmp_path: Path) -> None:
    volume, affine = read_dicom_series(hippocrop / "study2", MAX_VOXELS)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "study2.nii.gz")
    back = nib.load(tmp_path / "study2.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), volume)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    assert nib.aff2axcodes(back.affine) == ("L", "P", "S")


# --- order, containers, ignored files ---------------------------------------------------------------


def test_order_comes_from_positions_not_names_or_instance_numbers(hippocrop: Path, tmp_path: Path) -> None:
    source = hippocrop / "study3"
    expected = read_dicom_series(source, MAX_VOXELS)
    files = sorted(source.glob("*.dcm"))
    rng = random.Random(0)
    names = [f"{rng.getrandbits(64):016x}.dcm" for _ in files]
    numbers = rng.sample(range(1, len(files) + 1), len(files))
    shuffled = tmp_path / "shuffled"
    for n, (file, name, number) in enumerate(zip(files, names, numbers)):
        target = shuffled / f"sub{n % 3}" / name  # sub-folders: the folder is searched recursively
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target)
        _edit(target, lambda ds, number=number: setattr(ds, "InstanceNumber", number))
    heights = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in sorted(shuffled.rglob("*.dcm"))]
    assert heights != sorted(heights)  # the scramble really scrambled the file order

    volume, affine = read_dicom_series(shuffled, MAX_VOXELS)
    np.testing.assert_array_equal(volume, expected[0])
    np.testing.assert_array_equal(affine, expected[1])


def test_zip_gives_the_same_result(hippocrop: Path, tmp_path: Path) -> None:
    expected = read_dicom_series(hippocrop / "study1", MAX_VOXELS)
    archive = tmp_path / "study1.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted((hippocrop / "study1").glob("*.dcm")):
            zf.write(file, f"study1/{file.name}")
            zf.writestr(f"__MACOSX/study1/._{file.name}", b"\x00\x05\x16\x07 AppleDouble junk")
    volume, affine = read_dicom_series(archive, MAX_VOXELS)
    np.testing.assert_array_equal(volume, expected[0])
    np.testing.assert_array_equal(affine, expected[1])


def _write_dicomdir(path: Path) -> None:
    """A minimal non-image DICOM object, as a DICOMDIR is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.FileSetID = "HIPPO"
    ds.save_as(path, enforce_file_format=True)


def test_non_dicom_files_are_ignored(hippocrop: Path, study1: Path) -> None:
    expected = read_dicom_series(hippocrop / "study1", MAX_VOXELS)
    (study1 / "notes.txt").write_text("acquired on the old scanner\n")
    (study1 / ".DS_Store").write_bytes(os.urandom(300))
    # A hidden, broken DICOM file: reading it would raise, so it must not be read at all.
    (study1 / "._1.dcm").write_bytes((study1 / "1.dcm").read_bytes()[:600])
    _write_dicomdir(study1 / "DICOMDIR")
    volume, affine = read_dicom_series(study1, MAX_VOXELS)
    np.testing.assert_array_equal(volume, expected[0])
    np.testing.assert_array_equal(affine, expected[1])


def test_oblique_anisotropic_rescaled_series_matches_simpleitk(study1: Path) -> None:
    """Every geometry term differs from the identity, so a swapped spacing or sign shows up."""
    original, _ = read_dicom_series(study1, MAX_VOXELS)
    a, b = np.deg2rad(30.0), np.deg2rad(-20.0)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]
    )
    orientation = np.round(np.concatenate([rotation[:, 0], rotation[:, 1]]), 6)
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([-12.5, 30.25, 7.0])

    def rewrite(ds: pydicom.Dataset) -> None:
        z = float(ds.ImagePositionPatient[2])  # 1..32; the new stack runs the other way
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + (32.0 - z) * 1.7 * normal]
        ds.PixelSpacing = ["0.8", "0.6"]  # between rows, between columns
        ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-10"

    for file in study1.glob("*.dcm"):
        _edit(file, rewrite)

    volume, affine = read_dicom_series(study1, MAX_VOXELS)
    expected_volume, expected_affine, expected_spacing = _sitk_read(study1)
    np.testing.assert_allclose(volume, expected_volume, rtol=0, atol=1e-4)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), expected_spacing, atol=1e-4)
    np.testing.assert_allclose(expected_spacing, [0.6, 0.8, 1.7], atol=1e-4)
    np.testing.assert_array_equal(volume, original[:, :, ::-1] * np.float32(2.5) - np.float32(10))


def test_gantry_tilt_is_kept_as_a_shear(study1: Path) -> None:
    """Slices shifted in-plane as they go up (a tilted CT gantry): voxel (0, 0, k) must land on IPP_k."""
    def tilt(ds: pydicom.Dataset) -> None:
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = [0.25 * z, 0, z]

    for file in study1.glob("*.dcm"):
        _edit(file, tilt)
    _, affine = read_dicom_series(study1, MAX_VOXELS)
    positions = sorted((_position(f) for f in study1.glob("*.dcm")), key=lambda p: p[2])
    for k, lps in enumerate(positions):
        np.testing.assert_allclose(affine @ [0, 0, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-9)


# --- refused inputs ---------------------------------------------------------------------------------


def test_mixed_series_are_refused(hippocrop: Path, tmp_path: Path) -> None:
    shutil.copytree(hippocrop / "study1", tmp_path / "mixed" / "a")
    shutil.copytree(hippocrop / "study2", tmp_path / "mixed" / "b")
    reason = _reason(tmp_path / "mixed")
    assert reason.startswith("mixed series: 2 series found (")
    assert reason.endswith("; give one series per input")
    for study, count in (("study1", 32), ("study2", 35)):
        uid = pydicom.dcmread(next((hippocrop / study).glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
        assert f"'HippoCrop' with {count} files, UID {uid}" in reason


def test_missing_middle_slice_is_refused(study1: Path) -> None:
    _file_at(study1, 16.0).unlink()
    assert _reason(study1) == "incomplete series: gap of 2 mm between slices at positions 15 and 17 (expected ~1 mm)"


def test_duplicate_position_is_refused(study1: Path) -> None:
    copy = study1 / "5_again.dcm"
    shutil.copy(_file_at(study1, 5.0), copy)
    _edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()))
    reason = _reason(study1)
    assert reason.startswith("duplicate slice position: ")
    assert reason.endswith("are both at 5 mm along the slice normal")
    assert "5_again.dcm" in reason


def test_truncated_pixel_data_is_refused(study1: Path) -> None:
    file = _file_at(study1, 20.0)
    file.write_bytes(file.read_bytes()[:-100])
    reason = _reason(study1)
    assert reason.startswith(f"corrupt DICOM file {file.name}: cannot read pixel data")


def test_truncated_header_is_refused(study1: Path) -> None:
    # pydicom reads a header cut short without complaint; it must not pass for a non-image file.
    file = _file_at(study1, 32.0)
    file.write_bytes(file.read_bytes()[:600])
    assert _reason(study1) == f"corrupt DICOM file {file.name}: image header without Rows/Columns (truncated?)"


def test_voxel_limit_is_exact(hippocrop: Path) -> None:
    voxels = 35 * 51 * 32
    assert read_dicom_series(hippocrop / "study1", voxels)[0].size == voxels
    assert _reason(hippocrop / "study1", voxels - 1) == (
        f"headers claim {voxels:,} voxels (32 slices of 51x35), over the limit of {voxels - 1:,} (data.max_voxels)"
    )


def test_huge_header_is_refused_before_pixel_data(study1: Path) -> None:
    def claim_huge(ds: pydicom.Dataset) -> None:
        ds.Rows = ds.Columns = 60_000

    for file in study1.glob("*.dcm"):
        _edit(file, claim_huge)
        file.write_bytes(file.read_bytes()[:-1000])  # pixel data that could not be read anyway
    reason = _reason(study1)
    assert reason.startswith(f"headers claim {60_000 * 60_000 * 32:,} voxels (32 slices of 60000x60000)")


def _set(keyword: str, value: object) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set("ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), "inconsistent ImageOrientationPatient: "),
        (_set("PixelSpacing", [1, 1.2]), "inconsistent PixelSpacing: "),
        (_set("Rows", 52), "inconsistent image size: "),
        (lambda ds: delattr(ds, "ImagePositionPatient"), "missing geometry tag(s) ImagePositionPatient in 16.dcm"),
        (_set("NumberOfFrames", 2), "multi-frame DICOM is not supported: 16.dcm holds 2 frames"),
        (_set("SamplesPerPixel", 3), "not a grayscale image: 16.dcm has SamplesPerPixel=3"),
        (_set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), "malformed geometry in 16.dcm: "),
        (_set("ImagePositionPatient", [0, 0, 16.3]), "non-uniform slice spacing: 16.dcm is 0.3 mm away"),
        (_set("SeriesInstanceUID", generate_uid()), "mixed series: 2 series found"),
    ],
    ids=["orientation", "spacing", "rows", "no-position", "multiframe", "rgb", "non-orthogonal", "uneven", "series"],
)
def test_bad_header_in_one_file_is_refused(
    study1: Path, change: Callable[[pydicom.Dataset], None], expected: str
) -> None:
    file = _file_at(study1, 16.0)
    assert file.name == "16.dcm"
    _edit(file, change)
    assert _reason(study1).startswith(expected)


def test_single_slice_is_refused(hippocrop: Path, tmp_path: Path) -> None:
    shutil.copy(hippocrop / "study1" / "1.dcm", tmp_path / "1.dcm")
    assert _reason(tmp_path).startswith("fewer than 2 slices (1 found)")


def test_folders_without_dicom_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert _reason(tmp_path / "empty") == "no DICOM image files found (0 files looked at)"
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("no images here")
    assert _reason(tmp_path / "text") == "no DICOM image files found (1 files looked at)"


def test_other_paths_are_refused(tmp_path: Path) -> None:
    (tmp_path / "scan.nii").write_bytes(b"\x00" * 400)
    assert _reason(tmp_path / "scan.nii").startswith("not a DICOM series: expected a folder or a .zip")
    (tmp_path / "broken.zip").write_bytes(os.urandom(500))
    assert _reason(tmp_path / "broken.zip").startswith("unreadable zip file (BadZipFile")


def test_oversized_zip_member_is_refused(hippocrop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "study1.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(hippocrop / "study1" / "1.dcm", "1.dcm")
    size = (hippocrop / "study1" / "1.dcm").stat().st_size
    monkeypatch.setattr(dicom, "MAX_ZIP_MEMBER_BYTES", size - 1)
    assert _reason(archive) == (
        f"zip member 1.dcm is {size:,} bytes uncompressed, over the limit of {size - 1:,} bytes for one file"
    )
