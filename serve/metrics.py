"""Prometheus metrics of the medray application: recorded where they happen, exported by Ray.

Where counts happen: an ingress replica sees each HTTP request (status, latency) and each
prediction (instances, predicted labels); a model replica, or the ingress's own copy of a model
(`local_models`), sees each forward pass (batch size).
These are separate processes, several of each, on several nodes. So every process records into
`ray.util.metrics` (Counter/Histogram), and Ray's metrics agent on each node exports them, beside
Ray's own metrics, on the node's metrics export port (8080 on KubeRay pods): one series per
worker process, named `ray_<name>`. That port is what Prometheus scrapes on Kubernetes (the
PodMonitor in k8s/base/monitoring.yaml), and `sum by (model, …)` adds the processes up.

`GET /metrics` on the Serve HTTP port (serve/gateway.py) returns the same medray series, already
summed over processes and nodes (`exposition()`): it reads every live node's metrics export
endpoint, keeps the `ray_medray_*` families and adds up the samples that differ only in Ray's
per-process labels (WorkerId, NodeAddress, …). Any ingress replica gives the same answer, so a
scrape through a load balancer is consistent. The figures trail the requests by Ray's export
interval (`metrics_report_interval_ms`, 10 s by default). Scrape the Ray ports or `/metrics`,
never both (the names are the same, so the dashboard works with either). Ray (2.58) exports a
histogram's `_sum` approximated from bucket midpoints: buckets and counts are exact, means are not
(mean batch size = instances / forward passes, both exact counters).

Metrics (Prometheus names; `rate()` of a counter gives per-second figures):

    ray_medray_requests_total{model, protocol, status}       inference requests by HTTP status (401/403 too)
    ray_medray_request_latency_seconds{model, protocol, code_class}   histogram, request arrival to response sent
    ray_medray_batch_size{model}                             histogram, instances per forward pass
    ray_medray_instances_total{model}                        instances predicted (sequences generated)
    ray_medray_predicted_labels_total{model, label}          predictions by predicted label (drift watch)
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request

import numpy as np

from serve.security import inference_route

logger = logging.getLogger("ray.serve")

PREFIX = "ray_medray_"  # Ray prefixes the names of application metrics with "ray_"
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
# the labels medray sets; Ray adds per-process ones (WorkerId, NodeAddress, SessionName, …)
MEDRAY_LABELS = frozenset({"model", "protocol", "status", "code_class", "label", "le"})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NODE_FETCH_TIMEOUT_S = 5.0


class _Metrics:
    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("medray_requests", "medray inference requests, by HTTP status",
                                tag_keys=("model", "protocol", "status"))
        self.latency = Histogram("medray_request_latency_seconds",
                                 "medray inference request latency (request arrival to response sent), seconds",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("model", "protocol", "code_class"))
        self.batch = Histogram("medray_batch_size", "instances per forward pass (model replica or ingress copy)",
                               boundaries=BATCH_BOUNDARIES, tag_keys=("model",))
        self.instances = Counter("medray_instances", "instances predicted (sequences generated)",
                                 tag_keys=("model",))
        self.labels = Counter("medray_predicted_labels", "predictions by predicted label",
                              tag_keys=("model", "label"))


_metrics: _Metrics | None = None


def _get() -> _Metrics | None:
    """The metrics of this process, created on first use in a Ray worker (None outside Ray:
    nothing to export to)."""
    global _metrics
    if _metrics is None:
        import ray

        if not ray.is_initialized():
            return None
        _metrics = _Metrics()
    return _metrics


def record_request(model: str, protocol: str, status: int, seconds: float) -> None:
    m = _get()
    if m is None:
        return
    m.requests.inc(1, {"model": model, "protocol": protocol, "status": str(status)})
    m.latency.observe(seconds, {"model": model, "protocol": protocol, "code_class": f"{status // 100}xx"})


def record_predictions(model: str, probs: np.ndarray, labels: list[str]) -> None:
    """Instances and predicted labels (the arg-max, what the response's `label` says)."""
    m = _get()
    if m is None or len(probs) == 0:
        return
    m.instances.inc(len(probs), {"model": model})
    counts = np.bincount(probs.argmax(axis=1), minlength=len(labels))
    for k in np.flatnonzero(counts):
        m.labels.inc(int(counts[k]), {"model": model, "label": labels[int(k)]})


def record_generated(model: str, n: int) -> None:
    m = _get()
    if m is not None and n > 0:
        m.instances.inc(n, {"model": model})


def record_batch(model: str, size: int) -> None:
    m = _get()
    if m is not None:
        m.batch.observe(size, {"model": model})


class RequestMetricsMiddleware:
    """ASGI middleware (outside SecurityMiddleware, so refusals count too): the status and latency
    of every inference request (/v1 predict and generate, /v2 infer)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        route = inference_route(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]  # what the client gets when the app raises before answering

        async def capture(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            try:
                record_request(route[0], route[1], status[0], time.perf_counter() - started)
            except Exception as e:  # metrics must never fail a request
                logger.warning("metrics not recorded: %s: %s", type(e).__name__, e)


# --------------------------------------------------------------------------- GET /metrics


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - a node's metrics port
        return r.read().decode("utf-8", errors="replace")


def _medray_lines(text: str) -> str:
    """Only the medray families of a node's exposition (which is mostly Ray's own metrics)."""
    keep = [line for line in text.splitlines()
            if line.startswith(PREFIX) or line.startswith(("# HELP " + PREFIX, "# TYPE " + PREFIX))]
    return "\n".join(keep) + "\n"


def aggregate(texts: list[str]) -> str:
    """Prometheus text of the medray families in `texts` (nodes' expositions), each sample summed
    over the series that differ only in labels medray does not set."""
    from prometheus_client.core import Metric
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(_medray_lines(text)):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                sums[fam.name] = {}
            acc = sums[fam.name]
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in MEDRAY_LABELS)))
                acc[key] = acc.get(key, 0.0) + s.value

    def order(item):
        (name, labels), _ = item
        le = dict(labels).get("le")
        return (tuple(kv for kv in labels if kv[0] != "le"), name, float(le) if le is not None else 0.0)

    for name, fam in families.items():
        for (sample, labels), value in sorted(sums[name].items(), key=order):
            fam.add_sample(sample, dict(labels), value)

    class Snapshot:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry).decode()


async def exposition() -> str:
    """The medray metrics of the whole Ray cluster, as Prometheus text (`GET /metrics`)."""
    import ray

    nodes = await asyncio.to_thread(ray.nodes)
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in nodes if n.get("Alive") and n.get("MetricsExportPort")]
    texts = await asyncio.gather(*(asyncio.to_thread(_fetch, u, NODE_FETCH_TIMEOUT_S) for u in urls),
                                 return_exceptions=True)
    ok = [t for t in texts if isinstance(t, str)]
    failed = [u for u, t in zip(urls, texts) if not isinstance(t, str)]
    for u, t in zip(urls, texts):
        if not isinstance(t, str):
            logger.warning("metrics of node %s not read: %s: %s", u, type(t).__name__, t)
    body = aggregate(ok)
    if failed:  # a comment: the scrape still succeeds with the nodes that answered
        body = f"# medray: {len(failed)} of {len(urls)} node(s) did not answer; their series are missing\n" + body
    return body
