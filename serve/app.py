"""The medray Ray Serve application: one deployment per model bundle behind one FastAPI ingress.

    HTTP ──▶ ingress (FastAPI: parse, validate, decode)  ──handle──▶  exercise   (ModelServer)
                                                          ──handle──▶  ultrasound (ModelServer)
                                                          ──handle──▶  genomic    (ModelServer)

* `ModelServer` loads a bundle with `medray.bundle.load_bundle` and predicts with
  `Bundle.predict` — the code `medray predict` runs — on dynamic batches (`@serve.batch`): the
  requests that arrive within `batch_wait_timeout_s` (up to `max_batch_size` of them) are
  concatenated into one forward pass. Batch settings are the deployment's `user_config`, so
  `serve/config.yaml` (or `serve deploy` of an edited copy) changes them without code edits or a restart.
* The ingress (`Gateway`) turns request bodies into arrays with `serve/inputs.py` and checks every
  limit there, so nothing malformed reaches a model replica. Overload (a model's queue is full:
  `max_queued_requests`) answers 503 with `Retry-After`.

Entry points: `serve run serve/config.yaml` / `serve deploy serve/config.yaml` (import path
`serve.app:build_app`, args `bundles` and `limits`), and `medray serve BUNDLE_DIR…`, which builds
the same application with the deployment settings of `serve/config.yaml`.
"""

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from medray import __version__
from medray.bundle import META, load_bundle
from medray.errors import MedrayError
from medray.tasks import SERVED_TASKS
from serve.inputs import (
    Limits,
    RequestError,
    decode_images,
    images_from_json,
    parse_features,
    parse_generate,
    parse_sequences,
    prediction_objects,
)
from serve.security import PUBLIC_PATHS, SecurityConfig, SecurityMiddleware, note

logger = logging.getLogger("ray.serve")

MODEL_TASKS = SERVED_TASKS
BATCH_HEADER = "X-Medray-Batch-Size"  # instances in the forward pass that served this request
RETRY_AFTER_S = 1
# Image requests with this many images skip batching in the ingress: they fill a forward pass on
# their own, and separate calls let the router spread them over replicas of the (heavy) image model.
# Measured: this tripled 64-image throughput at concurrency 8, while the same rule for the light
# tabular and sequence models cut their 64-instance throughput by half or more (the extra hops cost
# more than their forward passes), so those always batch in the ingress.
DIRECT_CALL_IMAGES = 32


# --------------------------------------------------------------------------- model replicas


class ModelUnavailable(Exception):
    """The bundle failed to load; the replica stays up to report why (see /readyz)."""


@serve.deployment(
    # Defaults; serve/config.yaml sets the tuned values (and `medray serve` applies them too).
    max_ongoing_requests=32,
    max_queued_requests=256,
    user_config={"max_batch_size": 32, "batch_wait_timeout_s": 0.0},
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2},
    ray_actor_options={"num_cpus": 1},
)
class ModelServer:
    def __init__(self, bundle_path: str, task: str | None = None):
        _undo_worker_niceness()
        self.path = str(bundle_path)
        self.bundle, self.error = _load_for_serving(self.path, task)
        if self.bundle is None:
            return
        # one thread runs forward passes, so the event loop keeps accepting (and batching) requests
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    def reconfigure(self, config: dict) -> None:
        config = dict(config or {})
        self.predict_batch.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.predict_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.0)))

    def info(self) -> dict:
        if self.bundle is None:
            return {"ready": False, "bundle": self.path, "error": self.error}
        m = self.bundle.meta
        return {
            "ready": True,
            "bundle": self.path,
            "name": self.bundle.name,
            "version": self.bundle.version,
            "task": self.bundle.task,
            "model": m["model"],
            "labels": self.bundle.labels,
            "input": m.get("input"),
            "input_shape": m["input_shape"],
            "metrics": {"validation": m.get("metrics", {}).get("validation")},
            "trained": {k: m.get("training", {}).get(k) for k in ("epochs_trained", "workers", "seed")},
            "versions": m.get("versions"),
            "device": str(self.bundle.device),
        }

    async def predict(self, inputs) -> tuple[np.ndarray, int]:
        """(probabilities, instances in the forward pass) for one request's raw inputs."""
        if self.bundle is None:
            raise ModelUnavailable(self.error)
        return await self.predict_batch(inputs)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def predict_batch(self, batch: list) -> list[tuple[np.ndarray, int]]:
        counts = [len(x) for x in batch]
        joined = _concat(batch)
        probs = await asyncio.get_running_loop().run_in_executor(self._pool, self.bundle.predict, joined)
        return _split(probs, counts, len(joined))


