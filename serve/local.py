"""`medray serve BUNDLE_DIR…`: the Serve application of serve/app.py on a local Ray instance
(or an existing cluster), with the deployment settings of serve/config.yaml."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
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
                RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + 16),
                # an ingress replica stays open at least this long when it stops, for an external
                # load balancer to deregister it (Serve's default 30 s, past serve.shutdown's own 30-s
                # wait: every stop took 31 s and ended in a forced kill). `medray serve` has no load
                # balancer in front; requests in flight are still drained (graceful_shutdown_timeout_s)
                RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="2")


def _tcp_sockets(port: int) -> list[tuple[str, str]]:
    """(state, inode) of the TCP sockets on local `port`, from /proc/net/tcp* (Linux; none
    elsewhere). States: "0A" LISTEN, "06" TIME_WAIT."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.append((f[3], f[9]))
    return found


def port_holder(port: int) -> str | None:
    """Who listens on TCP `port` here: "pid N (command)" from /proc (Linux), "another process"
    when it is not visible to this user, None when nobody does."""
    inodes = {f"socket:[{inode}]" for state, inode in _tcp_sockets(port) if state == "0A"}
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {proc.name} ({cmd[:120]})"
        except OSError:
            continue
    return "another process"


def check_port(host: str, port: int) -> None:
    """Fail at once, naming who holds it, when `port` cannot be listened on (before Ray starts:
    Serve would otherwise bind the next free port of its range, or wait and time out). Bound with
    SO_REUSEADDR; Serve's direct-ingress socket sets no SO_REUSEADDR (Ray 2.58,
    `http_util.start_asgi_http_server`), so connections in TIME_WAIT that an earlier server closed
    itself refuse its bind for up to a minute after that server stopped: they are waited for."""
    deadline, said = time.time() + TIME_WAIT_MAX_S, False
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError as e:
                who = port_holder(port)
                # connections an earlier server closed itself linger in TIME_WAIT for a minute and
                # were seen to refuse the bind even with SO_REUSEADDR or SO_REUSEPORT (and Serve's own
                # bind with them): a restart on the same port (systemd, a process manager) waits
                if who is None and _closing_connections(port) and time.time() < deadline:
                    if not said:
                        print(f"[medray] port {port}: connections of the previous server are closing "
                              f"(TIME_WAIT); waiting for them (at most {TIME_WAIT_MAX_S:.0f} s)…", file=sys.stderr)
                        said = True
                    time.sleep(0.5)
                    continue
                held = f"in use by {who}" if who else f"not available ({e.strerror})"
                raise MedrayError(f"port {port} on {host} is {held}: stop that or serve on another port (--port)") \
                    from None


TIME_WAIT_MAX_S = 75.0  # Linux keeps TIME_WAIT for 60 s


def _closing_connections(port: int) -> bool:
    """Whether TCP connections on local `port` are in TIME_WAIT."""
    return any(state == "06" for state, _ in _tcp_sockets(port))


