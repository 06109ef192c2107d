"""The Serve application over real HTTP: bundles trained on the real data (shared with the
training tests), deployed on the session's local Ray instance as `medray serve` deploys them."""

import base64
import copy
import io
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import shared, shutdown_serve, start_serve

pytestmark = pytest.mark.ray

TOKEN = "test-token-all-models-" + "x" * 16  # may call every model
GENOMIC_TOKEN = "test-token-genomic-only-" + "y" * 16  # listed with `genomic` only
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEST_LIMITS = {"max_body_bytes": 1 << 20, "max_instances": 50, "max_sequence_length": 500,
               "max_image_pixels": 1_000_000}


@pytest.fixture(scope="module")
def security_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("security")
    (d / "tokens").write_text(f"# test tokens\n{TOKEN}\n{GENOMIC_TOKEN} genomic\n")
    return {"tokens": d / "tokens", "audit": d / "audit.jsonl"}


@pytest.fixture(scope="module")
def app(trained, gan, security_files):
    from serve.app import default_config

    bundles = {t: str(trained(t)[1]) for t in ("genomic", "exercise", "ultrasound")}
    bundles["genomic-gan"] = str(gan[1])
    config = copy.deepcopy(default_config())
    config["applications"][0]["args"]["limits"] = TEST_LIMITS
    config["applications"][0]["args"]["auth"] = {"tokens_file": str(security_files["tokens"])}
    config["applications"][0]["args"]["audit_log"] = str(security_files["audit"])
    for d in config["applications"][0]["deployments"]:
        if d["name"] == "ultrasound":  # short delays so the autoscaling test is bounded in time
            d["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                       "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2,
                                       "metrics_interval_s": 0.5}
    url = start_serve(bundles, config=config)
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        yield client, bundles
    shutdown_serve()


def cli_predict(bundle: str, data: Path, tmp_path: Path) -> pd.DataFrame:
    out = tmp_path / f"{Path(bundle).name}-preds.jsonl"
    subprocess.run([sys.executable, "-m", "medray", "predict", bundle, "--data", str(data), "--out", str(out)],
                   check=True, capture_output=True)
    return pd.read_json(out, lines=True)


def assert_same(resp: httpx.Response, expected: pd.DataFrame, labels: list[str]):
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body["model"]) == {"name", "version"}
    preds = body["predictions"]
    assert len(preds) == len(expected)
    got = np.array([[p["probabilities"][k] for k in labels] for p in preds])
    want = expected[[f"p_{k}" for k in labels]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [p["label"] for p in preds] == expected["label"].tolist()


# --------------------------------------------------------------------------- same predictions as the CLI


def test_genomic_json_and_fasta_match_medray_predict(app, tmp_path):
    client, bundles = app
    records = shared("genomic", "splice.fasta").read_text().split(">")[1:21]
    fasta = tmp_path / "sample.fasta"
    fasta.write_text("".join(">" + r for r in records))
    expected = cli_predict(bundles["genomic"], fasta, tmp_path)
    labels = client.get("/v1/models").json()["models"]["genomic"]["labels"]
    seqs = ["".join(r.splitlines()[1:]) for r in records]
    assert_same(client.post("/v1/genomic/predict", json={"sequences": seqs}), expected, labels)
    assert_same(client.post("/v1/genomic/predict", content=fasta.read_bytes(),
                            headers={"Content-Type": "text/x-fasta"}), expected, labels)


def test_exercise_rows_and_named_objects_match_medray_predict(app, tmp_path):
    client, bundles = app
    df = pd.read_csv(shared("exercise", "exercise_windows.csv")).sample(20, random_state=0)
    csv = tmp_path / "sample.csv"
    df.to_csv(csv, index=False)
    expected = cli_predict(bundles["exercise"], csv, tmp_path)
    info = client.get("/v1/models").json()["models"]["exercise"]
    names = info["input"]["feature_names"]
    rows = df[names].to_numpy().tolist()
    assert_same(client.post("/v1/exercise/predict", json={"instances": rows}), expected, info["labels"])
    objects = [dict(zip(names, r)) for r in rows[:3]]
    assert_same(client.post("/v1/exercise/predict", json={"instances": objects}), expected.iloc[:3], info["labels"])


def test_ultrasound_multipart_base64_and_raw_match_medray_predict(app, tmp_path):
    client, bundles = app
    root = shared("ultrasound")
    manifest = pd.read_csv(root / "labels.csv").groupby("label").head(2).reset_index(drop=True)
    paths = [root / p for p in manifest["path"]]
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"path": [str(p) for p in paths]}).to_csv(sample, index=False)
    expected = cli_predict(bundles["ultrasound"], sample, tmp_path)
    labels = client.get("/v1/models").json()["models"]["ultrasound"]["labels"]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    assert_same(client.post("/v1/ultrasound/predict", files=files), expected, labels)
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    assert_same(client.post("/v1/ultrasound/predict", json={"images": b64}), expected, labels)
    raw = client.post("/v1/ultrasound/predict", content=paths[0].read_bytes(), headers={"Content-Type": "image/png"})
    assert_same(raw, expected.iloc[:1], labels)


