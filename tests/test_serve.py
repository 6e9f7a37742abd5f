"""The Serve application over real HTTP on 127.0.0.1: one server per module, real MSD and DICOM inputs."""

import base64
import concurrent.futures
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
import yaml
from conftest import REPO, msd_held_out, shared_data, zip_bytes
from matplotlib.image import imread
from typer.testing import CliRunner

from jointray.cli import app as cli
from jointray.data.volumes import read_volume
from jointray.inference.predictor import Predictor
from jointray.metrics import segmentation_metrics
from jointray.serve.app import free_port

KEY_ENV = "JOINTRAY_TEST_API_KEY"
UPLOAD_LIMIT_MB = 4
STRUCTURES = {1: "anterior", 2: "posterior"}
OVERRIDES = [f"serve.api_key_env={KEY_ENV}", f"serve.max_upload_mb={UPLOAD_LIMIT_MB}", "serve.batch_wait_timeout_s=0.5",
             "inference.mc_samples=6", "inference.max_mc_samples=50"]



def _deploy(checkpoint: Path, port: int, max_batch_size: int) -> None:
    """Deploy configs/serve.yaml as `serve run configs/serve.yaml` does (a declarative config, so that a change of
    user_config alone reconfigures the running replicas), with this module's checkpoint and overrides."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"] = {"checkpoint": str(checkpoint), "overrides": OVERRIDES}
    (model,) = [d for d in app["deployments"] if d["name"] == "ModelServer"]
    model["user_config"]["max_batch_size"] = max_batch_size
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


@pytest.fixture(scope="module")
def server(msd_checkpoint):
    from ray import serve

    from jointray.serve.app import wait_until_healthy

    port = free_port(0)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _deploy(msd_checkpoint, port, max_batch_size=4)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url)
    yield url
    serve.shutdown()  # frees the replicas' CPUs for the other modules


def _headers() -> dict[str, str]:
    return {"X-API-Key": os.environ[KEY_ENV]}


def _held_out(index: int) -> tuple[Path, Path]:
    return msd_held_out(20 + index)


def _post(url: str, route: str, data: bytes, name: str = "case.nii.gz", params=None, form=None, headers=None):
    return requests.post(f"{url}{route}", params=params, files={"file": (name, data)}, data=form or {},
                         headers=_headers() if headers is None else headers, timeout=300)


def _dicom_zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    return buffer.getvalue()


def test_predict_answers_with_intervals_and_the_mask_scores_as_evaluate_does(server, msd_checkpoint):
    image_path, label_path = _held_out(0)
    data = image_path.read_bytes()
    response = _post(server, "/v1/predict", data, image_path.name, params={"mask": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    # 35 voxels left to right, wider than the MSD window (32): located by sliding windows, then one window.
    assert body["path"] == "sliding_window" and body["mc"] == {"samples": 6, "mode": "decoder", "interval": 0.9}
    assert body["outcomes"] == {}  # an MSD model never saw clinical targets: no head is reported
    for name in STRUCTURES.values():
        volume = body["structures"][name]["volume_mm3"]
        assert volume["mask"] > 0 and volume["std"] > 0 and volume["interval"][0] < volume["interval"][1]
        assert body["structures"][name]["uncertainty"]["mutual_information"] > 0
    assert body["needs_review"] == bool(body["review"]["reasons"])
    assert body["review"]["entropy_threshold"] == 0.75 and body["review"]["volume_cv_threshold"] == 0.1
    assert set(body["timings_s"]) == {"read_validate", "preprocess", "forward", "finish", "total"}

    mask_response = _post(server, "/v1/predict/mask", data, image_path.name)
    assert mask_response.status_code == 200 and mask_response.headers["content-type"] == "application/gzip"
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(mask_response.content))
    image = nib.load(image_path)
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-5)
    assert mask.get_data_dtype() == np.uint8
    served = np.asarray(mask.dataobj)
    inline = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["mask_nii_gz_base64"])))
    np.testing.assert_array_equal(np.asarray(inline.dataobj), served)
    # What `jointray evaluate` gives for this case (the same Predictor path, one deterministic pass).
    from jointray.data.records import CaseRecord

    evaluated = Predictor(msd_checkpoint, device="cpu").predict(
        CaseRecord(subject_id="case", images=[str(image_path)], label=str(label_path)))
    label = np.asarray(nib.load(label_path).dataobj).astype(np.uint8)
    seg = segmentation_metrics(torch.from_numpy(served[None]), torch.from_numpy(label[None]), STRUCTURES, (1, 1, 1))
    for name in STRUCTURES.values():
        assert float(seg[f"dice/{name}"][0]) == pytest.approx(evaluated.metrics[f"dice/{name}"], abs=1e-9)

    with_entropy = _post(server, "/v1/predict/mask", data, image_path.name, params={"uncertainty": "true"})
    archive = zipfile.ZipFile(io.BytesIO(with_entropy.content))
    stem = image_path.name.removesuffix(".nii.gz")
    assert sorted(archive.namelist()) == [f"{stem}_entropy.nii.gz", f"{stem}_mask.nii.gz"]
    entropy = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read(f"{stem}_entropy.nii.gz")))
    values = np.asarray(entropy.dataobj)
    assert entropy.shape == image.shape and values.min() >= 0 and values.max() <= np.log(3) + 1e-6


def test_a_real_dicom_series_gets_its_mask_on_the_series_grid(server):
    series = shared_data("dicom_hippocrop") / "study2"
    response = _post(server, "/v1/predict/mask", _dicom_zip(series), "study2.zip")
    assert response.status_code == 200, response.text
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    volume = read_volume(series, 10**9)
    assert mask.shape == volume.array.shape[:3] and np.allclose(mask.affine, volume.affine, atol=1e-4)
    assert np.asarray(mask.dataobj).any()


def test_concurrent_requests_are_batched(server):
    from ray import serve

    image_path, _ = _held_out(1)
    data = image_path.read_bytes()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post(server, "/v1/predict", data, form={"mc_samples": "1"}), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    handle = serve.get_deployment_handle("ModelServer", app_name="jointray")
    sizes = handle.batch_sizes.remote().result()
    assert max(sizes) > 1, sizes


def test_batch_size_changes_without_a_restart(server, msd_checkpoint):
    from ray import serve

    from jointray.serve.app import APP_NAME

    handle = serve.get_deployment_handle("ModelServer", app_name=APP_NAME)
    before = handle.batch_sizes.remote().result()
    _deploy(msd_checkpoint, int(server.rsplit(":", 1)[1]), max_batch_size=2)  # only user_config differs
    deadline = time.monotonic() + 60
    while serve.status().applications[APP_NAME].status != "RUNNING" or handle.batch_sizes.remote().result() != before:
        assert time.monotonic() < deadline, "the application did not settle after the new user_config"
        time.sleep(0.5)
    data = _held_out(1)[0].read_bytes()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _post(server, "/v1/predict", data, form={"mc_samples": "1"}), range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    after = handle.batch_sizes.remote().result()
    assert after[: len(before)] == before  # the same replica (reconfigured, not replaced): its history is kept
    assert len(after) > len(before) and max(after[len(before):]) == 2, after


def _bad_requests(series_zip: bytes):
    nifti = lambda a: gzip.compress(nib.Nifti1Image(a, np.eye(4)).to_bytes())  # noqa: E731
    good = _held_out(2)[0].read_bytes()
    two_series = io.BytesIO()
    with zipfile.ZipFile(two_series, "w") as archive:
        for folder in ("study1", "study2"):
            for path in sorted((shared_data("dicom_hippocrop") / folder).iterdir()):
                archive.write(path, f"{folder}/{path.name}")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", b"\x00" * (UPLOAD_LIMIT_MB + 1) * 1024 * 1024)
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    return [
        ("not NIfTI", {"data": b"GIF89a not a medical image"}, 422, "neither a NIfTI image"),
        ("truncated gzip", {"data": good[: len(good) // 3]}, 422, "truncated or corrupt"),
        ("2-D", {"data": nifti(np.ones((16, 16), np.float32))}, 422, "not a 3D volume"),
        ("4-D", {"data": nifti(np.random.rand(8, 8, 8, 2).astype(np.float32))}, 422, "not a 3D volume"),
        ("NaN voxels", {"data": nifti(np.full((8, 8, 8), np.nan, np.float32))}, 422, "non-finite"),
        ("billions of voxels", {"data": header.binaryblock + b"\x00" * 1000}, 422, "27,000,000,000 voxels"),
        ("empty body", {"data": b""}, 422, "empty upload"),
        ("zip without a series", {"data": zip_bytes({"notes.txt": b"hello"})}, 422, "no DICOM image files found"),
        ("two series", {"data": two_series.getvalue()}, 422, "mixed series: 2 series found"),
        ("path traversal", {"data": zip_bytes({"../evil.dcm": series_zip[:100]})}, 422, "points outside the archive"),
        ("zip bomb", {"data": bomb.getvalue(), "name": "bomb.zip"}, 422, "uncompressed, over the limit"),
        ("clinical not JSON", {"data": good, "form": {"clinical": "{age: 71"}}, 422, "not valid JSON"),
        ("unknown clinical key", {"data": good, "form": {"clinical": '{"age": 71}'}}, 422, "unknown clinical key"),
        ("clinical not an object", {"data": good, "form": {"clinical": "[1, 2]"}}, 422, "JSON object"),
        ("mc_samples 0", {"data": good, "form": {"mc_samples": "0"}}, 422, "mc_samples=0"),
        ("mc_samples 10^6", {"data": good, "params": {"mc_samples": "1000000"}}, 422, "from 1 to 50"),
        ("mc_samples text", {"data": good, "form": {"mc_samples": "many"}}, 422, "not an integer"),
        ("mc_mode unknown", {"data": good, "form": {"mc_mode": "everything"}}, 422, "mc_mode='everything'"),
        ("over-size upload", {"data": b"\x00" * (UPLOAD_LIMIT_MB * 1024 * 1024 + 10)}, 413, "over the limit"),
    ]


def test_every_bad_input_gets_its_4xx_and_the_server_keeps_answering(server):
    series_zip = _dicom_zip(shared_data("dicom_hippocrop") / "study1")
    failures = []
    for what, request, status, message in _bad_requests(series_zip):
        response = _post(server, "/v1/predict", request["data"], request.get("name", "upload.nii.gz"),
                         params=request.get("params"), form=request.get("form"))
        error = response.json().get("error", {}) if response.headers.get("content-type") == "application/json" else {}
        if response.status_code != status or message not in error.get("message", ""):
            failures.append((what, response.status_code, response.text[:300]))
    assert not failures, failures
    # HTTP-level mistakes: no file field, not multipart, a body that streams past the limit without a length.
    no_file = requests.post(f"{server}/v1/predict", data={"clinical": "{}"}, headers=_headers(), timeout=60)
    assert no_file.status_code == 415 and "multipart/form-data" in no_file.text, no_file.text
    multipart_without_file = requests.post(f"{server}/v1/predict", files={"other": ("x", b"1")}, headers=_headers(),
                                           timeout=60)
    assert multipart_without_file.status_code == 422 and "missing form field 'file'" in multipart_without_file.text
    json_body = requests.post(f"{server}/v1/predict", json={"file": "x"}, headers=_headers(), timeout=60)
    assert json_body.status_code == 415

    def chunks():
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.nii\"\r\n\r\n"
        yield boundary
        for _ in range(UPLOAD_LIMIT_MB + 1):
            yield b"\x00" * 1024 * 1024

    streamed = requests.post(f"{server}/v1/predict", data=chunks(), timeout=60,
                             headers=_headers() | {"Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413, streamed.text
    good = _post(server, "/v1/predict", _held_out(2)[0].read_bytes())
    assert good.status_code == 200, good.text


def test_api_key_is_required_and_never_logged_nor_are_patient_names(server):
    import ray

    image = _held_out(3)[0].read_bytes()
    assert _post(server, "/v1/predict", image, headers={}).status_code == 401
    assert _post(server, "/v1/predict", image, headers={"X-API-Key": "wrong"}).status_code == 401
    assert requests.get(f"{server}/v1/model", timeout=30).status_code == 401
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200  # probes need no key
    bearer = requests.get(f"{server}/v1/model", headers={"Authorization": f"Bearer {os.environ[KEY_ENV]}"}, timeout=30)
    assert bearer.status_code == 200 and bearer.json()["api_key_required"] is True
    series = shared_data("dicom_hippocrop") / "study1"
    assert _post(server, "/v1/predict", _dicom_zip(series), "study1.zip").status_code == 200
    import pydicom

    header = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    secrets_ = [os.environ[KEY_ENV], str(header.PatientName), str(header.PatientID)]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    texts = [p.read_text(errors="ignore") for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    assert any("POST /v1/predict" in t for t in texts)  # the access log is there, and it is clean
    for secret in secrets_:
        assert not any(secret in t for t in texts), secret


def test_model_info_docs_and_metrics(server):
    info = requests.get(f"{server}/v1/model", headers=_headers(), timeout=30).json()
    assert info["variant"] == "v2" and info["trained_heads"] == [] and info["structures"] == ["anterior", "posterior"]
    assert info["mc"]["samples"] == 6 and info["max_upload_bytes"] == UPLOAD_LIMIT_MB * 1024 * 1024
    assert len(info["version"]) == 12 and len(info["spec_digest"]) == 16
    docs = requests.get(f"{server}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(f"{server}/openapi.json", timeout=30).json()
    assert {"/v1/predict", "/v1/predict/mask", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    metrics = requests.get(f"{server}/metrics", timeout=30).text
    assert 'jointray_requests_total{route="/v1/model",status="200"}' in metrics
    assert "jointray_request_seconds_bucket" in metrics


def test_the_cli_client_writes_masks_beside_the_inputs(server, tmp_path):
    image_path, _ = _held_out(4)
    series = shared_data("dicom_hippocrop") / "study3"
    result = CliRunner().invoke(cli, ["predict", str(image_path), str(series), "--url", server, "--out", str(tmp_path),
                                      "--api-key-env", KEY_ENV, "--mc-samples", "4"])
    assert result.exit_code == 0, result.output
    stem = image_path.name.removesuffix(".nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem}_mask.nii.gz", "study3_mask.nii.gz"])
    assert nib.load(tmp_path / f"{stem}_mask.nii.gz").shape == nib.load(image_path).shape
    assert "anterior" in result.output and "window" in result.output


def test_a_patient_report_comes_from_the_server_and_from_the_model_in_process(server, msd_checkpoint, tmp_path):
    image_path, _ = _held_out(4)
    stem = image_path.name.removesuffix(".nii.gz")
    common = [str(image_path), "--mc-samples", "4", "--mc-mode", "full", "--report"]
    for where, args in (("remote", ["--url", server, "--api-key-env", KEY_ENV]),
                        ("local", ["--checkpoint", str(msd_checkpoint)])):
        result = CliRunner().invoke(cli, ["predict", *common, *args, "--out", str(tmp_path / where)])
        assert result.exit_code == 0, result.output
        page = tmp_path / where / f"{stem}_report.html"
        assert "report for" in result.output and f"{stem}_report.html" in result.output.replace("\n", "")
        html = page.read_text()
        assert re.findall(r'<section id="([^"]+)"', html) == ["review", "segmentation", "explanations", "model"]
        images = re.findall(r'src="data:image/png;base64,([^"]+)" width="(\d+)" height="(\d+)"', html)
        assert len(images) == 4  # the mask and the uncertainty views, an activation map per structure
        for data, width, height in images:
            png = base64.b64decode(data)
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and imread(io.BytesIO(png)).shape[:2] == (int(height), int(width))
        assert "anterior" in html and "posterior" in html and "version" in html and "mean Dice" in html
        assert "research software" in html and "not a diagnosis" in html
        if shutil.which("chromium") or os.environ.get("CI") == "true":
            assert (tmp_path / where / f"{stem}_report.pdf").read_bytes()[:5] == b"%PDF-"


def test_the_web_viewer_draws_the_overlay_in_headless_chromium(server, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium
    driver.get(f"{server}/")
    wait = WebDriverWait(driver, 120)
    state = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
    wait.until(lambda d: state(d) == "locked")  # the server wants a key before it describes the model
    driver.find_element(By.ID, "api-key").send_keys(os.environ[KEY_ENV], Keys.TAB)
    wait.until(lambda d: state(d) == "ready")
    driver.find_element(By.ID, "file").send_keys(str(_held_out(5)[0]))
    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: state(d) in ("done", "error"))
    assert state(driver) == "done", driver.find_element(By.ID, "error").text
    artifacts = REPO / "runs" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(artifacts / "viewer.png"))
    assert "anterior" in driver.find_element(By.ID, "results").text.lower()
    badge = driver.find_element(By.ID, "review").text
    assert badge.startswith(("✓ no review flag", "⚠ needs review")), badge
    assert "volume SD threshold 10 % of the mean" in badge and "entropy threshold 0.75 nats" in badge, badge
    overlay = driver.execute_script("""
        const counts = {};
        for (const id of ['axial', 'coronal', 'sagittal']) {
          const c = document.getElementById(id), px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let coloured = 0;
          for (let i = 0; i < px.length; i += 4) {
            if (Math.abs(px[i] - px[i + 1]) > 40 || Math.abs(px[i + 1] - px[i + 2]) > 40) coloured++;
          }
          counts[id] = coloured;
        }
        return counts;""")
    assert all(n > 20 for n in overlay.values()), overlay  # grey image plus coloured mask pixels in every view


def test_serve_build_agrees_with_the_config_file(msd_checkpoint, tmp_path):
    """``serve build`` of the application the code builds gives the deployments configs/serve.yaml declares."""
    module = tmp_path / "built_app.py"
    module.write_text("from jointray.serve.app import AppArgs, build_app\n"
                      f"app = build_app(AppArgs(checkpoint={str(msd_checkpoint)!r}))\n")
    out = tmp_path / "built.yaml"
    subprocess.run([str(Path(sys.executable).parent / "serve"), "build", "built_app:app", "--app-dir", str(tmp_path),
                    "-o", str(out)], check=True, capture_output=True, timeout=120)
    built = yaml.safe_load(out.read_text())
    declared = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    assert declared["http_options"]["host"] == "127.0.0.1"
    (app,) = declared["applications"]
    assert app["import_path"] == "jointray.serve.app:build_app"
    keys = ("name", "max_ongoing_requests", "num_replicas", "user_config", "ray_actor_options")
    as_built = {d["name"]: {k: d.get(k) for k in keys} for d in built["applications"][0]["deployments"]}
    as_declared = {d["name"]: {k: d.get(k) for k in keys} for d in app["deployments"]}
    assert as_declared == as_built


def test_the_server_serves_an_exported_onnx_model(server, msd_onnx):
    """Last in this module: it redeploys the application with the ONNX export of the same checkpoint."""
    from ray import serve

    from jointray.artifacts import load_model
    from jointray.serve.app import APP_NAME

    version = load_model(msd_onnx).version
    _deploy(msd_onnx, int(server.rsplit(":", 1)[1]), max_batch_size=4)
    deadline = time.monotonic() + 120
    while True:
        running = serve.status().applications[APP_NAME].status == "RUNNING"
        if running and requests.get(f"{server}/v1/model", headers=_headers(), timeout=30).json()["version"] == version:
            break
        assert time.monotonic() < deadline, "the application did not switch to the exported model"
        time.sleep(0.5)
    image_path, _ = _held_out(5)
    response = _post(server, "/v1/predict", image_path.read_bytes(), image_path.name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mc"] == {"samples": 6, "mode": "full", "interval": 0.9}  # a graph samples its whole network
    for name in STRUCTURES.values():
        volume = body["structures"][name]["volume_mm3"]
        assert volume["mask"] > 0 and volume["std"] > 0
    refused = _post(server, "/v1/predict", image_path.read_bytes(), image_path.name, form={"mc_mode": "decoder"})
    assert refused.status_code == 422 and "whole network" in refused.text
