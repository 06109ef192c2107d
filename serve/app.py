"""The medray Ray Serve application: one deployment per model bundle behind one FastAPI ingress.

    HTTP ──▶ ingress (Gateway: /v1, /v2, /metrics) ──handle──▶ exercise   (ModelServer)
                                                   ──handle──▶ ultrasound (ModelServer)
                                                   ──handle──▶ genomic    (ModelServer)
                                                   ──handle──▶ genomic-gan (GeneratorServer)

The models named in `local_models` (default: all three classifiers) are also loaded in each
ingress replica, which answers with its own copy while that copy is idle: a lone request skips the
ingress → replica hop, the largest part of its latency. Requests that arrive while it is busy go
to the model's deployment, whose replicas scale out as before.

This module builds the application; each concern has its own module:

    serve/deployments.py   the model deployments (ModelServer, GeneratorServer)
    serve/gateway.py       the ingress core: FastAPI app, error mapping, body limits, `run_model`
                           (the one way from validated inputs to a model), /healthz, /readyz, /metrics
    serve/v1.py            medray's own API (/v1)
    serve/v2.py            the Open Inference Protocol (KServe v2, /v2), binary tensors included
    serve/inputs.py        request content → model inputs, every limit and 4xx (shared by /v1 and /v2)
    serve/security.py      tokens, per-model authorization, audit log, CORS
    serve/metrics.py       Prometheus metrics (ray.util.metrics) and GET /metrics

Entry points: `serve run serve/config.yaml` / `serve deploy serve/config.yaml` (import path
`serve.app:build_app`, args `bundles`, `limits`, …), and `medray serve BUNDLE_DIR…`, which builds
the same application with the deployment settings of `serve/config.yaml`.
"""

import time
from importlib import resources
from pathlib import Path

from ray import serve

from medray.bundle_meta import read_meta
from medray.errors import MedrayError
from medray.tasks import SERVED_TASKS, TASKS  # TASKS: the classifiers, what an ingress can also hold
from serve.deployments import GeneratorServer, ModelServer, ModelUnavailable  # noqa: F401 - re-exported
from serve.gateway import (  # noqa: F401 - re-exported: the names this module had before the split
    BATCH_HEADER,
    DIRECT_CALL_IMAGES,
    REPLICA_RETRY_BACKOFF_S,
    RETRY_AFTER_S,
    GatewayBase,
    ReplicaUnreachable,
    api,
    read_body,
)
from serve.gateway import call_model as _call_model  # noqa: F401
from serve import gateway, v1, v2
from serve.inputs import Limits
from serve.security import SecurityConfig
from serve.v1 import V1Routes

MODEL_TASKS = SERVED_TASKS
APP_ARGS = ("bundles", "limits", "auth", "cors_origins", "audit_log", "metrics", "local_models")


for _router in (gateway.router, v1.router, v2.router):  # /healthz /readyz /metrics, then /v1, then /v2
    api.include_router(_router)


@serve.deployment(
    max_ongoing_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(api)
class Gateway(V1Routes, GatewayBase):
    """The ingress deployment: GatewayBase's state and batching, /v1's helpers; the routes are the
    routers included in `api` above (each gets this replica through `gateway.Ingress`)."""


# --------------------------------------------------------------------------- building the app


def bundle_task(path: str) -> str:
    """The task of a bundle, read from its bundle.json (no weights loaded, no torch imported: the
    driver that deploys the application never needs it)."""
    return read_meta(path)["task"]


def build_app(args: dict):
    """Serve application builder (`import_path: serve.app:build_app`; Serve passes the config's
    `args`):
      bundles: {task: BUNDLE_DIR}                 tasks: exercise, ultrasound, genomic, genomic-gan
      limits: {max_body_bytes, max_instances, max_sequence_length, max_image_pixels}   (optional)
      auth: {tokens_file: PATH} | {enabled: false}   bearer tokens (on by default; serve/security.py)
      cors_origins: [ORIGIN, …]                   browser origins allowed to call (default: none)
      audit_log: PATH                             audit lines (default: the ingress replica's log)
      metrics: {public: false}                    GET /metrics without a token when public is true
      local_models: [exercise, genomic, …]        models also loaded in the ingress, answering there
                                                  while idle (no hop); [] = always through their replicas
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
    unknown = set(args) - set(APP_ARGS)
    if unknown:
        raise ValueError(f"unknown application arg(s) {sorted(unknown)} (known: {', '.join(APP_ARGS)})")
    local = args.get("local_models") or []
    if not isinstance(local, list) or set(local) - set(TASKS):
        raise ValueError(f"args.local_models: expected a list of the classifiers {', '.join(TASKS)}, got {local!r}")
    Limits.from_dict(args.get("limits"))  # fail at build time, not in the replica
    metrics = dict(args.get("metrics") or {})
    if set(metrics) - {"public"} or not isinstance(metrics.get("public", False), bool):
        raise ValueError(f"args.metrics: expected {{public: true|false}}, got {metrics}")
    security = {"auth": dict(args.get("auth") or {}), "cors_origins": list(args.get("cors_origins") or []),
                "audit_log": _absolute(args.get("audit_log")), "public_metrics": metrics.get("public", False)}
    if security["auth"].get("tokens_file"):
        security["auth"]["tokens_file"] = _absolute(security["auth"]["tokens_file"])
    SecurityConfig.from_args(**security, configure_log=False)  # a missing tokens file fails here, not later
    opts = deployment_options or {}
    models = {}
    for task, path in bundles.items():
        cls = GeneratorServer if task == "genomic-gan" else ModelServer
        models[task] = cls.options(name=task, **opts.get(task, {})).bind(_absolute(path), task)
    local_models = {task: _absolute(bundles[task]) for task in local if task in bundles}
    return Gateway.options(name="ingress", **opts.get("ingress", {})).bind(models, args.get("limits"), security,
                                                                            local_models)


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
    """Block until GET {url}/readyz answers 200 (every model loaded). Each poll is a keep-alive
    request whose connection this side closes: a connection the server closes (what urllib's
    `Connection: close` asks for) lingers in TIME_WAIT on the server's port for a minute, and on
    Linux such connections keep the next server from binding that port."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        conn = http.client.HTTPConnection(where.hostname, where.port or 80, timeout=5)
        try:
            conn.request("GET", "/readyz")
            r = conn.getresponse()
            body = r.read()
            if r.status == 200:
                return
            last = body.decode(errors="replace")[:500]
        except OSError as e:
            last = str(e)
        finally:
            conn.close()
        time.sleep(0.5)
    raise MedrayError(f"the application at {url} did not become ready in {timeout_s:.0f}s: {last}")