def free_port(host: str = "127.0.0.1", span: int = 1) -> int:
    """A port P on `host` with P..P+span-1 free now (span 17: a direct-ingress range), drawn from
    20000-29999: outside Linux's ephemeral range (32768-60999), where any outgoing connection made
    later (Ray's gRPC, a load test) may take a port picked now, and outside Ray's worker ports
    (10002-19999). Once seen in CI: the serving tests' port, picked from the ephemeral range, was
    held by a client socket 15 minutes later, and Serve's ingress moved to the next port of its
    range. Used by `medray serve` (its fallback proxy's port), the tests and the benchmarks."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000 - span)
        try:
            for p in range(port, port + span):
                with socket.socket() as s:
                    s.bind((host, p))
        except OSError:
            continue
        return port
    raise MedrayError(f"no {span} free consecutive port(s) in 20000-29999 on {host}")


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
          wait: bool = True, stop_signals: "StopSignals | None" = None) -> str:
    """Deploy the application and wait until every model is loaded (`wait=False`: return once it is
    deployed, e.g. to inspect a model that fails to load through /readyz); returns its base URL.
    `config` (default serve/config.yaml) gives the deployment settings and the app args (limits,
    auth, cors_origins, audit_log); `tokens_file`, `no_auth` and `audit_log` override those.
    `stop_signals`: installed as soon as Ray is up, so a stop during the start-up is clean too."""
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
    if local:
        check_port(host, port)
    if throughput_optimized and local:
        for k, v in throughput_env(port).items():
            os.environ.setdefault(k, v)
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" and local:
        first = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", 30000))
        if first != port:
            raise MedrayError(f"Ray here was started for port {first} (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT); "
                              f"serve on that port or start a new process")
        proxy_port = free_port(host)  # Serve's proxy is only a fallback path with direct ingress
    from medray.ray_runtime import ensure_ray, local_dashboard

    ensure_ray(address, dashboard=local_dashboard(False))  # no dashboard: a third of the start-up
    if stop_signals is not None:  # after ray.init: Ray's core worker installs handlers that abort
        stop_signals.install()
        print(f"[medray] Ray is up; starting Serve and loading {', '.join(bundles)}…", file=sys.stderr)
    from ray import serve

    serve.start(http_options={"host": host, "port": proxy_port}, logging_config=config.get("logging_config"))
    options = config_deployment_options(config)
    if proxy_port != port:  # direct ingress: one ingress replica owns the port
        options["ingress"] = dict(options.get("ingress", {}), num_replicas=1, autoscaling_config=None)
    app = build(args, options)
    serve.run(app, name=name, route_prefix="/", blocking=False,
              logging_config=config["applications"][0].get("logging_config"))
    url = f"http://{host}:{port}"
    if wait:
        try:
            wait_ready(url)
        except MedrayError as e:
            moved = _ingress_elsewhere(host, port) if proxy_port != port else None
            if moved is None:
                raise
            raise MedrayError(f"{e}. Serve's ingress listens on port {moved} instead: port {port} was held by "
                              f"another socket when it started (direct ingress takes the next free port of "
                              f"{port}..{port + 16}); free port {port} or serve on another one") from None
    return url


def _ingress_elsewhere(host: str, port: int) -> int | None:
    """The port of the direct-ingress range (port+1..port+16) where /readyz answers, if any."""
    import urllib.error
    import urllib.request

    for p in range(port + 1, port + 17):
        try:
            with urllib.request.urlopen(f"http://{host}:{p}/readyz", timeout=2) as r:
                if r.status in (200, 503):
                    return p
        except urllib.error.HTTPError as e:
            if e.code in (200, 503):
                return p
        except OSError:
            continue
    return None


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
    signals = StopSignals()
    t_start = time.time()
    try:
        url = start(bundles, host, port, address, throughput_optimized, config=config, tokens_file=tokens_file,
                    no_auth=no_auth, audit_log=audit_log, stop_signals=signals)
    except BaseException:  # StopRequested, or what Ray's ray.get made of it (it wraps a handler's exception)
        if not signals.got:
            raise
        stop_serving()
        print(f"[medray] stopped ({signals.got[0]}) during the start-up", file=sys.stderr)
        return
    print(f"[medray] serving {', '.join(bundles)} at {url} (ready in {time.time() - t_start:.0f} s; "
          f"API docs: {url}/docs; Ctrl-C stops)", file=sys.stderr)
    why = signals.wait()
    t0 = time.time()
    stop_serving()
    print(f"[medray] stopped ({why}) in {time.time() - t0:.1f} s: requests in flight answered, Serve shut down",
          file=sys.stderr)


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived while the server was still starting."""


class StopSignals:
    """SIGTERM (what Kubernetes, systemd and process managers send) and SIGINT (Ctrl-C) as a clean
    stop. Python handlers replace the ones Ray's core worker installed at `ray.init` (which abort
    with a stack dump), so they are installed right after Ray starts: a stop is never a crash, not
    even during the start-up, when the handler interrupts the start (`StopRequested`)."""

    def __init__(self):
        self.got: list[str] = []
        self.event = threading.Event()
        self.starting = True

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.got.append(signal.Signals(signum).name)
        self.event.set()
        if self.starting:
            self.starting = False  # one interruption; a second signal waits for the clean stop
            raise StopRequested(self.got[0])

    def wait(self) -> str:
        """Block until a stop signal; returns its name. A second signal during the drain: the
        default action, at once."""
        self.starting = False
        while not self.event.wait(3600):
            pass
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        return self.got[0]


def stop_serving() -> None:
    """Stop accepting, let requests in flight finish (each replica's graceful shutdown: up to its
    deployment's `graceful_shutdown_timeout_s`, Serve's default 20 s), shut Serve and this
    process's Ray down."""
    import logging

    import ray
    from ray import serve

    for name in ("ray", "ray.serve", "ray.data", "ray.train"):  # no shutdown chatter on the console
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s) before they exit
    finally:
        ray.shutdown()
