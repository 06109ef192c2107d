"""`medray serve BUNDLE_DIR…`: the Serve application of serve/app.py on a local Ray instance
(or an existing cluster), with the deployment settings of serve/config.yaml."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from medray.errors import MedrayError

# Ray Serve's throughput mode (Ray >= 2.56): user code on the replica's event loop, gRPC between
# deployments, buffered request-path logging, and "direct ingress" (the ingress replica listens
# on the HTTP port itself: no proxy hop). These are read when Serve's processes start, so they
# must be in the environment of the process that starts Ray. Measured in benchmarks/.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def throughput_env(port: int) -> dict[str, str]:
    """Environment for a local Ray instance whose Serve runs in throughput mode with the ingress
    replica listening on `port` itself (the first port of the direct-ingress range)."""
    return dict(THROUGHPUT_ENV, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port),
                RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + 16))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bundles_by_task(bundle_dirs: list[str]) -> dict[str, str]:
    from serve.app import MODEL_TASKS, bundle_task

    out: dict[str, str] = {}
    for b in bundle_dirs:
        task = bundle_task(b)
        if task not in MODEL_TASKS:
            raise MedrayError(f"{b}: task {task!r} cannot be served (known: {', '.join(MODEL_TASKS)})")
        if task in out:
            raise MedrayError(f"two bundles for task {task!r}: {out[task]} and {b} (one per task)")
        out[task] = str(Path(b).absolute())
    return out


def start(bundles: dict[str, str], host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          throughput_optimized: bool = True, config: dict | None = None, name: str = "medray",
          tokens_file: str | None = None, no_auth: bool = False, audit_log: str | None = None,
          wait: bool = True) -> str:
    """Deploy the application and wait until every model is loaded (`wait=False`: return once it is
    deployed, e.g. to inspect a model that fails to load through /readyz); returns its base URL.
    `config` (default serve/config.yaml) gives the deployment settings and the app args (limits,
    auth, cors_origins, audit_log); `tokens_file`, `no_auth` and `audit_log` override those."""
    from serve.app import build, config_deployment_options, default_config, wait_ready

    config = config or default_config()
    args = dict(config["applications"][0].get("args") or {}, bundles=bundles)
    if no_auth:
        print("[medray] WARNING: authentication is off (--no-auth): anyone who can reach the port can call every "
              "model. For local development only.", file=sys.stderr)
        args["auth"] = {"enabled": False}
    elif tokens_file:
        args["auth"] = {"tokens_file": tokens_file}
    if audit_log:
        args["audit_log"] = audit_log
    proxy_port = port
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if throughput_optimized and local:
        for k, v in throughput_env(port).items():
            os.environ.setdefault(k, v)
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" and local:
        first = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", 30000))
        if first != port:
            raise MedrayError(f"Ray here was started for port {first} (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT); "
                              f"serve on that port or start a new process")
        proxy_port = _free_port(host)  # Serve's proxy is only a fallback path with direct ingress
    from medray.ray_runtime import ensure_ray

    ensure_ray(address)
    from ray import serve

    serve.start(http_options={"host": host, "port": proxy_port}, logging_config=config.get("logging_config"))
    options = config_deployment_options(config)
    if proxy_port != port:  # direct ingress: one ingress replica owns the port
        options["ingress"] = dict(options.get("ingress", {}), num_replicas=1, autoscaling_config=None)
    app = build(args, options)
    serve.run(app, name=name, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    if wait:
        wait_ready(url)
    return url


def serve_bundles(bundle_dirs: list[str], host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                  throughput_optimized: bool = True, config_path: str | None = None, tokens_file: str | None = None,
                  no_auth: bool = False, audit_log: str | None = None) -> None:
    bundles = bundles_by_task(bundle_dirs)
    config = None
    if config_path:
        import yaml

        try:
            config = yaml.safe_load(Path(config_path).read_text())
            config["applications"][0]
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as e:
            raise MedrayError(f"{config_path}: not a Serve config with an application ({type(e).__name__}: {e})") \
                from None
    url = start(bundles, host, port, address, throughput_optimized, config=config, tokens_file=tokens_file,
                no_auth=no_auth, audit_log=audit_log)
    print(f"[medray] serving {', '.join(bundles)} at {url}  (API docs: {url}/docs; Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
