"""``jointray predict``: the same answers from a running server (HTTP) or from a model run in-process."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import requests

from jointray.data.errors import InputError
from jointray.inference.answers import answer, mask_image, nifti_gz, report_page
from jointray.inference.predictor import Predictor

#: Seconds a client waits for one answer (a whole-head scan with many MC samples takes a while on a CPU).
REQUEST_TIMEOUT_S = 600


def mask_path(source: Path, out: Path | None) -> Path:
    """``<name>_mask.nii.gz`` beside ``source`` (a file, a DICOM folder or a zip), or in ``out``."""
    stem = source.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".zip")
    folder = out if out is not None else source.parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}_mask.nii.gz"


def upload_bytes(source: Path) -> tuple[str, bytes]:
    """(file name, bytes) to upload: a file as it is, a DICOM folder zipped in memory (series only, no extraction
    on the other side)."""
    if not source.is_dir():
        return source.name, source.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(source).as_posix())
    return f"{source.name}.zip", buffer.getvalue()


def report_path(source: Path, out: Path | None) -> Path:
    """``<name>_report.html`` where the mask goes."""
    return mask_path(source, out).with_name(mask_path(source, out).name.replace("_mask.nii.gz", "_report.html"))


def save_report(html: str, source: Path, out: Path | None, body: dict[str, Any]) -> None:
    """Write the per-patient report (and its PDF where Chromium is installed); name both in ``body``."""
    from jointray.report.patient import print_to_pdf  # matplotlib loads only for a report

    target = report_path(source, out)
    target.write_text(html)
    body["report_file"] = str(target)
    pdf = print_to_pdf(target)
    if pdf is not None:
        body["report_pdf"] = str(pdf)


def predict_remote(url: str, files: list[Path], clinical: dict[str, Any], out: Path | None, mc_samples: int | None,
                   mc_mode: str | None, api_key: str | None = None, report: bool = False) -> list[tuple[str, dict]]:
    """POST each input to ``{url}/v1/predict?mask=true``; write each mask (and with ``report`` the per-patient
    report); (input, JSON answer or error) per input."""
    headers = {"X-API-Key": api_key} if api_key else {}
    form = {"clinical": json.dumps(clinical)}
    if mc_samples is not None:
        form["mc_samples"] = str(mc_samples)
    if mc_mode is not None:
        form["mc_mode"] = mc_mode
    answers = []
    for source in files:
        name, data = upload_bytes(source)
        params = {"mask": "true"} | ({"report": "true"} if report else {})
        response = requests.post(f"{url.rstrip('/')}/v1/predict", params=params, headers=headers,
                                 files={"file": (name, data)}, data=form, timeout=REQUEST_TIMEOUT_S)
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"status": response.status_code, "message": response.text[:300]}}
        if response.ok and "mask_nii_gz_base64" in body:
            target = mask_path(source, out)
            target.write_bytes(base64.b64decode(body.pop("mask_nii_gz_base64")))
            body["mask_file"] = str(target)
        if response.ok and "report_html" in body:
            save_report(body.pop("report_html"), source, out, body)
        answers.append((str(source), body))
    return answers


def predict_local(checkpoint: str | Path | list[str | Path], files: list[Path], clinical: dict[str, Any],
                  out: Path | None, mc_samples: int | None, mc_mode: str | None,
                  report: bool = False) -> list[tuple[str, dict]]:
    """The same as :func:`predict_remote`, with the model loaded here."""
    predictor = Predictor(checkpoint)
    samples, mode = predictor.check_mc(mc_samples, mc_mode)
    answers = []
    for source in files:
        started = time.perf_counter()
        try:
            case = predictor.prepare(source, clinical)
        except InputError as exc:
            answers.append((str(source), {"error": {"status": 422, "message": f"{exc.path}: {exc.reason}"}}))
            continue
        forward_started = time.perf_counter()
        result = predictor.forward([case], samples, mode)[0]
        forward_s = time.perf_counter() - forward_started
        prediction = predictor.finish(case, result, samples, mode, entropy_map=report)
        body = answer(predictor, case, prediction, prediction.seconds | {
            "forward": forward_s, "total": time.perf_counter() - started})
        if prediction.mask is not None:
            target = mask_path(source, out)
            target.write_bytes(nifti_gz(mask_image(prediction.mask, prediction.affine)))
            body["mask_file"] = str(target)
        if report:
            save_report(report_page(predictor, case, prediction, body), source, out, body)
        answers.append((str(source), body))
    return answers
