"""Serving under faults, over real HTTP on the session's Ray instance (Serve in throughput mode,
direct ingress on SERVE_PORT, as `medray serve` runs it), with bundles trained on the real data:

* a model replica killed (SIGKILL) under steady load: Serve replaces it, the ingress re-sends the
  calls the dead replica had accepted (predictions are idempotent), so clients see no failures,
  and throughput comes back; the figures go to benchmarks/results/faults_serving.json;
* a bundle that fails to load (corrupt weights, a bundle.json that does not match its weights):
  /readyz says which model and why, its route answers 503 model_unavailable with the reason, and
  the other model keeps serving;
* the ingress's retry rule itself (which errors are retried, what the client gets when every
  attempt fails), with fake handles: Ray cannot be made to fail on cue.
"""

import asyncio
import collections
import copy
import json
import os
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import ROOT, shutdown_serve, start_serve

pytestmark = pytest.mark.ray

APP = "medray"
CONCURRENCY = 8  # client threads, one request outstanding each: at most this many in flight at the kill
INSTANCES = 32  # rows per request: forward passes long enough that the killed replica is likely busy
KILL_AT_S = 6.0  # seconds of steady load before the kill (the "before" throughput window)
MIN_LOAD_S = 20.0  # total load, at least
AFTER_S = 6.0  # load kept up this long after the replacement runs (the "after" throughput window)
RECOVERY_TIMEOUT_S = 120.0  # a 2-core machine shared with other work starts a replica slowly
RESULTS = ROOT / "benchmarks" / "results" / "faults_serving.json"


# --------------------------------------------------------------------------- deployments


class Served:
    """One application at a time on SERVE_PORT (direct ingress gives a redeployed ingress another
    port, so switching applications shuts Serve down first)."""

    def __init__(self, token_file: Path, token: str):
        self.token_file, self.headers = token_file, {"Authorization": f"Bearer {token}"}
        self.current, self.url = None, None

    def config(self, overrides: dict[str, dict], args: dict | None = None) -> dict:
        from serve.app import default_config

        config = copy.deepcopy(default_config())
        app = config["applications"][0]
        app["args"]["auth"] = {"tokens_file": str(self.token_file)}  # ignored by a build without auth
        app["args"].update(args or {})
        for d in app["deployments"]:
            d.update(overrides.get(d["name"], {}))
        return config

    def use(self, key: str, bundles: dict[str, str], overrides: dict[str, dict] | None = None,
            wait: bool = True, args: dict | None = None) -> str:
        if self.current == key:
            return self.url
        self.current = None
        self.url = start_serve(bundles, config=self.config(overrides or {}, args), name=APP, wait=wait)
        self.current = key
        return self.url

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    shutdown_serve()  # another module's application, if its shutdown is still under way
    token = secrets.token_urlsafe(32)
    token_file = tmp_path_factory.mktemp("auth") / "tokens"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    yield Served(token_file, token)
    shutdown_serve()
    if RESULTS.exists() and RESULTS.stat().st_mtime > token_file.stat().st_mtime:  # written by this module
        figures = json.loads(RESULTS.read_text())
        figures["ingress_retries_logged"] = _logged_retries()
        RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\ningress retries of calls lost with the killed replica: {figures['ingress_retries_logged']}")


def broken_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of the bundle at `src`, broken: `corrupt-weights` flips bytes in the middle of
    model.pt; `mismatched-meta` drops a label from bundle.json (the weights, and their SHA-256,
    untouched: a bundle.json edited by hand to fit another model)."""
    shutil.copytree(src, dst)
    if how == "corrupt-weights":
        weights = bytearray((dst / "model.pt").read_bytes())
        mid = len(weights) // 2
        weights[mid : mid + 64] = bytes(b ^ 0xFF for b in weights[mid : mid + 64])
        (dst / "model.pt").write_bytes(bytes(weights))
    elif how == "mismatched-meta":
        meta = json.loads((dst / "bundle.json").read_text())
        meta["labels"] = meta["labels"][:-1]
        (dst / "bundle.json").write_text(json.dumps(meta, indent=2))
    else:
        raise ValueError(how)
    return dst


def wait_readyz_settled(client: httpx.Client, timeout_s: float = 180.0) -> httpx.Response:
    """/readyz once every model's replica answers (ready, or not ready with its load error)."""
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            last = client.get("/readyz", timeout=10)
            models = last.json().get("models", {})
            if models and all(m["ready"] or "not reachable" not in (m.get("error") or "") for m in models.values()):
                return last
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"/readyz did not settle in {timeout_s:.0f}s: {last.text if last is not None else None}")