def _load_for_serving(path: str, task: str | None):
    """(bundle, None), or (None, why) when it cannot serve `task`: the replica stays alive so
    /readyz can say which model failed and why, while the other models keep serving."""
    import torch

    try:
        bundle = load_bundle(path)
        if task is not None and bundle.task != task:
            raise MedrayError(f"{path}: a {bundle.task} bundle, deployed as the {task} model")
    except MedrayError as e:
        logger.error("model bundle failed to load: %s", e)
        return None, str(e)
    if torch.cuda.is_available():  # a replica given num_gpus sees its GPU
        bundle.to("cuda")
    return bundle, None


def _undo_worker_niceness() -> None:
    """Ray starts worker processes at a low CPU priority (nice 15); a replica that answers
    clinicians' requests should not yield to batch work on the same node. Needs the privilege to
    raise priority (root in the container, CAP_SYS_NICE); silently kept otherwise."""
    import os

    try:  # Linux niceness is per thread: every thread of the replica process
        for tid in os.listdir("/proc/self/task"):
            if os.getpriority(os.PRIO_PROCESS, int(tid)) > 0:
                os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except (OSError, AttributeError, ValueError):
        pass


def _concat(items: list):
    """One model input from several requests' inputs (arrays stacked, sequence lists joined)."""
    if isinstance(items[0], np.ndarray):
        return items[0] if len(items) == 1 else np.concatenate(items)
    return [s for x in items for s in x]


def _split(probs: np.ndarray, counts: list[int], batch: int) -> list[tuple[np.ndarray, int]]:
    """Back per request: `probs` of the `_concat` of requests with `counts` instances each, as
    (that request's rows, instances in the forward pass) pairs."""
    out, start = [], 0
    for n in counts:
        out.append((probs[start : start + n], batch))
        start += n
    return out


# --------------------------------------------------------------------------- replica failures
# A model replica that dies (crash, OOM kill, node loss) is replaced by Serve (the deployment's
# replica count), which stops routing to it. Calls it was serving: Serve's router (Ray 2.58,
# gRPC between deployments in throughput mode) sends again by itself those whose replica died
# before reporting it had accepted them (SIGKILLs under load, tests/test_faults_serving.py: the
# ingress mostly sees only latency). The others fail in the ingress with ActorUnavailableError
# ("Actor is unavailable": the gRPC channel dropped; ActorDiedError, possibly wrapped in a
# RayTaskError, without gRPC). Predictions are idempotent, so the ingress sends those again too,
# after a short pause that lets the router learn the replica is gone; after the last retry the
# client gets 503 model_unavailable with Retry-After (never a 500).

REPLICA_RETRY_BACKOFF_S = (0.05, 0.5)  # pause before each retry; len() = retries


def _unavailable(task: str, e: Exception) -> Response:
    """503 for a model that cannot answer now. With Retry-After when retrying can help: a full
    queue (`overloaded`), replicas that died or are not deployed yet; without it for a bundle that
    failed to load (an operator must fix it; /readyz says why)."""
    if isinstance(e, ModelUnavailable):
        return _error(503, "model_unavailable", str(e))
    if isinstance(e, BackPressureError):
        return _error(503, "overloaded", f"the {task} model's queue is full; retry after {RETRY_AFTER_S}s",
                      {"Retry-After": str(RETRY_AFTER_S)})
    detail = str(e) if isinstance(e, ReplicaUnreachable) else f"the {task} model is not deployed: {e.message}"
    return _error(503, "model_unavailable", f"{detail}; retry after {RETRY_AFTER_S}s", {"Retry-After": str(RETRY_AFTER_S)})


class ReplicaUnreachable(Exception):
    """A model's handle call failed on dead or unreachable replicas on every attempt."""

    def __init__(self, task: str, cause: BaseException):
        super().__init__(f"the {task} model's replicas could not be reached "
                         f"({type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''})")


