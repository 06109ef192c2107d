"""The model deployments: one replica class per kind of bundle, behind the ingress (serve/gateway.py).

* `ModelServer` loads a bundle with `medray.bundle.load_bundle` and predicts with
  `Bundle.predict` — the code `medray predict` runs — on dynamic batches (`@serve.batch`): the
  requests that arrive within `batch_wait_timeout_s` (up to `max_batch_size` of them) are
  concatenated into one forward pass. Batch settings are the deployment's `user_config`, so
  `serve/config.yaml` (or `serve deploy` of an edited copy) changes them without code edits or a restart.
  Each forward pass's size goes to the `medray_batch_size` histogram (serve/metrics.py).
* `GeneratorServer` samples sequences from a genomic-gan bundle (`medray.gan.generate`).
* `LoadedModel` is what both hold: a loaded bundle, its metadata, and forward passes on a thread
  (so the event loop keeps accepting requests). The ingress holds one too for each model in
  `local_models` (serve/gateway.py): it answers there while idle, without the hop to this replica.

A bundle that fails to load leaves its replica up, reporting why (`info()`; /readyz shows it), so
the other models keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from medray.errors import MedrayError
from serve import metrics

logger = logging.getLogger("ray.serve")


SWITCH_INTERVAL_S = 0.001  # sys.setswitchinterval in a process that runs forward passes beside its event loop


class ModelUnavailable(Exception):
    """The bundle failed to load; the replica stays up to report why (see /readyz)."""


class LoadedModel:
    """A bundle loaded for serving (or why it failed to load), with one thread for its forward
    passes: `ModelServer` replicas hold one, and so does an ingress replica for each local model."""

    def __init__(self, bundle_path: str, task: str | None = None):
        self.path = str(bundle_path)
        self.bundle, self.error = load_for_serving(self.path, task)
        # one thread runs forward passes, so the event loop keeps accepting (and batching) requests
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.busy = 0  # forward passes submitted and not yet finished

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

    @property
    def idle(self) -> bool:
        """Loaded, and no forward pass under way."""
        return self.bundle is not None and self.busy == 0

    async def forward(self, inputs, inline: bool = False) -> np.ndarray:
        """Probabilities for already-joined raw inputs (`Bundle.predict`, the code `medray predict`
        runs), on this model's thread (`inline`: on the calling event loop, for passes shorter than
        the two thread switches a pass on the thread costs); the batch size goes to the
        `medray_batch_size` histogram."""
        if self.bundle is None:
            raise ModelUnavailable(self.error)
        self.busy += 1
        try:
            if inline:
                probs = self.bundle.predict(inputs)
            else:
                probs = await asyncio.get_running_loop().run_in_executor(self._pool, self.bundle.predict, inputs)
        finally:
            self.busy -= 1
        metrics.record_batch(self.bundle.task, len(inputs))
        return probs


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
        undo_worker_niceness()
        favour_forward_thread()
        self.model = LoadedModel(bundle_path, task)

    def reconfigure(self, config: dict) -> None:
        config = dict(config or {})
        self.predict_batch.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.predict_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.0)))

    def info(self) -> dict:
        return self.model.info()

    async def predict(self, inputs) -> tuple[np.ndarray, int]:
        """(probabilities, instances in the forward pass) for one request's raw inputs."""
        if self.model.bundle is None:
            raise ModelUnavailable(self.model.error)
        return await self.predict_batch(inputs)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def predict_batch(self, batch: list) -> list[tuple[np.ndarray, int]]:
        counts = [len(x) for x in batch]
        joined = concat(batch)
        return split(await self.model.forward(joined), counts, len(joined))


@serve.deployment(
    max_ongoing_requests=16,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    ray_actor_options={"num_cpus": 1},
)
class GeneratorServer:
    """A genomic-gan bundle: sequences sampled with `medray.gan.generate` (what `medray generate` runs)."""

    def __init__(self, bundle_path: str, task: str = "genomic-gan"):
        undo_worker_niceness()
        self.path = str(bundle_path)
        self.bundle, self.error = load_for_serving(self.path, task)

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


def load_for_serving(path: str, task: str | None):
    """(bundle, None), or (None, why) when it cannot serve `task`: the replica stays alive so
    /readyz can say which model failed and why, while the other models keep serving."""
    import torch

    from medray.bundle import load_bundle  # here: serve.app's importers (the deploying driver) need no torch

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


def favour_forward_thread() -> None:
    """In a replica that runs forward passes on a thread beside its event loop: a shorter GIL
    switch interval. The forward thread needs the GIL back after every operator; while the event
    loop runs Python it waits up to the switch interval each time (5 ms by default), so a pass of a
    few dozen operators stalled for tens of milliseconds under load (docs/serving.md)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def undo_worker_niceness() -> None:
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


def concat(items: list):
    """One model input from several requests' inputs (arrays stacked, sequence lists joined)."""
    if isinstance(items[0], np.ndarray):
        return items[0] if len(items) == 1 else np.concatenate(items)
    return [s for x in items for s in x]


def split(probs: np.ndarray, counts: list[int], batch: int) -> list[tuple[np.ndarray, int]]:
    """Back per request: `probs` of the `concat` of requests with `counts` instances each, as
    (that request's rows, instances in the forward pass) pairs."""
    out, start = [], 0
    for n in counts:
        out.append((probs[start : start + n], batch))
        start += n
    return out