def feature_rows(client: httpx.Client, n: int) -> list:
    names = client.get("/v1/models").json()["models"]["exercise"]["input"]["feature_names"]
    return np.random.default_rng(0).normal(size=(n, len(names))).round(4).tolist()


# --------------------------------------------------------------------------- a bundle that fails to load


@pytest.mark.parametrize("how, broken, good, reason", [
    ("corrupt-weights", "genomic", "exercise", "SHA-256 mismatch"),
    ("mismatched-meta", "exercise", "genomic", "weights do not fit the model in bundle.json"),
])
def test_broken_bundle_is_named_by_readyz_while_the_other_model_serves(served, trained, tmp_path, how, broken, good,
                                                                       reason):
    bad = broken_copy(trained(broken)[1], tmp_path / broken, how)
    bundles = {good: str(trained(good)[1]), broken: str(bad)}
    served.use(f"broken-{how}", bundles, wait=False)  # never ready: start() would time out waiting
    with served.client() as client:
        ready = wait_readyz_settled(client)
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["ready"] is False
        assert body["models"][good] == {"ready": True}
        assert body["models"][broken]["ready"] is False
        assert reason in body["models"][broken]["error"] and str(bad) in body["models"][broken]["error"]

        # the broken model's route refuses before reading the body (its input spec is unknown)
        r = client.post(f"/v1/{broken}/predict", json={"instances": [[0.0]], "sequences": ["ACGT"]})
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "model_unavailable" and reason in r.json()["detail"], r.text

        good_body = {"instances": feature_rows(client, 3)} if good == "exercise" else \
            {"sequences": ["ACGT" * 15, "GATTACA" * 8, "TTGCA" * 12]}
        r = client.post(f"/v1/{good}/predict", json=good_body)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 3
        info = client.get("/v1/models").json()["models"]
        assert info[good]["ready"] is True and info[broken]["ready"] is False
        assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- local models start first


def test_local_models_are_ready_from_the_ingress_and_their_replicas_start_after_it(served, trained):
    """serve/config.yaml starts the deployments of the ingress's local models at zero replicas:
    /readyz answers 200 from the ingress's own copies, and its first readiness probe wakes the
    deployments, whose replicas then start (they take over when the ingress's copy is busy)."""
    bundles = {t: str(trained(t)[1]) for t in ("exercise", "genomic")}
    served.use("local-first", bundles)  # returns at the first /readyz 200
    at_ready = {t: _running(t)[0] for t in bundles}
    assert at_ready == {"exercise": 0, "genomic": 0}, f"ready waited for the model replicas: {at_ready}"
    deadline = time.time() + RECOVERY_TIMEOUT_S
    while time.time() < deadline and not all(_running(t)[0] >= 1 for t in bundles):
        time.sleep(0.5)
    assert {t: _running(t)[0] for t in bundles} == {"exercise": 1, "genomic": 1}, "the ingress did not wake them"
    with served.client() as client:
        r = client.post("/v1/genomic/predict", json={"sequences": ["ACGT" * 15]})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text


# --------------------------------------------------------------------------- a replica killed under load


def _replicas(deployment: str) -> list:
    """The ALIVE ServeReplica actors of a deployment of the app (Ray's state API)."""
    import ray
    from ray.util.state import list_actors

    # the GCS address of this session's instance: without it the state API may find another Ray
    # instance on the same machine (its address file is per machine)
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         detail=True, limit=1000, raise_on_missing_output=False)
    return [a for a in actors if a.class_name.startswith("ServeReplica") and f"{APP}#{deployment}#" in (a.name or "")]


def _running(deployment: str) -> tuple[int, str]:
    """(RUNNING replicas, deployment status) as serve.status() reports them."""
    from ray import serve

    d = serve.status().applications[APP].deployments[deployment]
    return d.replica_states.get("RUNNING", 0), getattr(d.status, "value", str(d.status))


def _logged_retries(task: str = "exercise") -> int | None:
    """How many handle calls the ingress sent again (serve/app.py `_call_model` logs each retry),
    from this session's Serve logs. Serve buffers a replica's log records below ERROR (up to 1000)
    and writes them when the replica stops, so this is counted after Serve is shut down."""
    import ray

    try:
        logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs" / "serve"
        return sum(f.read_text(errors="replace").count(f"{task}: handle call failed because its replica is gone")
                   for f in logs.glob("replica_*ingress*.log"))
    except Exception:  # best effort: a figure, not a check
        return None