def _replica_gone(e: BaseException) -> bool:
    """Did the call fail because the replica serving it died or was unreachable (not because the
    model raised)? Such a call never produced a result, so sending it again is safe."""
    import grpc

    if isinstance(e, RayTaskError):  # a wrapped actor death; a model's own exception is not retried
        return isinstance(getattr(e, "cause", None), RayActorError)
    return isinstance(e, (RayActorError, ReplicaUnavailableError, grpc.aio.AioRpcError))


async def _call_model(handle, task: str, *args, method: str = "predict"):
    """`handle.<method>.remote(*args)`, sent again (REPLICA_RETRY_BACKOFF_S) when the replica that
    had it died; ReplicaUnreachable when every attempt did. Only for idempotent calls (predict;
    generate, which is seeded)."""
    for attempt in range(len(REPLICA_RETRY_BACKOFF_S) + 1):
        try:
            return await getattr(handle, method).remote(*args)
        except Exception as e:
            if not _replica_gone(e):
                raise
            if attempt == len(REPLICA_RETRY_BACKOFF_S):
                logger.error("%s: handle call failed on a dead replica %d times (%s); answering 503",
                             task, attempt + 1, type(e).__name__)
                raise ReplicaUnreachable(task, e) from None
            logger.warning("%s: handle call failed because its replica is gone (%s: %s); retry %d",
                           task, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", attempt + 1)
            await asyncio.sleep(REPLICA_RETRY_BACKOFF_S[attempt])


@serve.deployment(
    max_ongoing_requests=16,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    ray_actor_options={"num_cpus": 1},
)
class GeneratorServer:
    """A genomic-gan bundle: sequences sampled with `medray.gan.generate` (what `medray generate` runs)."""

    def __init__(self, bundle_path: str, task: str = "genomic-gan"):
        _undo_worker_niceness()
        self.path = str(bundle_path)
        self.bundle, self.error = _load_for_serving(self.path, task)

    def info(self) -> dict:
        if self.bundle is None:
            return {"ready": False, "bundle": self.path, "error": self.error}
        m = self.bundle.meta
        return {"ready": True, "bundle": self.path, "name": self.bundle.name, "version": self.bundle.version,
                "task": self.bundle.task, "model": m["model"], "labels": self.bundle.labels, "input": m.get("input"),
                "metrics": {"last_epoch": (m.get("metrics", {}).get("history") or [{}])[-1]},
                "device": str(self.bundle.device)}

    def generate(self, n: int, label: str | None, seed: int) -> tuple[list[str], list]:
        from medray.gan import generate

        if self.bundle is None:
            raise ModelUnavailable(self.error)
        return generate(self.bundle, n, label=label, seed=seed)


# --------------------------------------------------------------------------- HTTP API


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


class ErrorResponse(BaseModel):
    error: str
    detail: str


def _body(content: dict[str, type[BaseModel] | dict]) -> dict:
    out = {}
    for media, schema in content.items():
        out[media] = {"schema": schema.model_json_schema() if isinstance(schema, type) else schema}
    return {"requestBody": {"required": True, "content": out}}


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 408, 413, 415, 422, 503)}
_PREDICT = dict(response_model=PredictResponse, responses=_ERRORS)

api = FastAPI(
    title="medray",
    version=__version__,
    description="Predictions from medray model bundles (exercise motion, ultrasound images, genomic DNA). "
    "Errors are JSON `{\"error\": code, \"detail\": message}` with a 4xx status (503 when overloaded). "
    "Every route but /healthz and /readyz needs `Authorization: Bearer TOKEN` (401 without a valid token, "
    "403 for a token not allowed that model).",
)
api.add_middleware(SecurityMiddleware)  # auth, CORS, request id, audit log: serve/security.py


def _openapi() -> dict:
    """The OpenAPI document, with the bearer-token scheme every route but the probes requires."""
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        for path in PUBLIC_PATHS:
            for op in doc["paths"].get(path, {}).values():
                op["security"] = []
        api.openapi_schema = doc
    return api.openapi_schema


api.openapi = _openapi


def _json(payload, status: int = 200, headers: dict | None = None, response: type[Response] = Response) -> Response:
    return response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, code: str, detail: str, headers: dict | None = None,
           response: type[Response] = Response) -> Response:
    return _json({"error": code, "detail": detail}, status, headers, response)


LINGER_MAX_BYTES = 256 * 2**20  # the most of a refused body read and discarded after the 413
LINGER_IDLE_S = 5.0  # ... waiting at most this long for each next part of it


