"""The HTTP ingress: a FastAPI app on a Serve deployment that does the CPU work around the model.

Per request it reads the upload (size-limited from ``Content-Length`` and again while streaming),
checks the API key, decodes and validates the image and clinical record and preprocesses it
(:meth:`Predictor.prepare`, in a worker thread so concurrent requests overlap), hands the prepared
case to the batched model deployment, and maps the answer back onto the input's grid
(:meth:`Predictor.finish`). Every problem with a request is a 4xx with a JSON body
``{"error": {"status": N, "message": "..."}}`` naming it; the replica carries on.

Routes: ``POST /v1/predict`` (JSON), ``POST /v1/predict/mask`` (NIfTI, or a zip with the entropy map),
``GET /v1/model``, ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /`` (the web viewer),
``/docs`` (OpenAPI).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from jointray.config import InferenceConfig
from jointray.data.errors import InputError
from jointray.inference.answers import answer, mask_files, mask_image, nifti_gz, report_page, viewer_arrays
from jointray.inference.cases import PreparedCase
from jointray.inference.predictor import Predictor

STATIC = Path(__file__).parent / "static"
#: Tries of one request on the model deployment when the replica answering it dies.
MODEL_ATTEMPTS = 2
API_KEY_HEADER = "X-API-Key"
logger = logging.getLogger("jointray.serve")


class RequestError(Exception):
    """A request that cannot be answered: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


_PREDICT_BODY = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "a NIfTI image (.nii or .nii.gz) or a zip of one DICOM series"},
            "clinical": {"type": "string", "description": "a JSON object of clinical values, e.g. {\"age\": 71}"},
            "mc_samples": {"type": "integer", "description": "Monte Carlo samples (1 = one deterministic pass)"},
            "mc_mode": {"type": "string", "enum": ["full", "decoder", "heads"]},
        }}}}},
}

api = FastAPI(title="jointray", description="Hippocampus segmentation and clinical outcomes with uncertainty.",
              version="1")