def test_killed_replica_is_replaced_without_failed_requests(served, trained):
    exercise = str(trained("exercise")[1])
    bundles = {"exercise": exercise, "genomic": str(trained("genomic")[1])}
    # two exercise replicas (fixed: autoscaling must not add one, which would blur "replaced")
    # every request through the model replicas (not the ingress's own copy): they are what is killed
    served.use("kill", bundles, {"exercise": {"num_replicas": 2, "autoscaling_config": None}},
               args={"local_models": []})
    deadline = time.time() + 60
    while time.time() < deadline and _running("exercise")[0] < 2:
        time.sleep(0.5)
    before = _replicas("exercise")
    assert len(before) == 2, [a.name for a in before]

    with served.client() as client:
        body = {"instances": feature_rows(client, INSTANCES)}
        for _ in range(5):  # warm the route and both replicas
            assert client.post("/v1/exercise/predict", json=body).status_code == 200

    log: list[tuple[float, float, object]] = []  # (sent, answered, status code or transport error name)
    lock, stop = threading.Lock(), threading.Event()

    def load():
        with served.client(timeout=30) as c:
            while not stop.is_set():
                t0 = time.time()
                try:
                    r = c.post("/v1/exercise/predict", json=body)
                    outcome = r.status_code
                    if r.status_code == 200:
                        assert len(r.json()["predictions"]) == INSTANCES
                    else:
                        print(f"  {r.status_code} {r.headers.get('retry-after')} {r.text[:200]}")
                except httpx.TransportError as e:
                    outcome = type(e).__name__
                with lock:
                    log.append((t0, time.time(), outcome))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(CONCURRENCY)]
    start = time.time()
    for t in threads:
        t.start()
    try:
        time.sleep(max(0.0, start + KILL_AT_S - time.time()))
        victim = before[0]
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.time()
        recovered = None
        while time.time() - killed < RECOVERY_TIMEOUT_S:
            new = {a.name for a in _replicas("exercise")} - {a.name for a in before}
            running, status = _running("exercise")
            if new and running == 2 and status == "HEALTHY":
                recovered = time.time()
                break
            time.sleep(0.5)
        end = max(start + MIN_LOAD_S, (recovered or time.time()) + AFTER_S)
        time.sleep(max(0.0, end - time.time()))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        stopped = time.time()

    assert recovered is not None, f"no replacement replica RUNNING within {RECOVERY_TIMEOUT_S:.0f}s of the kill"
    outcomes = collections.Counter(o for _, _, o in log)
    failed = sum(n for o, n in outcomes.items() if o != 200)
    in_flight = sum(1 for t0, t1, _ in log if t0 <= killed <= t1)
    per_second = collections.Counter(int(t1 - start) for _, t1, _ in log)
    done_in = lambda a, b: sum(1 for _, t1, _ in log if a <= t1 < b)  # noqa: E731
    before_rps = done_in(start + 1, killed) / (killed - start - 1)
    after_rps = done_in(recovered + 1, stopped) / (stopped - recovered - 1)
    figures = {
        "what": "exercise model, 2 replicas; one replica SIGKILLed under steady load (tests/test_faults_serving.py)",
        "concurrency": CONCURRENCY,
        "instances_per_request": INSTANCES,
        "requests": len(log),
        "failed": failed,
        "outcomes": {str(k): v for k, v in sorted(outcomes.items(), key=str)},
        "in_flight_at_kill": in_flight,
        "kill_at_s": round(killed - start, 2),
        "recovery_s": round(recovered - killed, 2),
        "throughput_before_rps": round(before_rps, 1),
        "throughput_after_rps": round(after_rps, 1),
        "completions_per_second": [per_second.get(i, 0) for i in range(int(stopped - start) + 1)],
        "ingress_retries_logged": None,  # filled in once Serve has shut down (its logs are buffered)
        "ingress_retries_note": "calls the ingress re-sent; Serve's router re-sends most lost calls itself, unlogged",
        "replicas_running_after": _running("exercise")[0],
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "ray": __import__("ray").__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print("\n" + json.dumps(figures, indent=2))

    assert not [o for o in outcomes if not isinstance(o, int)], f"transport errors: {outcomes}"
    assert not [o for o in outcomes if isinstance(o, int) and o >= 500 and o != 503], f"5xx other than 503: {outcomes}"
    assert failed <= in_flight <= CONCURRENCY, f"{failed} failed requests, {in_flight} in flight at the kill"
    assert after_rps >= 0.5 * before_rps, f"throughput {after_rps:.1f} req/s after recovery vs {before_rps:.1f} before"
    assert figures["replicas_running_after"] == 2
    assert victim.name not in {a.name for a in _replicas("exercise")}
    with served.client() as client:  # and the app as a whole is fine
        assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- the retry rule, with fake handles


class FakeHandle:
    """`handle.predict.remote(x)` answering from a script: an exception to raise or a result."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls = list(outcomes), 0
        self.predict = self

    def remote(self, inputs):
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]

        async def answer():
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome(inputs) if callable(outcome) else outcome

        return answer()


class _Gateway:
    """Gateway's `_forward` and `_predict` over fake handles, without a replica (or Serve's ingress
    wrapper, whose instances expect to live in one)."""

    def __init__(self, handles: dict, local: dict | None = None):
        from serve.app import Gateway

        self.models, self.local, self._cls = handles, dict(local or {}), Gateway.func_or_class
        self._batch_exercise = self._cls._batch_exercise  # what `_size_batches` resizes

    async def _forward(self, task, items):
        return await self._cls._forward(self, task, items)

    async def _predict(self, task, info, inputs):
        return await self._cls._predict(self, task, info, inputs)


def _dead():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

    return [ActorUnavailableError("Actor is unavailable.", None),
            ActorDiedError(),
            RayTaskError("predict", "traceback", ActorDiedError())]


def test_calls_lost_with_a_dead_replica_are_sent_again(monkeypatch):
    import serve.app as app

    monkeypatch.setattr(app, "REPLICA_RETRY_BACKOFF_S", (0.0, 0.0))
    for error in _dead():
        handle = FakeHandle(error, (np.ones((3, 2)), 3))
        probs, batch = asyncio.run(app._call_model(handle, "exercise", [1, 2, 3]))
        assert handle.calls == 2 and probs.shape == (3, 2) and batch == 3

    # ingress batching: requests joined into one call, split back per request
    handle = FakeHandle(_dead()[0], lambda x: (np.arange(len(x))[:, None] * np.ones((1, 2)), len(x)))
    out = asyncio.run(_Gateway({"genomic": handle})._forward("genomic", [["A"], ["C", "G"], ["T", "T", "T"]]))
    assert [p[:, 0].tolist() for p, _ in out] == [[0], [1, 2], [3, 4, 5]] and {b for _, b in out} == {6}


def test_the_ingress_copy_of_a_light_model_answers_while_idle_and_the_replicas_while_it_is_busy(tmp_path):
    """`local_models`: a batch goes to the ingress's own copy when no forward pass of it is under
    way (no hop), to the model's deployment otherwise; the answers are the bundle's either way."""
    from test_bundle import _bundle

    from serve.deployments import LoadedModel

    path, _, _, x = _bundle(tmp_path)
    local = LoadedModel(path, "exercise")
    expected = local.bundle.predict(x[:3])
    handle = FakeHandle(lambda inputs: (local.bundle.predict(inputs), len(inputs)))
    gw = _Gateway({"exercise": handle}, {"exercise": local})

    async def go():
        (p, batch), = await gw._forward("exercise", [x[:3]])  # idle: answered here, inline
        assert handle.calls == 0 and batch == 3 and np.allclose(p, expected)
        slow = asyncio.create_task(gw._forward("exercise", [x]))  # 20 rows: on the forward thread
        await asyncio.sleep(0)
        busy = local.busy
        (p, _), = await gw._forward("exercise", [x[:3]])  # meanwhile: the deployment answers
        await slow
        return busy, p

    busy, p = asyncio.run(go())
    assert busy == 1 and handle.calls == 1 and np.allclose(p, expected, atol=1e-6)
    assert local.busy == 0


def test_a_light_model_queues_for_the_ingress_copy_up_to_local_queue_passes(tmp_path, monkeypatch):
    """LOCAL_QUEUE: for a model listed there, batches wait for the ingress's copy while fewer than
    that many of its passes are under way or waiting; the next goes to the model's deployment."""
    from test_bundle import _bundle

    import serve.gateway
    from serve.deployments import LoadedModel

    monkeypatch.setattr(serve.gateway, "LOCAL_QUEUE", {"exercise": 2})
    path, _, _, x = _bundle(tmp_path)
    local = LoadedModel(path, "exercise")
    expected = local.bundle.predict(x)
    handle = FakeHandle(lambda inputs: (local.bundle.predict(inputs), len(inputs)))
    gw = _Gateway({"exercise": handle}, {"exercise": local})

    async def go():
        first = asyncio.create_task(gw._forward("exercise", [x]))  # 20 rows: on the forward thread
        await asyncio.sleep(0)
        second = asyncio.create_task(gw._forward("exercise", [x]))  # waits for the copy's thread
        await asyncio.sleep(0)
        queued = local.busy
        third = await gw._forward("exercise", [x])  # the copy's queue is full: the deployment
        return queued, [await first, await second, third]

    queued, answers = asyncio.run(go())
    assert queued == 2 and handle.calls == 1 and local.busy == 0
    for (p, batch), in answers:
        assert batch == len(x) and np.allclose(p, expected, atol=1e-6)