class LingeringResponse(Response):
    """A refusal sent before the request body is read (413): the answer goes out at once, then
    the rest of the body is read and discarded (up to LINGER_MAX_BYTES, LINGER_IDLE_S between
    parts) before the response ends and the connection closes, as nginx's lingering close does.
    A client that sends its whole body before reading (urllib, requests) gets the 413; closing
    with its data unread would reset the connection, and the client would never learn why."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        # a client that asked `Expect: 100-continue` is not sending its body: nothing to drain
        drained = 0 if (b"expect", b"100-continue") not in scope.get("headers", []) else LINGER_MAX_BYTES
        try:
            while drained < LINGER_MAX_BYTES:
                message = await asyncio.wait_for(receive(), LINGER_IDLE_S)
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except (TimeoutError, OSError):  # asyncio's timeout is TimeoutError since Python 3.11
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@api.exception_handler(RequestError)
async def _request_error(request: Request, e: RequestError):
    note(request, outcome=e.code)
    if e.code == "body_too_large":
        return _error(e.status, e.code, e.detail, {"Connection": "close"}, response=LingeringResponse)
    return _error(e.status, e.code, e.detail)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return _error(e.status_code, code, str(e.detail), getattr(e, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return _error(422, "invalid_input", f"{where}: {first.get('msg', 'invalid request')}")


async def read_body(request: Request, limit: int, timeout_s: float = 30) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes (declared or
    streamed), and with 408 when it has not all arrived within `timeout_s` (a slow client must not
    hold an ingress slot for long)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "invalid_header", "Content-Length is not a number")
        if int(declared) > limit:
            raise RequestError(413, "body_too_large", f"request body of {int(declared)} bytes is over the "
                               f"{limit}-byte limit")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, "body_too_large", f"request body is over the {limit}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s "
                           f"({size} bytes received)") from None
    return b"".join(chunks)


def _audit(request: Request, info: dict, instances: int) -> None:
    """What the audit line records about a prediction: the model and how many instances, no content."""
    note(request, model=info["task"], model_name=info["name"], model_version=info["version"], instances=instances)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@serve.deployment(
    max_ongoing_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(api)
class Gateway:
    def __init__(self, models: dict, limits: dict | None = None, security: dict | None = None):
        _undo_worker_niceness()
        self.models = dict(models)
        self.limits = Limits.from_dict(limits)
        api.state.security = SecurityConfig.from_args(**(security or {}))  # read by SecurityMiddleware
        self._info: dict[str, dict] = {}

    # ---- model metadata (fetched from the replicas, so it is what they actually loaded)

    async def model_info(self, task: str, timeout_s: float = 10.0) -> dict:
        if task in self._info:
            return self._info[task]
        try:
            info = await asyncio.wait_for(self.models[task].info.remote(), timeout_s)
        except (asyncio.TimeoutError, Exception) as e:  # deployment still starting or gone
            return {"ready": False, "error": f"model deployment not reachable: {type(e).__name__}: {e}"[:500]}
        if info.get("ready"):
            self._info[task] = info
        return info

    async def _ready_model(self, task: str) -> dict:
        if task not in self.models:
            raise RequestError(404, "model_not_deployed",
                               f"no {task} model is deployed here (deployed: {', '.join(self.models) or 'none'})")
        info = await self.model_info(task)
        if not info.get("ready"):
            raise RequestError(503, "model_unavailable", f"{task} model is not available: {info.get('error')}")
        return info

    # ---- batching in the ingress: concurrent requests for a model share one handle call
    # (the model replica batches again across ingress replicas). A handle call costs far more
    # than parsing a small request, so without this the ingress → model hop caps throughput.

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _batch_exercise(self, items: list) -> list:
        return await self._forward("exercise", items)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _batch_ultrasound(self, items: list) -> list:
        return await self._forward("ultrasound", items)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _batch_genomic(self, items: list) -> list:
        return await self._forward("genomic", items)

    async def _forward(self, task: str, items: list) -> list:
        probs, batch = await _call_model(self.models[task], task, _concat(items))
        return _split(probs, [len(x) for x in items], batch)

    async def _predict(self, task: str, info: dict, inputs) -> Response:
        try:
            if task == "ultrasound" and len(inputs) >= DIRECT_CALL_IMAGES:  # its own call, to any replica
                probs, batch = await _call_model(self.models[task], task, inputs)
            else:
                probs, batch = await getattr(self, f"_batch_{task}")(inputs)
        except (BackPressureError, ModelUnavailable, ReplicaUnreachable, DeploymentUnavailableError) as e:
            return _unavailable(task, e)
        payload = {"predictions": prediction_objects(probs, info["labels"]),
                   "model": {"name": info["name"], "version": info["version"]}}
        return _json(payload, headers={BATCH_HEADER: str(batch)})

    # ---- routes

    @api.get("/healthz", summary="liveness: the ingress answers")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="readiness: every model deployment has loaded its bundle",
             responses={503: {"description": "a model is not loaded; the body says which and why"}})
    async def readyz(self) -> Response:
        infos = await asyncio.gather(*(self.model_info(t, timeout_s=2.0) for t in self.models))
        models = {t: ({"ready": True} if i.get("ready") else {"ready": False, "error": i.get("error")})
                  for t, i in zip(self.models, infos)}
        ready = bool(models) and all(m["ready"] for m in models.values())
        return _json({"ready": ready, "models": models}, 200 if ready else 503)

    @api.get("/v1/models", summary="deployed models: task, labels, input spec, validation metrics")
    async def list_models(self) -> dict:
        infos = await asyncio.gather(*(self.model_info(t) for t in self.models))
        return {"models": dict(zip(self.models, infos))}

    @api.post("/v1/exercise/predict", summary="exercise class from wearable-sensor features",
              openapi_extra=_body({"application/json": ExerciseRequest}), **_PREDICT)
    async def predict_exercise(self, request: Request) -> Response:
        info = await self._ready_model("exercise")
        if media_type(request) not in ("application/json", ""):
            raise RequestError(415, "unsupported_media_type", "send application/json: {\"instances\": [[…], …]}")
        body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
        x = parse_features(body, info["input"]["feature_names"], self.limits)
        _audit(request, info, len(x))
        return await self._predict("exercise", info, x)

    @api.post("/v1/genomic/predict", summary="class of DNA sequences (JSON list or FASTA body)",
              openapi_extra=_body({"application/json": GenomicRequest,
                                   "text/x-fasta": {"type": "string", "example": ">seq1\nACGT…\n"}}), **_PREDICT)
    async def predict_genomic(self, request: Request) -> Response:
        info = await self._ready_model("genomic")
        mt = media_type(request)
        if mt not in ("application/json", "", "text/x-fasta", "text/plain", "application/x-fasta"):
            raise RequestError(415, "unsupported_media_type", f"{mt!r}: send application/json "
                               "{\"sequences\": […]} or a FASTA body as text/x-fasta")
        body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
        _, seqs = parse_sequences(body, mt, self.limits)
        _audit(request, info, len(seqs))
        return await self._predict("genomic", info, seqs)

    @api.post("/v1/ultrasound/predict", summary="class of ultrasound images (multipart files or base64 JSON)",
              openapi_extra=_body({
                  "multipart/form-data": {"type": "object", "properties": {
                      "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}},
                  "application/json": UltrasoundRequest,
                  "image/png": {"type": "string", "format": "binary"},
                  "image/jpeg": {"type": "string", "format": "binary"}}), **_PREDICT)
    async def predict_ultrasound(self, request: Request) -> Response:
        info = await self._ready_model("ultrasound")
        mt = media_type(request)
        body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
        if mt == "multipart/form-data":
            files = await self._multipart_files(request, body)
        elif mt in ("application/json", ""):
            files = images_from_json(body, self.limits)
        elif mt.startswith("image/") or mt in ("application/dicom", "application/octet-stream"):
            files = [("image 0", body)]
        else:
            raise RequestError(415, "unsupported_media_type", f"{mt!r}: send multipart/form-data files, "
                               "application/json {\"images\": [base64…]}, or one image/png|image/jpeg body")
        images = decode_images(files, info["input"]["size"][0], self.limits)
        _audit(request, info, len(images))
        return await self._predict("ultrasound", info, images)

    @api.post("/v1/genomic/generate", summary="DNA sequences sampled from the genomic GAN (JSON or FASTA)",
              openapi_extra=_body({"application/json": GenerateRequest}),
              responses={**_ERRORS, 200: {"content": {"application/json": {}, "text/x-fasta": {}}}})
    async def generate_genomic(self, request: Request) -> Response:
        info = await self._ready_model("genomic-gan")
        body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
        n, label, seed = parse_generate(body, info["labels"], bool(info["input"].get("conditional")), self.limits)
        _audit(request, info, n)
        try:
            seqs, labels = await _call_model(self.models["genomic-gan"], "genomic-gan", n, label, seed,
                                             method="generate")
        except (BackPressureError, ModelUnavailable, ReplicaUnreachable, DeploymentUnavailableError) as e:
            return _unavailable("genomic-gan", e)
        ids = [f"gen-{seed}-{i + 1}" for i in range(len(seqs))]
        if "text/x-fasta" in request.headers.get("accept", ""):
            text = "".join(f">{i}{' label=' + lab if lab else ''}\n{s}\n" for i, s, lab in zip(ids, seqs, labels))
            return Response(text, media_type="text/x-fasta")
        return _json({"sequences": [{"id": i, "sequence": s, "label": lab} for i, s, lab in zip(ids, seqs, labels)],
                      "model": {"name": info["name"], "version": info["version"]}})

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


# --------------------------------------------------------------------------- building the app


def bundle_task(path: str) -> str:
    """The task of a bundle, read from its bundle.json (no weights loaded)."""
    meta = Path(path) / META
    try:
        return json.loads(meta.read_text())["task"]
    except (OSError, ValueError, KeyError) as e:
        raise MedrayError(f"{path}: not a readable model bundle ({type(e).__name__}: {e})") from None


def build_app(args: dict):
    """Serve application builder (`import_path: serve.app:build_app`; Serve passes the config's
    `args`):
      bundles: {task: BUNDLE_DIR}                 tasks: exercise, ultrasound, genomic, genomic-gan
      limits: {max_body_bytes, max_instances, max_sequence_length, max_image_pixels}   (optional)
      auth: {tokens_file: PATH} | {enabled: false}   bearer tokens (on by default; serve/security.py)
      cors_origins: [ORIGIN, …]                   browser origins allowed to call (default: none)
      audit_log: PATH                             audit lines (default: the ingress replica's stderr)
    Relative paths are taken from the directory the builder runs in. Under `serve run`/`serve deploy`
    the config's `deployments:` settings apply on top."""
    return build(args)


def build(args: dict | None = None, deployment_options: dict[str, dict] | None = None):
    """The application, with `deployment_options` ({deployment name: options}) applied: how
    `medray serve` applies serve/config.yaml's deployment settings outside `serve run`."""
    args = dict(args or {})
    bundles = args.get("bundles") or {}
    if not isinstance(bundles, dict) or not bundles:
        raise ValueError("args.bundles must map task names to bundle directories, e.g. {exercise: bundles/exercise}")
    unknown = set(bundles) - set(MODEL_TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)} in args.bundles (known: {', '.join(MODEL_TASKS)})")
    unknown = set(args) - {"bundles", "limits", "auth", "cors_origins", "audit_log"}
    if unknown:
        raise ValueError(f"unknown application arg(s) {sorted(unknown)} (known: bundles, limits, auth, "
                         "cors_origins, audit_log)")
    Limits.from_dict(args.get("limits"))  # fail at build time, not in the replica
    security = {"auth": dict(args.get("auth") or {}), "cors_origins": list(args.get("cors_origins") or []),
                "audit_log": _absolute(args.get("audit_log"))}
    if security["auth"].get("tokens_file"):
        security["auth"]["tokens_file"] = _absolute(security["auth"]["tokens_file"])
    SecurityConfig.from_args(**security, configure_log=False)  # a missing tokens file fails here, not later
    opts = deployment_options or {}
    models = {}
    for task, path in bundles.items():
        cls = GeneratorServer if task == "genomic-gan" else ModelServer
        models[task] = cls.options(name=task, **opts.get(task, {})).bind(_absolute(path), task)
    return Gateway.options(name="ingress", **opts.get("ingress", {})).bind(models, args.get("limits"), security)


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().absolute())


def default_config() -> dict:
    """serve/config.yaml, the single place where deployment settings are kept."""
    import yaml

    return yaml.safe_load(resources.files("serve").joinpath("config.yaml").read_text())


def config_deployment_options(config: dict | None = None) -> dict[str, dict]:
    config = config or default_config()
    app = config["applications"][0]
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Block until GET {url}/readyz answers 200 (every model loaded)."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = e.read().decode(errors="replace")[:500]
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise MedrayError(f"the application at {url} did not become ready in {timeout_s:.0f}s: {last}")
