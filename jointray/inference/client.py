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
from jointray.inference.answers import answer, mask_image, nifti_gz
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


def predict_remote(url: str, files: list[Path], clinical: dict[str, Any], out: Path | None, mc_samples: int | None,
                   mc_mode: str | None, api_key: str | None = None) -> list[tuple[str, dict]]:
    """POST each input to ``{url}/v1/predict?mask=true``; write each mask; (input, JSON answer or error) per input."""
    headers = {"X-API-Key": api_key} if api_key else {}
    form = {"clinical": json.dumps(clinical)}
    if mc_samples is not None:
        form["mc_samples"] = str(mc_samples)
    if mc_mode is not None:
        form["mc_mode"] = mc_mode
    answers = []
    for source in files:
        name, data = upload_bytes(source)
        response = requests.post(f"{url.rstrip('/')}/v1/predict", params={"mask": "true"}, headers=headers,
                                 files={"file": (name, data)}, data=form, timeout=REQUEST_TIMEOUT_S)
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"status": response.status_code, "message": response.text[:300]}}
        if response.ok and "mask_nii_gz_base64" in body:
            target = mask_path(source, out)
            target.write_bytes(base64.b64decode(body.pop("mask_nii_gz_base64")))
            body["mask_file"] = str(target)
        answers.append((str(source), body))
    return answers


def predict_local(checkpoint: Path | list[Path], files: list[Path], clinical: dict[str, Any], out: Path | None,
                  mc_samples: int | None, mc_mode: str | None) -> list[tuple[str, dict]]:
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
        prediction = predictor.finish(case, result, samples, mode)
        body = answer(predictor, case, prediction, prediction.seconds | {
            "forward": forward_s, "total": time.perf_counter() - started})
        if prediction.mask is not None:
            target = mask_path(source, out)
            target.write_bytes(nifti_gz(mask_image(prediction.mask, prediction.affine)))
            body["mask_file"] = str(target)
        answers.append((str(source), body))
    return answers