def test_ingress_batches_hold_about_one_forward_pass_of_its_copy(tmp_path, monkeypatch):
    """`_size_batches`: the requests per ingress batch follow the instances per request, so that a
    batch is about `Bundle.chunk_rows` instances (64 requests of one instance; a few of 64)."""
    from test_bundle import _bundle

    import medray.bundle
    from serve.deployments import LoadedModel
    from serve.gateway import INGRESS_BATCH_REQUESTS, GatewayBase

    path, _, _, _ = _bundle(tmp_path)  # 5 features per row
    monkeypatch.setattr(medray.bundle, "INFERENCE_CHUNK_ELEMENTS", 5 * 640)
    local = LoadedModel(path, "exercise")
    assert local.bundle.chunk_rows == 640

    gw = _Gateway({}, {"exercise": local})
    gw._per_request, gw._batch_cap = {}, {}
    cap = GatewayBase._batch_exercise._get_max_batch_size
    try:
        GatewayBase._size_batches(gw, "exercise", 1)
        assert cap() == INGRESS_BATCH_REQUESTS
        for _ in range(60):  # a run of 64-instance requests
            GatewayBase._size_batches(gw, "exercise", 64)
        assert cap() == 640 // 64  # 10 requests of 64 instances
        for _ in range(60):
            GatewayBase._size_batches(gw, "exercise", 1)
        assert cap() == INGRESS_BATCH_REQUESTS
    finally:
        GatewayBase._batch_exercise.set_max_batch_size(INGRESS_BATCH_REQUESTS)


