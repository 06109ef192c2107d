"""The ingress core both protocols share: the FastAPI app, the error mapping, body limits, and
the one path from parsed inputs to model outputs.

    HTTP ──▶ RequestMetricsMiddleware ──▶ SecurityMiddleware (auth, audit)
             ──▶ route (/v1: serve/v1.py, /v2: serve/v2.py)
             read_body (size, time limits) ──▶ serve/inputs.py validators (the same for both)
             ──▶ run_model: ingress batching ──▶ the model's copy in this replica, when it is idle
                                             (`local_models`: light models; no hop)
                                             ──handle──▶ model replica (serve/deployments.py) otherwise

* Errors: every refusal is a `RequestError` (serve/inputs.py), answered by `error_response` as
  `{"error": code, "detail": message}` with its status, whichever route or protocol raised it.
* `run_model` sends a request's inputs to its model (batched with concurrent requests in the
  ingress), sends again calls whose replica died, maps overload and unavailability to 503, and
  records the predictions in the metrics (serve/metrics.py).
* `GatewayBase` holds what the ingress replica knows (model handles, limits, model metadata);
  `router` has the routes that are not model protocols: /healthz, /readyz, /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections import Counter
from typing import Annotated

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from medray import __version__
from serve import metrics
from serve import security as security_config
from serve.deployments import (
    LoadedModel,
    ModelUnavailable,
    concat,
    favour_forward_thread,
    split,
    undo_worker_niceness,
)
from serve.inputs import Limits, RequestError
from serve.security import PUBLIC_PATHS, SecurityConfig, SecurityMiddleware, note

logger = logging.getLogger("ray.serve")

BATCH_HEADER = "X-Medray-Batch-Size"  # instances in the forward pass that served this request
RETRY_AFTER_S = 1
# Image requests with this many images skip batching in the ingress when the ingress holds no copy
# of the image model: they fill a forward pass on their own, and separate calls let the router spread
# them over the model's replicas. Measured: this tripled 64-image throughput at concurrency 8 (the
# 128×128 model, 2026-12-03), while the same rule for the light tabular and sequence models cut
# their 64-instance throughput by half or more (the extra hops cost more than their forward passes),
# so those always batch in the ingress. With the ingress's own copy (`local_models`) and the
# channels-last 64×64 network, batching wins for images too (2026-12-07, 64 images per request,
# images/s: concurrency 64 730 / 740 against 656 / 390 with direct calls; concurrency 8 561 / 663
# against 535 / 625; docs/serving.md), so there they batch: the queue feeds the ingress's copy when
# it is idle and the model's replicas otherwise.
DIRECT_CALL_IMAGES = 32
# A request for a light model held in the ingress (`local_models`) with at most this many instances
# runs its forward pass on the event loop: shorter than the hand-over to the forward thread and back
# (images always go to the thread: one takes milliseconds).
INLINE_INSTANCES = {"exercise": 8, "genomic": 8}
# Forward passes the ingress's copy of a model takes at once (one running, the rest waiting for its
# thread) before batches go to the model's replicas; models not listed: 1 (only an idle copy). For
# these, ingress batches are also capped at about one forward pass (`_size_batches`), so that the
# event loop parses the next requests while the copy's thread runs a pass. Measured 2026-12-07 in
# one ingress, switched on and off every 5 s (8 pairs, docs/serving.md): genomic, 64 sequences per
# request at concurrency 64, 1.34× the sequences/s (8 of 8 pairs); exercise, 64 windows per request,
# 0.96× (2 of 8): its passes are long enough that a busy copy does better handing them to the
# replicas, which bring another core. "Off" had the 2^18-value passes and the 1 ms switch interval
# (serve/deployments.py) in: with all three, whole benchmark runs match the code before them.
LOCAL_QUEUE = {"genomic": 2}
INGRESS_BATCH_REQUESTS = 64  # requests per ingress batch, at most


# --------------------------------------------------------------------------- the FastAPI app


class ErrorResponse(BaseModel):
    error: str
    detail: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 408, 413, 415, 422, 503)}

api = FastAPI(
    title="medray",
    version=__version__,
    description="Predictions from medray model bundles (exercise motion, ultrasound images, genomic DNA), "
    "over medray's own API (/v1) and the Open Inference Protocol (KServe v2, /v2; binary tensor extension). "
    "Errors are JSON `{\"error\": code, \"detail\": message}` with a 4xx status (503 when overloaded). "
    "Every route but /healthz, /readyz and /v2/health/* needs `Authorization: Bearer TOKEN` (401 without a "
    "valid token, 403 for a token not allowed that model).",
)
api.add_middleware(SecurityMiddleware)  # auth, CORS, request id, audit log: serve/security.py
api.add_middleware(metrics.RequestMetricsMiddleware)  # outermost: counts 401/403 answers too


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document, with the bearer-token scheme every route but the probes requires."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        for path in PUBLIC_PATHS:
            for op in doc["paths"].get(path, {}).values():
                op["security"] = []
        app.openapi_schema = doc
    return app.openapi_schema


# bound to the app object itself: Serve runs a copy of `api` (with the class-based routes), and
# the copy's document must come from the copy's routes
api.openapi = types.MethodType(_openapi, api)


def json_response(payload, status: int = 200, headers: dict | None = None,
                  response: type[Response] = Response) -> Response:
    return response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, code: str, detail: str, headers: dict | None = None,
           response: type[Response] = Response) -> Response:
    return json_response({"error": code, "detail": detail}, status, headers, response)


def error_response(e: RequestError) -> Response:
    """The answer to a refused request, the same on every route and protocol."""
    if e.code == "body_too_large":
        return _error(e.status, e.code, e.detail, {"Connection": "close"}, response=LingeringResponse)
    return _error(e.status, e.code, e.detail, e.headers)


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
    return error_response(e)


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


def audit(request: Request, info: dict, instances: int) -> None:
    """What the audit line records about a prediction: the model and how many instances, no content."""
    note(request, model=info["task"], model_name=info["name"], model_version=info["version"], instances=instances)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------- calls to the model replicas
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
UNAVAILABLE = (BackPressureError, ModelUnavailable, DeploymentUnavailableError)  # + ReplicaUnreachable


class ReplicaUnreachable(Exception):
    """A model's handle call failed on dead or unreachable replicas on every attempt."""

    def __init__(self, task: str, cause: BaseException):
        super().__init__(f"the {task} model's replicas could not be reached "
                         f"({type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''})")


