"""medray's own HTTP API, /v1: one route per model, in the formats each kind of data comes in.

    GET  /v1/models                 deployed models: task, labels, input spec, validation metrics
    POST /v1/exercise/predict       {"instances": [[f, …], …] | [{name: f, …}, …]}
    POST /v1/genomic/predict        {"sequences": […]} or a FASTA body (text/x-fasta)
    POST /v1/ultrasound/predict     multipart files, {"images": [base64, …]}, or one image/* body
    POST /v1/genomic/generate       {"n", "label", "seed"}: sequences from the genomic GAN

Bodies become model inputs with serve/inputs.py and go to the model with `run_model`
(serve/gateway.py), as /v2 requests do; the answer is `{"predictions": [{"label",
"probabilities"}, …], "model": {"name", "version"}}`.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from serve.gateway import (
    BATCH_HEADER,
    ERRORS,
    Ingress,
    audit,
    error_response,
    generate,
    json_response,
    media_type,
    run_model,
)
from serve.inputs import (
    RequestError,
    decode_images,
    images_from_json,
    parse_features,
    parse_generate,
    parse_sequences,
    prediction_objects,
)


class ExerciseRequest(BaseModel):
    instances: list[list[float] | dict[str, float]] = Field(
        min_length=1, description="feature rows in the bundle's feature order, or objects keyed by feature name")


class GenomicRequest(BaseModel):
    sequences: list[str] = Field(min_length=1, description="DNA sequences (IUPAC nucleotide codes)")


class UltrasoundRequest(BaseModel):
    images: list[str] = Field(min_length=1, description="base64-encoded PNG/JPEG/DICOM images")


class GenerateRequest(BaseModel):
    n: int = Field(ge=1, description="number of sequences (at most max_instances)")
    label: str | None = Field(None, description="class to generate, for conditional generators (e.g. EI)")
    seed: int = Field(0, ge=0, description="the same seed gives the same sequences")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class ModelRef(BaseModel):
    name: str
    version: str


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model: ModelRef


def request_body(content: dict[str, type[BaseModel] | dict]) -> dict:
    """OpenAPI `requestBody` for routes that read the raw body (media type → schema)."""
    out = {}
    for media, schema in content.items():
        out[media] = {"schema": schema.model_json_schema() if isinstance(schema, type) else schema}
    return {"requestBody": {"required": True, "content": out}}


_PREDICT = dict(response_model=PredictResponse, responses=ERRORS)


class V1Routes:
    """The ingress's /v1 helpers (mixed into serve/app.py's Gateway with GatewayBase)."""

    async def _predict(self, task: str, info: dict, inputs) -> Response:
        try:
            probs, batch = await run_model(self, task, info, inputs)
        except RequestError as e:
            return error_response(e)
        payload = {"predictions": prediction_objects(probs, info["labels"]),
                   "model": {"name": info["name"], "version": info["version"]}}
        return json_response(payload, headers={BATCH_HEADER: str(batch)})

    async def _multipart_files(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        request._body = body  # already read (and size-checked); let Starlette's parser reuse it
        try:
            form = await request.form(max_files=self.limits.max_instances + 1, max_fields=16)
        except Exception as e:  # malformed multipart body
            raise RequestError(400, "invalid_multipart", f"malformed multipart body: {e}") from None
        files = []
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files.append((value.filename or key, await value.read()))
        await form.close()
        if not files:
            raise RequestError(422, "invalid_input", "multipart body holds no files (send each image as a file part)")
        return files


router = APIRouter()


@router.get("/v1/models", summary="deployed models: task, labels, input spec, validation metrics")
async def list_models(gw: Ingress) -> dict:
    infos = await asyncio.gather(*(gw.model_info(t) for t in gw.models))
    return {"models": dict(zip(gw.models, infos))}


@router.post("/v1/exercise/predict", summary="exercise class from wearable-sensor features",
             openapi_extra=request_body({"application/json": ExerciseRequest}), **_PREDICT)
async def predict_exercise(request: Request, gw: Ingress) -> Response:
    info = await gw._ready_model("exercise")
    if media_type(request) not in ("application/json", ""):
        raise RequestError(415, "unsupported_media_type", "send application/json: {\"instances\": [[…], …]}")
    body = await gw._read_body(request)
    x = parse_features(body, info["input"]["feature_names"], gw.limits)
    audit(request, info, len(x))
    return await gw._predict("exercise", info, x)


@router.post("/v1/genomic/predict", summary="class of DNA sequences (JSON list or FASTA body)",
             openapi_extra=request_body({"application/json": GenomicRequest,
                                         "text/x-fasta": {"type": "string", "example": ">seq1\nACGT…\n"}}),
             **_PREDICT)
async def predict_genomic(request: Request, gw: Ingress) -> Response:
    info = await gw._ready_model("genomic")
    mt = media_type(request)
    if mt not in ("application/json", "", "text/x-fasta", "text/plain", "application/x-fasta"):
        raise RequestError(415, "unsupported_media_type", f"{mt!r}: send application/json "
                           "{\"sequences\": […]} or a FASTA body as text/x-fasta")
    body = await gw._read_body(request)
    _, seqs = parse_sequences(body, mt, gw.limits)
    audit(request, info, len(seqs))
    return await gw._predict("genomic", info, seqs)


@router.post("/v1/ultrasound/predict", summary="class of ultrasound images (multipart files or base64 JSON)",
             openapi_extra=request_body({
                 "multipart/form-data": {"type": "object", "properties": {
                     "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}},
                 "application/json": UltrasoundRequest,
                 "image/png": {"type": "string", "format": "binary"},
                 "image/jpeg": {"type": "string", "format": "binary"}}), **_PREDICT)
async def predict_ultrasound(request: Request, gw: Ingress) -> Response:
    info = await gw._ready_model("ultrasound")
    mt = media_type(request)
    body = await gw._read_body(request)
    if mt == "multipart/form-data":
        files = await gw._multipart_files(request, body)
    elif mt in ("application/json", ""):
        files = images_from_json(body, gw.limits)
    elif mt.startswith("image/") or mt in ("application/dicom", "application/octet-stream"):
        files = [("image 0", body)]
    else:
        raise RequestError(415, "unsupported_media_type", f"{mt!r}: send multipart/form-data files, "
                           "application/json {\"images\": [base64…]}, or one image/png|image/jpeg body")
    images = decode_images(files, info["input"]["size"][0], gw.limits)
    audit(request, info, len(images))
    return await gw._predict("ultrasound", info, images)


@router.post("/v1/genomic/generate", summary="DNA sequences sampled from the genomic GAN (JSON or FASTA)",
             openapi_extra=request_body({"application/json": GenerateRequest}),
             responses={**ERRORS, 200: {"content": {"application/json": {}, "text/x-fasta": {}}}})
async def generate_genomic(request: Request, gw: Ingress) -> Response:
    info = await gw._ready_model("genomic-gan")
    body = await gw._read_body(request)
    n, label, seed = parse_generate(body, info["labels"], bool(info["input"].get("conditional")), gw.limits)
    audit(request, info, n)
    try:
        seqs, labels = await generate(gw, n, label, seed)
    except RequestError as e:
        return error_response(e)
    ids = [f"gen-{seed}-{i + 1}" for i in range(len(seqs))]
    if "text/x-fasta" in request.headers.get("accept", ""):
        text = "".join(f">{i}{' label=' + lab if lab else ''}\n{s}\n" for i, s, lab in zip(ids, seqs, labels))
        return Response(text, media_type="text/x-fasta")
    return json_response({"sequences": [{"id": i, "sequence": s, "label": lab} for i, s, lab in zip(ids, seqs, labels)],
                          "model": {"name": info["name"], "version": info["version"]}})