def test_a_model_error_is_not_retried(monkeypatch):
    from ray.exceptions import RayTaskError

    import serve.app as app

    monkeypatch.setattr(app, "REPLICA_RETRY_BACKOFF_S", (0.0, 0.0))
    error = RayTaskError("predict", "traceback", app.ModelUnavailable("bad bundle")).as_instanceof_cause()
    handle = FakeHandle(error)
    with pytest.raises(app.ModelUnavailable):
        asyncio.run(app._call_model(handle, "exercise", [1]))
    assert handle.calls == 1
    handle = FakeHandle(ValueError("a bug"))
    with pytest.raises(ValueError):
        asyncio.run(app._call_model(handle, "exercise", [1]))
    assert handle.calls == 1


def test_big_image_requests_batch_in_an_ingress_that_holds_the_model_and_call_it_directly_otherwise():
    """Requests of DIRECT_CALL_IMAGES images: their own handle call when the ingress holds no copy of
    the image model; through the ingress batch queue (which feeds its copy) when it does."""
    from serve.gateway import DIRECT_CALL_IMAGES, run_model

    class Stub:
        def __init__(self, local):
            self.models = {"ultrasound": FakeHandle(lambda x: (np.full((len(x), 2), 0.5), len(x)))}
            self.local, self.batched = local, 0

        async def _alone(self, task, n):
            return False

        async def _batched(self, task, inputs):
            self.batched += 1
            return np.full((len(inputs), 2), 0.5), len(inputs)

    images = [np.zeros((8, 8), np.float32)] * DIRECT_CALL_IMAGES
    info = {"labels": ["a", "b"]}
    for local, direct in (({}, True), ({"ultrasound": object()}, False)):
        gw = Stub(local)
        probs, batch = asyncio.run(run_model(gw, "ultrasound", info, images))
        assert probs.shape == (DIRECT_CALL_IMAGES, 2) and batch == DIRECT_CALL_IMAGES
        assert (gw.models["ultrasound"].calls, gw.batched) == ((1, 0) if direct else (0, 1)), local


def test_replicas_dead_on_every_attempt_answer_503_with_retry_after(monkeypatch):
    import serve.app as app

    monkeypatch.setattr(app, "REPLICA_RETRY_BACKOFF_S", (0.0, 0.0))
    handle = FakeHandle(_dead()[0])
    images = [np.zeros((8, 8), np.float32)] * app.DIRECT_CALL_IMAGES  # the direct-call path (no ingress batch)
    r = asyncio.run(_Gateway({"ultrasound": handle})._predict("ultrasound", {"labels": ["a", "b"]}, images))
    assert handle.calls == 1 + len(app.REPLICA_RETRY_BACKOFF_S)
    assert r.status_code == 503 and r.headers["Retry-After"] == str(app.RETRY_AFTER_S)
    body = json.loads(r.body)
    assert body["error"] == "model_unavailable" and "ActorUnavailableError" in body["detail"]