def unavailable(task: str, e: Exception) -> RequestError:
    """503 for a model that cannot answer now. With Retry-After when retrying can help: a full
    queue (`overloaded`), replicas that died or are not deployed yet; without it for a bundle that
    failed to load (an operator must fix it; /readyz says why)."""
    if isinstance(e, ModelUnavailable):
        return RequestError(503, "model_unavailable", str(e))
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(e, BackPressureError):
        return RequestError(503, "overloaded", f"the {task} model's queue is full; retry after {RETRY_AFTER_S}s",
                            retry)
    detail = str(e) if isinstance(e, ReplicaUnreachable) else f"the {task} model is not deployed: {e.message}"
    return RequestError(503, "model_unavailable", f"{detail}; retry after {RETRY_AFTER_S}s", retry)


def _replica_gone(e: BaseException) -> bool:
    """Did the call fail because the replica serving it died or was unreachable (not because the
    model raised)? Such a call never produced a result, so sending it again is safe."""
    import grpc

    if isinstance(e, RayTaskError):  # a wrapped actor death; a model's own exception is not retried
        return isinstance(getattr(e, "cause", None), RayActorError)
    return isinstance(e, (RayActorError, ReplicaUnavailableError, grpc.aio.AioRpcError))


async def call_model(handle, task: str, *args, method: str = "predict"):
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


async def run_model(gateway, task: str, info: dict, inputs) -> tuple[np.ndarray, int]:
    """(probabilities (n, K), instances in the forward pass) for one request's validated inputs:
    the one way from a route to a model, for every protocol. Raises RequestError 503 when the
    model cannot answer now; counts the predictions (instances, labels) in the metrics."""
    try:
        if task == "ultrasound" and task not in gateway.local and len(inputs) >= DIRECT_CALL_IMAGES:
            # its own call, to any replica
            probs, batch = await call_model(gateway.models[task], task, inputs)
        elif await gateway._alone(task, len(inputs)):  # a lone small request: no batch queue
            probs, batch = await gateway.local[task].forward(inputs, inline=True), len(inputs)
        else:
            probs, batch = await gateway._batched(task, inputs)
    except (*UNAVAILABLE, ReplicaUnreachable) as e:
        raise unavailable(task, e) from None
    metrics.record_predictions(task, probs, info["labels"])
    return probs, batch