api.mount("/static", StaticFiles(directory=STATIC), name="static")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, model: DeploymentHandle, checkpoint: str, inference: dict[str, Any], max_upload_mb: float,
                 api_key_env: str | None):
        import torch

        torch.set_num_threads(1)  # decode and resample alongside the model replicas, not against them
        self.model = model
        self.predictor = Predictor(checkpoint, device="cpu", inference=InferenceConfig.model_validate(inference))
        self.max_bytes = int(max_upload_mb * 1024 * 1024)
        self.api_key: bytes | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise RuntimeError(f"serve.api_key_env={api_key_env} but that environment variable is not set here")
            self.api_key = key.encode()
        self.registry = CollectorRegistry()
        self.requests = Counter("jointray_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("jointray_request_seconds", "request latency by route", ["route"],
                                 registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))

    # -- plumbing --------------------------------------------------------------------------------------------
    def _authorised(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get(API_KEY_HEADER, "")
        if not given and request.headers.get("authorization", "").lower().startswith("bearer "):
            given = request.headers["authorization"][7:]
        return hmac.compare_digest(given.encode(), self.api_key)

    async def _body(self, request: Request) -> bytes:
        """The request body, refused past ``max_upload_mb`` from its Content-Length and again while it streams."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, f"Content-Length {declared!r} is not a number")
            if int(declared) > self.max_bytes:
                raise RequestError(413, f"upload of {int(declared):,} bytes is over the limit of {self.max_bytes:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise RequestError(413, f"upload is over the limit of {self.max_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _form(self, request: Request) -> tuple[bytes, str, dict[str, Any], int | None, str | None]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError(415, "send multipart/form-data with a 'file' field (and optional 'clinical', "
                                    "'mc_samples', 'mc_mode')")
        body = await self._body(request)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=64 * 1024)
        except Exception as exc:  # starlette raises several types for a malformed multipart body
            raise RequestError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestError(422, "missing form field 'file' (a NIfTI image or a zip of one DICOM series)")
        data = await upload.read()
        clinical: dict[str, Any] = {}
        if form.get("clinical") not in (None, ""):
            try:
                clinical = json.loads(str(form["clinical"]))
            except json.JSONDecodeError as exc:
                raise RequestError(422, f"clinical is not valid JSON ({exc.msg} at position {exc.pos})") from None
            if not isinstance(clinical, dict):
                raise RequestError(422, "clinical must be a JSON object of name → value")
        samples = request.query_params.get("mc_samples", form.get("mc_samples"))
        mode = request.query_params.get("mc_mode", form.get("mc_mode"))
        try:
            samples = None if samples in (None, "") else int(str(samples))
        except ValueError:
            raise RequestError(422, f"mc_samples={samples!r} is not an integer") from None
        return data, upload.filename or "upload", clinical, samples, (None if mode in (None, "") else str(mode))

    async def _predict(self, request: Request, entropy_map: bool):
        """Upload → (prepared case, prediction, stage timings)."""
        started = time.perf_counter()
        data, name, clinical, samples, mode = await self._form(request)
        try:
            samples, mode = self.predictor.check_mc(samples, mode)
        except ValueError as exc:
            raise RequestError(422, str(exc)) from None
        try:
            case: PreparedCase = await asyncio.to_thread(self.predictor.prepare, data, clinical, name, self.max_bytes)
        except InputError as exc:
            raise RequestError(422, f"{exc.path}: {exc.reason}") from None
        sent = time.perf_counter()
        # The display copy of the input stays here: only what the forward pass reads travels to the model.
        travelling = dataclasses.replace(case, original=None, label=None)
        result = await self._forward(travelling, samples, mode)
        returned = time.perf_counter()
        prediction = await asyncio.to_thread(self.predictor.finish, case, result, samples, mode, entropy_map)
        seconds = dict(prediction.seconds) | {"forward": returned - sent, "total": time.perf_counter() - started}
        return case, prediction, seconds

    async def _forward(self, case: PreparedCase, samples: int, mode: str):
        """The model deployment's answer; a request caught on a replica that dies is sent once more (the
        forward pass has no side effects), so a lost replica costs latency, not an error."""
        for attempt in range(MODEL_ATTEMPTS):
            try:
                return await self.model.forward.remote(case, samples, mode)
            except (RayActorError, ActorUnavailableError) as exc:
                logger.warning("model replica lost during a request (%s); attempt %d of %d", type(exc).__name__,
                               attempt + 1, MODEL_ATTEMPTS)
        raise RequestError(503, "the model replica was lost twice while answering; try again")

    async def _guarded(self, route: str, request: Request, handler):
        started = time.perf_counter()
        try:
            if route.startswith("/v1/") and not self._authorised(request):
                raise RequestError(401, f"missing or wrong API key (header {API_KEY_HEADER})")
            response = await handler()
        except RequestError as exc:
            response = _error(exc.status, exc.message)
        self.requests.labels(route, str(response.status_code)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)
        return response

    # -- routes ----------------------------------------------------------------------------------------------
    @api.post("/v1/predict", openapi_extra=_PREDICT_BODY,
              summary="Segment the hippocampus and predict outcomes, with Monte Carlo uncertainty")
    async def predict(self, request: Request, viewer: bool = False, mask: bool = False, report: bool = False):
        """Structure volumes (mm³) with intervals, outcome predictions for the trained heads, uncertainty
        inside each structure, a review flag, the inference path and per-stage timings. ``viewer=true`` adds
        the input, mask and entropy as small arrays for the web viewer; ``mask=true`` adds the mask as a
        base64 ``.nii.gz`` (``mask_nii_gz_base64``), saving a client a second request; ``report=true`` adds
        the per-patient HTML report (``report_html``: slices with the mask and the uncertainty, volumes and
        outcomes with intervals, the review flag, the model's validation figures). ``mc_samples`` and
        ``mc_mode`` may also be given as query parameters."""
        async def handle():
            case, prediction, seconds = await self._predict(request, entropy_map=viewer or report)
            body = answer(self.predictor, case, prediction, seconds)
            if report:
                body["report_html"] = await asyncio.to_thread(report_page, self.predictor, case, prediction, dict(body))
            if prediction.mask is not None and viewer:
                body["viewer"] = viewer_arrays(case, prediction, self.predictor.config.model.num_classes,
                                               self.predictor.structures)
            if prediction.mask is not None and mask:
                gz = await asyncio.to_thread(nifti_gz, mask_image(prediction.mask, prediction.affine))
                body["mask_nii_gz_base64"] = base64.b64encode(gz).decode("ascii")
            return JSONResponse(body)
        return await self._guarded("/v1/predict", request, handle)

    @api.post("/v1/predict/mask", openapi_extra=_PREDICT_BODY,
              summary="The label mask as NIfTI in the input's own space",
              responses={200: {"content": {"application/gzip": {}, "application/zip": {}}}})
    async def predict_mask(self, request: Request, uncertainty: bool = False):
        """The mask (``.nii.gz``, uint8, the input's shape and affine); with ``uncertainty=true`` a zip of the
        mask and the voxel entropy map."""
        async def handle():
            _, prediction, _ = await self._predict(request, entropy_map=uncertainty)
            if prediction.mask is None:
                raise RequestError(422, "this model has no segmentation head")
            body, media, filename = await asyncio.to_thread(mask_files, prediction, uncertainty)
            disposition = f'attachment; filename="{filename}"'
            return Response(body, media_type=media, headers={"Content-Disposition": disposition})
        return await self._guarded("/v1/predict/mask", request, handle)

    @api.get("/v1/model", summary="The served model: variant, version, trained heads, metrics, inputs")
    async def model_info(self, request: Request):
        async def handle():
            p = self.predictor
            samples, mode = p.check_mc(None, None)
            calibration = p.calibration
            return JSONResponse({
                "name": p.config.train.name, "variant": p.config.model.variant, "version": p.version,
                "trained_heads": p.trained_heads, "structures": list(p.structures.values()),
                "metrics": {k: v for k, v in p.metrics.items() if math.isfinite(v)},
                "preprocess": p.spec.model_dump(mode="json"), "spec_digest": p.spec.digest(),
                "clinical": {"numeric": [f.name for f in p.schema.numeric],
                             "categorical": {f.name: f.categories for f in p.schema.categorical}},
                "runtime": p.runtimes,
                "mc": {"samples": samples, "mode": mode,
                       "max_samples": p.inference.max_mc_samples, "modes": list(p.mc_modes)},
                "calibration": None if calibration is None else {
                    "cases": calibration.cases, "settings": calibration.settings.model_dump(),
                    "voxel_scaling": calibration.scaling_method, "statement": calibration.coverage_sentence(
                        p.inference.interval), "review_statement": calibration.review_sentence(),
                    "ood_statement": calibration.ood_sentence()},
                "max_upload_bytes": self.max_bytes, "api_key_required": self.api_key is not None,
                "config": p.config.model_dump(mode="json", include={"model", "preprocess", "inference", "data"}),
            })
        return await self._guarded("/v1/model", request, handle)

    @api.get("/healthz", summary="200 once the model deployment answers its health check")
    async def healthz(self, request: Request):
        async def handle():
            try:
                state = await self.model.ready.remote()
            except Exception as exc:  # an unhealthy or unreachable model replica
                return _error(503, f"model not ready ({type(exc).__name__})")
            return JSONResponse({"status": "ok", "version": state["version"]})
        return await self._guarded("/healthz", request, handle)

    @api.get("/metrics", summary="Request counts and latencies of this ingress replica (Prometheus text)")
    async def metrics(self):
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/", include_in_schema=False)
    async def viewer(self):
        return FileResponse(STATIC / "index.html")