# --------------------------------------------------------------------------- metadata routes


def test_models_health_readiness_and_openapi(app):
    client, bundles = app
    models = client.get("/v1/models").json()["models"]
    assert set(models) == {"genomic", "exercise", "ultrasound", "genomic-gan"}
    for task, info in models.items():
        assert info["ready"] and info["task"] == task and info["bundle"] == bundles[task]
        assert info["labels"] and info["input"]["type"]
        if task != "genomic-gan":
            assert 0 <= info["metrics"]["validation"]["accuracy"] <= 1
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    spec = client.get("/openapi.json").json()
    for route in ("/v1/exercise/predict", "/v1/ultrasound/predict", "/v1/genomic/predict", "/v1/genomic/generate",
                  "/v1/models"):
        assert route in spec["paths"]
    assert "text/x-fasta" in spec["paths"]["/v1/genomic/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_generate_is_seeded_like_medray_generate_and_speaks_fasta(app, gan):
    from medray.bundle import load_bundle
    from medray.gan import generate

    client, _ = app
    r = client.post("/v1/genomic/generate", json={"n": 6, "label": "EI", "seed": 11})
    assert r.status_code == 200, r.text
    got = [s["sequence"] for s in r.json()["sequences"]]
    assert got == generate(load_bundle(gan[1]), 6, label="EI", seed=11)[0]
    again = client.post("/v1/genomic/generate", json={"n": 6, "label": "EI", "seed": 11}).json()["sequences"]
    assert [s["sequence"] for s in again] == got
    other = client.post("/v1/genomic/generate", json={"n": 6, "label": "EI", "seed": 12}).json()["sequences"]
    assert [s["sequence"] for s in other] != got
    fasta = client.post("/v1/genomic/generate", json={"n": 3, "seed": 1}, headers={"Accept": "text/x-fasta"})
    assert fasta.headers["content-type"].startswith("text/x-fasta") and fasta.text.count(">") == 3
    for body, status, words in (({"n": 0}, 422, "at least 1"), ({"n": 51}, 413, "limit"),
                                ({"n": 2, "label": "XX"}, 422, "unknown label"), ({"n": "5"}, 422, "integer"),
                                ({"n": 2, "seed": -1}, 422, "seed"), ({"count": 2}, 422, "unknown field")):
        bad = client.post("/v1/genomic/generate", json=body)
        assert bad.status_code == status and words in bad.json()["detail"], (body, bad.text)


# --------------------------------------------------------------------------- batching and autoscaling


def test_concurrent_requests_share_a_forward_pass(app):
    client, _ = app
    seq = {"sequences": ["ACGT" * 15]}
    url = str(client.base_url) + "/v1/genomic/predict"

    def one(_):
        with httpx.Client(timeout=30, headers=AUTH) as c:
            r = c.post(url, json=seq)
            assert r.status_code == 200
            return int(r.headers["X-Medray-Batch-Size"])

    seen = []
    with ThreadPoolExecutor(32) as pool:
        for _ in range(5):
            seen += list(pool.map(one, range(64)))
            if max(seen) > 1:
                break
    assert max(seen) > 1, f"every request ran alone: {sorted(set(seen))}"
    assert client.post("/v1/genomic/predict", json=seq).headers["X-Medray-Batch-Size"] == "1"  # alone when idle


def _running(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications["medray"].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def test_sustained_load_scales_ultrasound_up_and_back_down(app):
    client, _ = app
    assert _running("ultrasound") == 1
    # Requests of DIRECT_CALL_IMAGES images from 12 clients: the ingress batches them and its own copy
    # (`local_models`) answers one batch at a time; the batches that arrive while it is busy go to the
    # model's deployment, whose replicas must then scale up. (Single images are mostly answered by the
    # ingress's copy alone, 64×64 since 2026-12-05: that load would never reach the deployment.)
    from serve.gateway import DIRECT_CALL_IMAGES

    buf = io.BytesIO()
    Image.open(next(shared("ultrasound").glob("*/*.png"))).convert("L").resize((64, 64)).save(buf, format="PNG")
    body = {"images": [base64.b64encode(buf.getvalue()).decode()] * DIRECT_CALL_IMAGES}
    url = str(client.base_url) + "/v1/ultrasound/predict"
    stop = threading.Event()
    errors = []

    def load():
        with httpx.Client(timeout=60, headers=AUTH) as c:
            while not stop.is_set():
                r = c.post(url, json=body)
                if r.status_code != 200:
                    errors.append(r.status_code)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        deadline, peak = time.time() + 60, 1
        while time.time() < deadline and peak < 2:
            time.sleep(0.5)
            peak = max(peak, _running("ultrasound"))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert peak >= 2, "sustained load did not add a replica within 60 s"
    deadline = time.time() + 90
    while time.time() < deadline and _running("ultrasound") > 1:
        time.sleep(1)
    assert _running("ultrasound") == 1, "replicas did not scale back down within 90 s of the load stopping"
    assert not errors, f"requests failed during scaling: {errors[:5]}"


# --------------------------------------------------------------------------- bad input


def _png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 0).save(buf, format="PNG")
    return buf.getvalue()


def _features(n_rows: int, n_features: int) -> list:
    return np.random.default_rng(0).normal(size=(n_rows, n_features)).tolist()


def bad_requests(n_features: int):
    """(name, route, request kwargs, status, error code, words the detail must contain)."""
    js = {"Content-Type": "application/json"}
    bomb = _png((1200, 1000))  # 1.2 MP > the 1 MP test limit; a few kB compressed
    return [
        ("wrong feature count", "exercise", {"json": {"instances": [[1.0, 2.0, 3.0]]}}, 422, "invalid_input",
         ["has 3 features", str(n_features)]),
        ("non-numeric value", "exercise", {"json": {"instances": [["abc"] + [0.0] * (n_features - 1)]}}, 422,
         "invalid_input", ["'abc'", "not a number"]),
        ("boolean value", "exercise", {"json": {"instances": [[True] + [0.0] * (n_features - 1)]}}, 422,
         "invalid_input", ["not a number"]),
        ("NaN", "exercise", {"content": '{"instances": [[NaN' + ", 0.0" * (n_features - 1) + "]]}", "headers": js},
         422, "invalid_input", ["not a finite number"]),
        ("infinity", "exercise", {"content": '{"instances": [[0.0, Infinity' + ", 0.0" * (n_features - 2) + "]]}",
                                  "headers": js}, 422, "invalid_input", ["feature 1", "not a finite number"]),
        ("empty instance list", "exercise", {"json": {"instances": []}}, 422, "invalid_input", ["empty"]),
        ("no instances key", "exercise", {"json": {"rows": [[1.0]]}}, 422, "invalid_input", ["missing 'instances'"]),
        ("too many instances", "exercise", {"json": {"instances": _features(51, n_features)}}, 413,
         "too_many_instances", ["51", "50"]),
        ("missing named feature", "exercise", {"json": {"instances": [{"ax_000": 1.0}]}}, 422, "invalid_input",
         ["missing feature"]),
        ("wrong content type", "exercise", {"content": "a,b\n1,2\n", "headers": {"Content-Type": "text/csv"}}, 415,
         "unsupported_media_type", ["application/json"]),
        ("invalid JSON", "exercise", {"content": '{"instances": [[1,', "headers": js}, 400, "invalid_json", ["JSON"]),
        ("body over the size limit", "genomic", {"content": b"x" * (2 << 20), "headers": js}, 413, "body_too_large",
         ["limit"]),
        ("letters that are not nucleotides", "genomic", {"json": {"sequences": ["ACGTXACGT"]}}, 422, "invalid_input",
         ["'X'", "position 5"]),
        ("sequence over the maximum length", "genomic", {"json": {"sequences": ["ACGT" * 150]}}, 413,
         "sequence_too_long", ["600", "500"]),
        ("non-UTF-8 FASTA", "genomic", {"content": b">s1\nACGT\xff\xfe\n", "headers": {"Content-Type": "text/x-fasta"}},
         422, "invalid_input", ["UTF-8"]),
        ("FASTA with a bad letter", "genomic", {"content": b">s1\nACGT\n>s2\nAC!T\n",
                                                "headers": {"Content-Type": "text/x-fasta"}}, 422, "invalid_input",
         ["record 2", "'!'"]),
        ("empty sequence list", "genomic", {"json": {"sequences": []}}, 422, "invalid_input", ["empty"]),
        ("sequence that is not a string", "genomic", {"json": {"sequences": [42]}}, 422, "invalid_input",
         ["sequence 0"]),
        ("truncated PNG", "ultrasound", {"content": _png()[:60], "headers": {"Content-Type": "image/png"}}, 422,
         "invalid_image", ["truncated"]),
        ("not an image", "ultrasound", {"files": [("files", ("notes.png", b"hello, not an image", "image/png"))]},
         422, "invalid_image", ["notes.png", "not an image"]),
        ("decompression bomb", "ultrasound", {"content": bomb, "headers": {"Content-Type": "image/png"}}, 413,
         "image_too_large", ["1200x1000", "limit"]),
        ("invalid base64", "ultrasound", {"json": {"images": ["***not base64***"]}}, 422, "invalid_input",
         ["image 0", "base64"]),
        ("multipart without files", "ultrasound", {"data": {"note": "x"}, "files": [("other", ("", b"", ""))]},
         422, "invalid", []),
        ("unsupported media type", "ultrasound", {"content": b"abc", "headers": {"Content-Type": "text/plain"}},
         415, "unsupported_media_type", ["multipart"]),
    ]


def test_every_bad_input_gets_a_named_4xx_and_the_app_keeps_serving(app):
    client, _ = app
    n_features = len(client.get("/v1/models").json()["models"]["exercise"]["input"]["feature_names"])
    failures = []
    for name, task, kwargs, status, code, words in bad_requests(n_features):
        r = client.post(f"/v1/{task}/predict", **kwargs)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        ok = (r.status_code == status and set(body) == {"error", "detail"} and code in body["error"]
              and all(w in body["detail"] for w in words))
        if not ok:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/genomic/predict", 405)):
        r = client.request(method, path)
        assert r.status_code == status and set(r.json()) == {"error", "detail"}
    # nothing crashed: every replica is up and still answers
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/genomic/predict", json={"sequences": ["ACGT" * 15]}).status_code == 200


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import MODEL_TASKS, config_deployment_options, default_config

    raw = (Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(raw))
    app_cfg = config.applications[0]
    assert app_cfg.import_path == "serve.app:build_app"
    assert set(app_cfg.args["bundles"]) == set(MODEL_TASKS)
    options = config_deployment_options(default_config())
    assert set(options) == {"ingress", *MODEL_TASKS}
    for task in MODEL_TASKS:
        auto = options[task]["autoscaling_config"]
        assert auto["target_ongoing_requests"] < options[task]["max_ongoing_requests"]
        assert options[task]["max_queued_requests"] > 0


def test_build_app_refuses_unknown_tasks_and_bad_limits():
    import inspect

    from serve.app import build_app

    assert len(inspect.signature(build_app).parameters) == 1  # Serve passes exactly the config's args

    with pytest.raises(ValueError, match="unknown task"):
        build_app({"bundles": {"cardiology": "x"}})
    with pytest.raises(ValueError, match="unknown limit"):
        build_app({"bundles": {"genomic": "x"}, "limits": {"max_bodies": 1}})
    with pytest.raises(ValueError, match="bundles"):
        build_app({})
    with pytest.raises(ValueError, match="local_models"):  # the GAN is not a classifier the ingress can hold
        build_app({"bundles": {"genomic": "x"}, "local_models": ["genomic-gan"]})
    with pytest.raises(ValueError, match="local_models"):
        build_app({"bundles": {"genomic": "x"}, "local_models": "genomic"})


# --------------------------------------------------------------------------- security


def test_every_route_but_the_probes_needs_a_valid_token(app):
    client, _ = app
    base = str(client.base_url)
    routes = [("POST", "/v1/exercise/predict"), ("POST", "/v1/ultrasound/predict"), ("POST", "/v1/genomic/predict"),
              ("POST", "/v1/genomic/generate"), ("GET", "/v1/models"), ("GET", "/openapi.json"), ("GET", "/docs"),
              ("GET", "/v1/nope")]
    with httpx.Client(base_url=base, timeout=30) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            for method, path in routes:
                r = anon.request(method, path, headers=headers, json={"sequences": ["ACGT"]})
                assert r.status_code == 401, (headers, path, r.status_code)
                assert r.json()["error"] == "unauthenticated" and r.headers["www-authenticate"].startswith("Bearer")
        assert anon.get("/healthz").status_code == 200 and anon.get("/readyz").status_code == 200
        limited = {"Authorization": f"Bearer {GENOMIC_TOKEN}"}
        seq = {"sequences": ["ACGT" * 15]}
        assert anon.post("/v1/genomic/predict", json=seq, headers=limited).status_code == 200
        assert anon.get("/v1/models", headers=limited).status_code == 200
        for path, body in (("/v1/exercise/predict", {"instances": [[0.0]]}), ("/v1/genomic/generate", {"n": 1})):
            r = anon.post(path, json=body, headers=limited)
            assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/healthz"]["get"]["security"] == []


def test_audit_log_records_each_call_and_no_patient_data_reaches_any_log(app, security_files):
    import ray

    from serve.security import token_id

    client, _ = app
    canary_seq = "ACGTTGCAACGTTGCAGATTACAGATTACA" * 2  # a sequence that appears nowhere else
    r = client.post("/v1/genomic/predict", json={"sequences": [canary_seq, canary_seq]},
                    headers={"X-Request-Id": "audit-check-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "audit-check-1"
    n_features = len(client.get("/v1/models").json()["models"]["exercise"]["input"]["feature_names"])
    bad = client.post("/v1/exercise/predict", json={"instances": [[31415.926] * (n_features - 1)]})
    assert bad.status_code == 422
    with httpx.Client(base_url=str(client.base_url), timeout=30) as anon:
        assert anon.post("/v1/genomic/predict", json={"sequences": [canary_seq]}).status_code == 401
    time.sleep(0.5)
    lines = [__import__("json").loads(x) for x in security_files["audit"].read_text().splitlines()]
    ok = next(x for x in lines if x["request_id"] == "audit-check-1")
    assert ok["caller"] == token_id(TOKEN) and ok["model"] == "genomic" and ok["instances"] == 2
    assert ok["status"] == 200 and ok["outcome"] == "ok" and ok["latency_ms"] > 0
    assert ok["model_version"] == client.get("/v1/models").json()["models"]["genomic"]["version"]
    assert {"time", "route", "model_name"} <= set(ok)
    assert any(x["status"] == 422 and x["outcome"] == "invalid_input" and x["model"] == "exercise" for x in lines)
    assert any(x["status"] == 401 and x["outcome"] == "unauthenticated" and x["caller"] is None for x in lines)
    assert all(TOKEN not in str(x) for x in lines)  # identities, never the tokens
    # request content never reaches the audit log, nor any log Ray keeps for this session
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [security_files["audit"], *[p for p in logs.rglob("*") if p.is_file()]]
    for canary in (canary_seq.encode(), b"31415.926"):
        leaked = [str(p) for p in files if canary in p.read_bytes()]
        assert not leaked, f"request content found in {leaked}"


def test_cors_is_closed_by_default(app):
    client, _ = app
    evil = {"Origin": "https://evil.example"}
    r = client.get("/v1/models", headers=evil)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = client.options("/v1/genomic/predict", headers={**evil, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers


def test_a_rotated_tokens_file_takes_effect_without_a_restart(app, security_files):
    client, _ = app
    new = "rotated-token-" + "z" * 20
    path = security_files["tokens"]
    original = path.read_text()
    path.write_text(original + f"{new} exercise genomic\n")
    try:
        deadline, status = time.time() + 20, None
        while time.time() < deadline and status != 200:
            status = client.get("/v1/models", headers={"Authorization": f"Bearer {new}"}).status_code
            time.sleep(0.5)
        assert status == 200, "a token added to the tokens file was not accepted within 20 s"
    finally:
        path.write_text(original)