async def generate(gateway, n: int, label: str | None, seed: int) -> tuple[list[str], list]:
    """(sequences, labels) from the genomic GAN; 503 like `run_model`."""
    try:
        out = await call_model(gateway.models["genomic-gan"], "genomic-gan", n, label, seed, method="generate")
    except (*UNAVAILABLE, ReplicaUnreachable) as e:
        raise unavailable("genomic-gan", e) from None
    metrics.record_generated("genomic-gan", len(out[0]))
    return out


# --------------------------------------------------------------------------- the ingress replica


class GatewayBase:
    """What an ingress replica holds (model handles, limits, model metadata) and does for every
    protocol; serve/app.py makes it (with serve/v1.py's helpers) the `ingress` deployment."""

    def __init__(self, models: dict, limits: dict | None = None, security: dict | None = None,
                 local_models: dict[str, str] | None = None):
        undo_worker_niceness()
        self.models = dict(models)
        self.limits = Limits.from_dict(limits)
        security_config.install(SecurityConfig.from_args(**(security or {})))  # read by SecurityMiddleware
        self._info: dict[str, dict] = {}
        # {task: LoadedModel}: light models this replica also holds (serve/config.yaml `local_models`)
        self.local = {task: LoadedModel(path, task) for task, path in (local_models or {}).items()}
        if self.local:
            favour_forward_thread()
        self._arrivals: Counter[str] = Counter()  # requests per model that reached `run_model` (`_alone`)
        self._batching: Counter[str] = Counter()  # ... and are on the batch path now
        self._woken: dict[str, asyncio.Task] = {}  # local model -> its deployment's wake-up call (`_wake`)
        self._per_request: dict[str, float] = {}  # running mean of instances per batched request (`_size_batches`)
        self._batch_cap: dict[str, int] = {}  # the requests per ingress batch set from it

    # ---- model metadata (fetched from the replicas, so it is what they actually loaded)

    async def model_info(self, task: str, timeout_s: float = 10.0) -> dict:
        """What the model loaded: this replica's own copy when it holds one (so the ingress is
        ready without waiting for the model's deployment), else the deployment's replicas'."""
        if task in self._info:
            return self._info[task]
        if task in self.local:
            info = self.local[task].info()
            self._wake(task)
        else:
            try:
                info = await asyncio.wait_for(self.models[task].info.remote(), timeout_s)
            except (asyncio.TimeoutError, Exception) as e:  # deployment still starting or gone
                return {"ready": False, "error": f"model deployment not reachable: {type(e).__name__}: {e}"[:500]}
        if info.get("ready"):
            self._info[task] = info
        return info

    def _wake(self, task: str) -> None:
        """Ask a local model's deployment for its info once, in the background. Its replicas may
        start at zero (serve/config.yaml: they start after the ingress, not beside it, which makes
        a 2-core machine ready ~5 s sooner); a request to a deployment with no replica makes Serve
        start one at once, so they are up a few seconds after the ingress answers its first probe."""
        if task in self._woken:
            return

        async def ask():
            try:
                await self.models[task].info.remote()
            except Exception as e:  # noqa: BLE001 - only a wake-up: requests report their own errors
                logger.warning("%s: its deployment did not answer the wake-up call: %s: %s", task, type(e).__name__, e)

        self._woken[task] = asyncio.get_running_loop().create_task(ask())

    async def _ready_model(self, task: str) -> dict:
        if task not in self.models:
            raise RequestError(404, "model_not_deployed",
                               f"no {task} model is deployed here (deployed: {', '.join(self.models) or 'none'})")
        info = await self.model_info(task)
        if not info.get("ready"):
            raise RequestError(503, "model_unavailable", f"{task} model is not available: {info.get('error')}")
        return info

    async def _read_body(self, request: Request) -> bytes:
        return await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)

    # ---- a lone request for a light model: its forward pass at once, on the event loop
    # The batch queue below (a queue, a batch task, a future) cost a lone request 0.2-0.3 ms of its
    # 1.3-1.9 ms at concurrency 1 (A/B in docs/serving.md). A request is alone when the local model
    # is idle, nothing is on the batch path, and no other request for the model arrives while it
    # yields to the event loop once: under load the others, already parsed, arrive then and batch.

    async def _alone(self, task: str, n: int) -> bool:
        self._arrivals[task] += 1
        local = self.local.get(task)
        if local is None or n > INLINE_INSTANCES.get(task, 0) or not local.idle or self._batching[task]:
            return False
        seen = self._arrivals[task]
        await asyncio.sleep(0)  # every request ready to run gets this far first (and counts itself)
        return self._arrivals[task] == seen and local.idle and not self._batching[task]

    async def _batched(self, task: str, inputs) -> tuple[np.ndarray, int]:
        """`inputs` through the model's batch queue, counted in `_batching` while there."""
        if task in LOCAL_QUEUE:
            self._size_batches(task, len(inputs))
        self._batching[task] += 1
        try:
            return await getattr(self, f"_batch_{task}")(inputs)
        finally:
            self._batching[task] -= 1

    def _size_batches(self, task: str, n: int) -> None:
        """Cap the requests per ingress batch at about one forward pass of the local copy
        (`Bundle.chunk_rows` instances, over a running mean of the instances per request): 64
        requests of one sequence, 17 of 64. A batch of every waiting request left the event loop
        idle during the pass (each client was waiting on it) and the copy's thread idle while the
        loop parsed the next round."""
        local = self.local.get(task)
        if local is None or local.bundle is None:
            return
        mean = self._per_request[task] = 0.9 * self._per_request.get(task, n) + 0.1 * n
        cap = max(1, min(INGRESS_BATCH_REQUESTS, int(local.bundle.chunk_rows / max(mean, 1.0))))
        if cap != self._batch_cap.get(task, INGRESS_BATCH_REQUESTS):
            getattr(self, f"_batch_{task}").set_max_batch_size(cap)
            self._batch_cap[task] = cap

    # ---- batching in the ingress: concurrent requests for a model share one handle call
    # (the model replica batches again across ingress replicas). A handle call costs far more
    # than parsing a small request, so without this the ingress → model hop caps throughput.

    @serve.batch(max_batch_size=INGRESS_BATCH_REQUESTS, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _batch_exercise(self, items: list) -> list:
        return await self._forward("exercise", items)

    @serve.batch(max_batch_size=INGRESS_BATCH_REQUESTS, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _batch_ultrasound(self, items: list) -> list:
        return await self._forward("ultrasound", items)

    @serve.batch(max_batch_size=INGRESS_BATCH_REQUESTS, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _batch_genomic(self, items: list) -> list:
        return await self._forward("genomic", items)

    async def _forward(self, task: str, items: list) -> list:
        """One forward pass for a batch of requests: by this replica's copy of the model when it
        holds one and it is idle, or has fewer than LOCAL_QUEUE passes under way or waiting (no
        hop: a lone request costs what it costs a plain server), else by the model's deployment
        (its replicas add cores when requests come faster than one forward pass at a time answers
        them)."""
        joined = concat(items)
        local = self.local.get(task)
        if local is not None and local.bundle is not None and local.busy < LOCAL_QUEUE.get(task, 1):
            inline = local.idle and len(joined) <= INLINE_INSTANCES.get(task, 0)  # never beside the thread's pass
            probs, batch = await local.forward(joined, inline=inline), len(joined)
        else:
            probs, batch = await call_model(self.models[task], task, joined)
        return split(probs, [len(x) for x in items], batch)

    async def readiness(self) -> tuple[bool, dict]:
        infos = await asyncio.gather(*(self.model_info(t, timeout_s=2.0) for t in self.models))
        models = {t: ({"ready": True} if i.get("ready") else {"ready": False, "error": i.get("error")})
                  for t, i in zip(self.models, infos)}
        return bool(models) and all(m["ready"] for m in models.values()), models


async def current_gateway() -> GatewayBase:  # async: FastAPI runs a plain def in a thread
    """The ingress replica serving this request (what Serve's class-based views inject as `self`)."""
    return serve.get_replica_context().servable_object


# Routes are plain functions on APIRouters (this module's, serve/v1.py's, serve/v2.py's; serve/app.py
# includes them), given the replica by this dependency: their signatures are their own, so they
# survive being pickled by reference to the replicas.
Ingress = Annotated[GatewayBase, Depends(current_gateway)]
router = APIRouter()


@router.get("/healthz", summary="liveness: the ingress answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="readiness: every model deployment has loaded its bundle",
            responses={503: {"description": "a model is not loaded; the body says which and why"}})
async def readyz(gw: Ingress) -> Response:
    ready, models = await gw.readiness()
    return json_response({"ready": ready, "models": models}, 200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics of the medray application (summed over the Ray cluster)",
            response_class=Response, responses={200: {"content": {metrics.CONTENT_TYPE: {}}}})
async def prometheus_metrics() -> Response:
    return Response(await metrics.exposition(), media_type=metrics.CONTENT_TYPE)
