"""Who may call which model, what is recorded about it, and which browsers may call at all.

* **Tokens** (`TokenStore`): a tokens file holds one bearer token per line, optionally followed
  by the task names it may call (`exercise`, `ultrasound`, `genomic`, `genomic-gan`; none = all):
  the model's /v1 routes and its /v2/models/{model}/… routes (`route_task`).
  Blank lines and `#` comments are ignored. Only SHA-256 digests are kept in memory; a presented
  token is hashed and compared with `hmac.compare_digest` against every entry (no early exit),
  so timing does not reveal how much of a token matched. The file is re-read when it changes
  (a rotated Kubernetes Secret reaches running replicas without a restart).
* **Caller identity** in logs is `token:<first 12 hex digits of the token's SHA-256>`: stable,
  and useless to an attacker who reads the log. `medray token` prints a new token with its id.
* **Audit log** (`medray.audit` logger): one JSON line per authenticated-route request — request
  id, time, caller, route, model name and version, instance count, HTTP status, outcome code,
  latency. Never a body, image, sequence or feature value.
* **CORS** is closed unless `cors_origins` lists origins: no `Access-Control-Allow-*` header is
  ever sent to another origin, so browsers refuse cross-origin reads.

`SecurityMiddleware` is a plain ASGI middleware (no per-request Starlette `Request` objects on
the hot path): it answers 401/403 before the body is read, and writes the audit line after the
response. Route handlers add what only they know (model, instance count) via `note()`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import orjson

from medray.errors import MedrayError
from medray.tasks import SERVED_TASKS as MODEL_TASKS

# probes: no token, no audit line (/metrics joins them when the app's `metrics.public` is set)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
METRICS_PATH = "/metrics"
ROUTE_TASKS = {
    "/v1/exercise/predict": "exercise",
    "/v1/ultrasound/predict": "ultrasound",
    "/v1/genomic/predict": "genomic",
    "/v1/genomic/generate": "genomic-gan",
}
# Open Inference Protocol: /v2/models/{model}[/versions/{version}][/ready|/infer]
V2_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/infer)?$")
V2_PATHS = frozenset({"/v2", "/v2/health/live", "/v2/health/ready"})
OUTCOMES = {413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_input", 503: "unavailable",
            500: "server_error"}  # outcome when the route did not name one (see note())
MIN_TOKEN_CHARS = 16
RELOAD_CHECK_S = 5.0
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

audit_logger = logging.getLogger("medray.audit")


def route_task(path: str) -> str | None:
    """The model a path belongs to (its token must be allowed that model), if any."""
    task = ROUTE_TASKS.get(path)
    if task is None and path.startswith("/v2/models/"):
        m = V2_MODEL_PATH.match(path)
        if m and m.group(1) in MODEL_TASKS:
            task = m.group(1)
    return task


def inference_route(path: str) -> tuple[str, str] | None:
    """(model, protocol) of a prediction (or generation) route; None for every other path."""
    task = ROUTE_TASKS.get(path)
    if task is not None:
        return task, "v1"
    if path.endswith("/infer") and path.startswith("/v2/models/"):
        m = V2_MODEL_PATH.match(path)
        if m and m.group(1) in MODEL_TASKS:
            return m.group(1), "v2"
    return None


def audit_route(path: str) -> str:
    """The route an audit line names: the path of a known route, "other" for anything else (a
    client's made-up path is not copied into the log)."""
    known = path in ROUTE_TASKS or path in V2_PATHS or path == METRICS_PATH
    if known or path.startswith(("/v1/", "/docs", "/openapi")) or route_task(path) is not None:
        return path[:200]
    return "other"


def token_id(token: str) -> str:
    """The caller identity written to logs for a token (not the token)."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    id: str
    models: frozenset | None  # None: every model

    def may_call(self, task: str) -> bool:
        return self.models is None or task in self.models


def parse_tokens(text: str, source: str = "tokens file") -> list[tuple[bytes, Caller]]:
    entries, seen = [], set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        token, *models = line.split()
        if len(token) < MIN_TOKEN_CHARS:
            raise MedrayError(f"{source}, line {n}: token is shorter than {MIN_TOKEN_CHARS} characters "
                              "(make one with `medray token`)")
        unknown = [m for m in models if m not in MODEL_TASKS]
        if unknown:
            raise MedrayError(f"{source}, line {n}: unknown model name(s) {unknown} (known: {', '.join(MODEL_TASKS)})")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in seen:
            raise MedrayError(f"{source}, line {n}: the same token appears twice")
        seen.add(digest)
        entries.append((digest, Caller(token_id(token), frozenset(models) if models else None)))
    if not entries:
        raise MedrayError(f"{source}: holds no tokens (one per line, optionally followed by model names)")
    return entries


class TokenStore:
    """The tokens of a tokens file, re-read when the file changes (checked every few seconds)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = None
        self._checked = 0.0
        self._entries = self._read()  # a missing or bad file fails here, at startup

    def _read(self) -> list[tuple[bytes, Caller]]:
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except OSError as e:
            raise MedrayError(f"tokens file {self.path}: cannot read it ({e.strerror}); make one with "
                              "`medray token > FILE` and pass --tokens-file FILE (or args.auth.tokens_file)") from None
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return parse_tokens(text, f"tokens file {self.path}")

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()
                if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                    self._entries = self._read()
                    audit_logger.warning("tokens file %s re-read: %d tokens", self.path, len(self._entries))
            except MedrayError as e:  # keep the last good tokens rather than lock everyone out
                audit_logger.error("tokens file not re-read, keeping the previous tokens: %s", e)
            except OSError:
                pass

    def authenticate(self, token: str | None) -> Caller | None:
        self._maybe_reload()
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, caller in self._entries:  # every entry is compared: constant time in the match
            if hmac.compare_digest(known, digest):
                found = caller
        return found


@dataclass
class SecurityConfig:
    tokens: TokenStore | None  # None: authentication off (--no-auth)
    cors_origins: frozenset
    audit: bool = True
    public_paths: frozenset = PUBLIC_PATHS  # + /metrics when metrics are public

    @classmethod
    def from_args(cls, auth: dict | None, cors_origins=None, audit_log: str | None = None,
                  configure_log: bool = True, public_metrics: bool = False) -> "SecurityConfig":
        auth = dict(auth or {})
        unknown = set(auth) - {"enabled", "tokens_file"}
        if unknown:
            raise ValueError(f"unknown auth setting(s) {sorted(unknown)} (known: enabled, tokens_file)")
        tokens = None
        if auth.get("enabled", True):
            if not auth.get("tokens_file"):
                raise MedrayError("authentication is on by default: give a tokens file (args.auth.tokens_file in "
                                  "the Serve config, or `medray serve --tokens-file FILE`; make tokens with "
                                  "`medray token`), or switch it off for local development (auth: {enabled: false}, "
                                  "or `medray serve --no-auth`)")
            tokens = TokenStore(auth["tokens_file"])
        elif configure_log:
            audit_logger.warning("AUTHENTICATION IS OFF: every caller can use every model (local development only)")
        origins = cors_origins or []
        if isinstance(origins, str) or not all(isinstance(o, str) for o in origins):
            raise ValueError("cors_origins must be a list of origins, e.g. [https://app.hospital.example]")
        if "*" in origins:
            raise ValueError("cors_origins: '*' is not allowed; list the origins of the apps that call the API")
        if configure_log:
            configure_audit_log(audit_log)
        public = PUBLIC_PATHS | {METRICS_PATH} if public_metrics else PUBLIC_PATHS
        return cls(tokens, frozenset(o.rstrip("/") for o in origins), public_paths=public)


_installed: SecurityConfig | None = None


def install(config: SecurityConfig) -> None:
    """Make `config` the settings of every SecurityMiddleware in this process (the ingress replica
    calls this: the app Serve runs is its own copy of the FastAPI app, not the module's)."""
    global _installed
    _installed = config


class _ToLogger(logging.Handler):
    """Each record's message, logged at INFO by `target` (where the replica's stderr lines go)."""

    def __init__(self, target: logging.Logger):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.info(self.format(record))


def configure_audit_log(path: str | None) -> None:
    """Audit lines go to `path` (appended; one JSON object per line) or, by default, to stderr
    (the replica's log; on Kubernetes, the pod's log collection)."""
    for h in list(audit_logger.handlers):
        audit_logger.removeHandler(h)
        h.close()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    elif isinstance(getattr(sys.stderr, "_logger", None), logging.Logger):
        # in a Serve replica, sys.stderr is Serve's StreamToLogger, which walks the whole stack
        # (traceback.extract_stack, twice) for every line: hand the line to its logger directly
        handler = _ToLogger(sys.stderr._logger)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit_logger.addHandler(handler)
    audit_logger.setLevel(logging.INFO)
    audit_logger.propagate = False  # not through Ray's loggers (their level and format are not ours)


def note(request, **fields) -> None:
    """Add audit fields known only inside a route (model, version, instances). Never patient data."""
    state = request.scope.get("state")
    if state is not None and "medray_audit" in state:
        state["medray_audit"].update(fields)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _bearer(scope) -> str | None:
    value = _header(scope, b"authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class SecurityMiddleware:
    """ASGI middleware: request id, CORS, authentication and authorization, audit log.
    Reads its settings from `app.state.security`, else from `install()` (the ingress's)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config: SecurityConfig | None = getattr(scope["app"].state, "security", None) if "app" in scope else None
        config = config or _installed
        path = scope.get("path", "")
        given = _header(scope, b"x-request-id")
        request_id = given if given and REQUEST_ID.match(given) else uuid.uuid4().hex
        origin = _header(scope, b"origin")
        cors = origin is not None and config is not None and origin.rstrip("/") in config.cors_origins
        # Serve passes its request id (the client's X-Request-Id when valid) in the request and
        # echoes it in the response; only an id made here needs adding
        extra = [] if given == request_id else [(b"x-request-id", request_id.encode())]
        if cors:
            extra += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]

        if config is None:  # the ingress has not configured security: refuse rather than serve open
            return await _reply(send, 503, "not_ready", "the ingress is starting", extra)
        if scope["method"] == "OPTIONS" and origin is not None:  # CORS preflight
            if not cors:
                return await _reply(send, 403, "cors_forbidden", "cross-origin requests from this origin are not "
                                    "allowed (serve config: cors_origins)", extra)
            allow = [(b"access-control-allow-methods", b"GET, POST"),
                     (b"access-control-allow-headers", b"authorization, content-type, x-request-id"),
                     (b"access-control-max-age", b"600")]
            return await _reply(send, 204, None, None, extra + allow)
        if path in config.public_paths:
            return await self.app(scope, receive, _with_headers(send, extra))

        started = time.perf_counter()
        record = {"request_id": request_id, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                  "caller": None, "method": scope["method"], "route": audit_route(path)}
        task = route_task(path)
        status = {"code": None}
        try:
            if config.tokens is not None:
                token = _bearer(scope)
                caller = config.tokens.authenticate(token)
                if caller is None:
                    record["outcome"] = "unauthenticated"
                    status["code"] = 401
                    why = "missing bearer token" if not token else "invalid token"
                    return await _reply(send, 401, "unauthenticated", f"{why}: send 'Authorization: Bearer TOKEN'",
                                        extra + [(b"www-authenticate", b'Bearer realm="medray"')])
                record["caller"] = caller.id
                if task is not None and not caller.may_call(task):
                    record["outcome"] = "forbidden"
                    record["model"] = task
                    status["code"] = 403
                    return await _reply(send, 403, "forbidden", f"this token may not call the {task} model", extra)
            else:
                record["caller"] = "anonymous (auth off)"
            if task is not None:
                record["model"] = task
            scope.setdefault("state", {})["medray_audit"] = record

            async def capture(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            await self.app(scope, receive, _with_headers(capture, extra))
        finally:
            if config.audit:
                record["status"] = status["code"] if status["code"] is not None else 500
                record.setdefault("outcome", "ok" if record["status"] < 400 else OUTCOMES.get(record["status"], "error"))
                record["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
                audit_logger.info(orjson.dumps(record).decode())


def _with_headers(send, extra: list[tuple[bytes, bytes]]):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message["headers"] = list(message.get("headers", [])) + extra
        await send(message)

    return wrapped


async def _reply(send, status: int, code: str | None, detail: str | None, headers: list) -> None:
    body = orjson.dumps({"error": code, "detail": detail}) if code else b""
    hdrs = [(b"content-length", str(len(body)).encode())] + list(headers)
    if body:
        hdrs.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})
