"""The Open Inference Protocol (/v2) and the Prometheus metrics (/metrics) of the Serve application.

* /v2 over real HTTP, with the bundles the serving tests train (session fixtures), deployed as
  `medray serve` deploys them: metadata, readiness, JSON and binary tensors, tritonclient; the same
  answers (to 1e-5) and the same 4xx (status, code, detail) as /v1 for the same inputs, and a 400
  naming the input for what only /v2 can get wrong (framing, sizes, datatypes).
* /metrics: real requests move the counters and histograms by exactly what was sent; the token
  rule; the Grafana dashboard's queries name metrics the application exports.
* The framing rules, the metrics aggregation over processes and the route rules, without Ray.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import struct
import time
import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, shared, shutdown_serve, start_serve
from test_serving import AUTH, GENOMIC_TOKEN, TEST_LIMITS, TOKEN, security_files  # noqa: F401 - fixture

HEADER = "Inference-Header-Content-Length"
DASHBOARD = ROOT / "k8s" / "monitoring" / "medray-dashboard.json"


# --------------------------------------------------------------------------- helpers


def binary_body(doc: dict, *chunks: bytes) -> tuple[bytes, dict]:
    header = json.dumps(doc).encode()
    return header + b"".join(chunks), {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def read_binary_outputs(r: httpx.Response) -> dict[str, np.ndarray | list]:
    """Outputs of a /v2 response, binary or JSON, as arrays (probabilities) and lists (label)."""
    n = int(r.headers.get(HEADER, len(r.content)))
    doc, rest, out = json.loads(r.content[:n]), r.content[n:], {}
    for o in doc["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = o["data"]
        else:
            raw, rest = rest[:size], rest[size:]
            if o["datatype"] == "FP32":
                data = np.frombuffer(raw, "<f4")
            else:
                data, off = [], 0
                while off < len(raw):
                    (k,) = struct.unpack_from("<I", raw, off)
                    data.append(raw[off + 4:off + 4 + k].decode())
                    off += 4 + k
        out[o["name"]] = np.asarray(data, np.float32).reshape(o["shape"]) if o["datatype"] == "FP32" else list(data)
    assert rest == b""
    return out


def v1_answer(r: httpx.Response, labels: list[str]) -> tuple[np.ndarray, list[str]]:
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    return np.array([[p["probabilities"][k] for k in labels] for p in preds]), [p["label"] for p in preds]


def assert_same_as_v1(r2: httpx.Response, v1: tuple[np.ndarray, list[str]]):
    assert r2.status_code == 200, r2.text[:500]
    out = read_binary_outputs(r2)
    np.testing.assert_allclose(out["probabilities"], v1[0], atol=1e-5)
    assert out["label"] == v1[1]


# --------------------------------------------------------------------------- the application


@pytest.fixture(scope="module")
def app(trained, security_files):  # noqa: F811 - the fixture imported from test_serving
    from serve.app import default_config

    bundles = {t: str(trained(t)[1]) for t in ("genomic", "exercise", "ultrasound")}
    config = copy.deepcopy(default_config())
    args = config["applications"][0]["args"]
    args.update(limits=TEST_LIMITS, auth={"tokens_file": str(security_files["tokens"])},
                audit_log=str(security_files["audit"]))
    url = start_serve(bundles, config=config)
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        models = client.get("/v1/models").json()["models"]
        yield client, models
    shutdown_serve()


@pytest.fixture(scope="module")
def samples(app):
    """The same real inputs for /v1 and /v2, with /v1's answers."""
    client, models = app
    names = models["exercise"]["input"]["feature_names"]
    rows = pd.read_csv(shared("exercise", "exercise_windows.csv")).sample(20, random_state=1)[names].to_numpy()
    records = shared("genomic", "splice.fasta").read_text().split(">")[1:13]
    seqs = ["".join(r.splitlines()[1:]) for r in records]
    root = shared("ultrasound")
    manifest = pd.read_csv(root / "labels.csv").groupby("label").head(2).reset_index(drop=True)
    images = [(root / p).read_bytes() for p in manifest["path"]]
    return {
        "exercise": (rows, v1_answer(client.post("/v1/exercise/predict", json={"instances": rows.tolist()}),
                                     models["exercise"]["labels"])),
        "genomic": (seqs, v1_answer(client.post("/v1/genomic/predict", json={"sequences": seqs}),
                                    models["genomic"]["labels"])),
        "ultrasound": (images, v1_answer(client.post("/v1/ultrasound/predict",
                                                     json={"images": [base64.b64encode(b).decode() for b in images]}),
                                         models["ultrasound"]["labels"])),
    }


# --------------------------------------------------------------------------- /v2: metadata, health, auth


@pytest.mark.ray
def test_v2_server_model_metadata_and_readiness(app):
    client, models = app
    server = client.get("/v2").json()
    assert server["name"] == "medray" and "binary_tensor_data" in server["extensions"]
    with httpx.Client(base_url=str(client.base_url), timeout=30) as anon:  # probes need no token
        assert anon.get("/v2/health/live").json() == {"live": True}
        assert anon.get("/v2/health/ready").json() == {"ready": True}
        assert anon.get("/v2/models/exercise").status_code == 401
    expected_inputs = {"exercise": ("features", "FP32", [-1, len(models["exercise"]["input"]["feature_names"])]),
                       "genomic": ("sequences", "BYTES", [-1]), "ultrasound": ("images", "BYTES", [-1])}
    for task, (name, datatype, shape) in expected_inputs.items():
        meta = client.get(f"/v2/models/{task}").json()
        labels = models[task]["labels"]
        assert meta["name"] == task and meta["versions"] == [models[task]["version"]]
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [(name, datatype, shape)]
        assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
            ("probabilities", "FP32", [-1, len(labels)]), ("label", "BYTES", [-1])]
        assert meta["outputs"][0]["parameters"]["labels"] == labels == meta["parameters"]["labels"]
        version = models[task]["version"]
        assert client.get(f"/v2/models/{task}/versions/{version}").json() == meta
        assert client.get(f"/v2/models/{task}/ready").json() == {"name": task, "ready": True}
        assert client.get(f"/v2/models/{task}/versions/{version}/ready").status_code == 200
        wrong = client.get(f"/v2/models/{task}/versions/not-{version}/ready")
        assert wrong.status_code == 404 and wrong.json()["error"] == "model_version_not_found"
    for path in ("/v2/models/cardiology", "/v2/models/cardiology/infer"):
        r = client.request("GET" if path.endswith("cardiology") else "POST", path, json={"inputs": []})
        assert r.status_code == 404 and set(r.json()) == {"error", "detail"}, r.text


@pytest.mark.ray
def test_v2_needs_a_token_allowed_the_model(app, samples):
    client, _ = app
    seqs = samples["genomic"][0][:2]
    body = {"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [2], "data": seqs}]}
    with httpx.Client(base_url=str(client.base_url), timeout=30) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"}):
            r = anon.post("/v2/models/genomic/infer", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        limited = {"Authorization": f"Bearer {GENOMIC_TOKEN}"}
        assert anon.post("/v2/models/genomic/infer", json=body, headers=limited).status_code == 200
        for method, path in (("POST", "/v2/models/exercise/infer"), ("GET", "/v2/models/exercise"),
                             ("GET", "/v2/models/ultrasound/ready")):
            r = anon.request(method, path, json={"inputs": []}, headers=limited)
            assert r.status_code == 403 and r.json()["error"] == "forbidden", (path, r.text)


# --------------------------------------------------------------------------- /v2: the same answers as /v1


@pytest.mark.ray
def test_v2_exercise_json_and_binary_tensors_match_v1(app, samples):
    client, _ = app
    rows, v1 = samples["exercise"]
    n, f = rows.shape
    flat = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [n, f], "data": rows.ravel().tolist()}]}
    assert_same_as_v1(client.post("/v2/models/exercise/infer", json=flat), v1)
    nested = {"inputs": [{"name": "features", "datatype": "FP64", "shape": [n, f], "data": rows.tolist()}],
              "id": "req-7"}
    r = client.post("/v2/models/exercise/infer", json=nested)
    assert_same_as_v1(r, v1)
    doc = r.json()
    assert doc["id"] == "req-7" and doc["model_name"] == "exercise" and r.headers["X-Medray-Batch-Size"]
    for dtype, np_type in (("FP32", "<f4"), ("FP64", "<f8")):
        raw = rows.astype(np_type).tobytes()
        body, headers = binary_body({"inputs": [{"name": "features", "datatype": dtype, "shape": [n, f],
                                                 "parameters": {"binary_data_size": len(raw)}}],
                                     "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                                                 {"name": "label", "parameters": {"binary_data": True}}]}, raw)
        r = client.post("/v2/models/exercise/infer", content=body, headers=headers)
        assert r.headers["content-type"] == "application/octet-stream" and HEADER in r.headers
        assert_same_as_v1(r, v1)
    # one output asked for, binary or not as asked
    only = client.post("/v2/models/exercise/infer", json={**flat, "outputs": [{"name": "label"}]}).json()
    assert [o["name"] for o in only["outputs"]] == ["label"] and only["outputs"][0]["data"] == v1[1]


@pytest.mark.ray
def test_v2_genomic_and_ultrasound_bytes_tensors_match_v1(app, samples):
    client, _ = app
    seqs, v1 = samples["genomic"]
    js = {"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [len(seqs)], "data": seqs}]}
    assert_same_as_v1(client.post("/v2/models/genomic/infer", json=js), v1)
    raw = bytes_tensor([s.encode() for s in seqs])
    body, headers = binary_body({"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [len(seqs), 1],
                                             "parameters": {"binary_data_size": len(raw)}}],
                                 "parameters": {"binary_data_output": True}}, raw)
    assert_same_as_v1(client.post("/v2/models/genomic/infer", content=body, headers=headers), v1)

    images, v1 = samples["ultrasound"]
    b64 = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                       "data": [base64.b64encode(b).decode() for b in images]}]}
    assert_same_as_v1(client.post("/v2/models/ultrasound/infer", json=b64), v1)
    raw = bytes_tensor(images)
    body, headers = binary_body({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                                             "parameters": {"binary_data_size": len(raw)}}]}, raw)
    assert_same_as_v1(client.post("/v2/models/ultrasound/infer", content=body, headers=headers), v1)


@pytest.mark.ray
def test_tritonclient_talks_to_v2(app, samples):
    tritonclient_http = pytest.importorskip("tritonclient.http")
    client, models = app

    def auth() -> dict:  # tritonclient adds its own headers to the dict it is given: a fresh one per call
        return dict(AUTH)

    triton = tritonclient_http.InferenceServerClient(url=str(client.base_url).removeprefix("http://"),
                                                     connection_timeout=30, network_timeout=60)
    try:
        assert triton.is_server_live() and triton.is_server_ready()
        assert triton.get_server_metadata(headers=auth())["extensions"] == ["binary_tensor_data"]
        assert triton.is_model_ready("exercise", headers=auth())
        meta = triton.get_model_metadata("exercise", headers=auth())
        assert meta["inputs"][0]["name"] == "features" and meta["outputs"][0]["parameters"]["labels"]

        rows, v1 = samples["exercise"]
        x = tritonclient_http.InferInput("features", list(rows.shape), "FP32")
        x.set_data_from_numpy(rows.astype(np.float32), binary_data=True)
        result = triton.infer("exercise", [x], headers=auth())  # no outputs named: binary outputs
        np.testing.assert_allclose(result.as_numpy("probabilities"), v1[0], atol=1e-5)
        assert [s.decode() for s in result.as_numpy("label")] == v1[1]
        x.set_data_from_numpy(rows.astype(np.float32), binary_data=False)
        out = [tritonclient_http.InferRequestedOutput("probabilities", binary_data=False),
               tritonclient_http.InferRequestedOutput("label", binary_data=True)]
        result = triton.infer("exercise", [x], outputs=out, headers=auth(), request_id="t-1",
                              model_version=models["exercise"]["version"])
        assert result.get_response()["id"] == "t-1"
        np.testing.assert_allclose(result.as_numpy("probabilities"), v1[0], atol=1e-5)
        assert [s.decode() for s in result.as_numpy("label")] == v1[1]

        seqs, v1 = samples["genomic"]
        s = tritonclient_http.InferInput("sequences", [len(seqs)], "BYTES")
        s.set_data_from_numpy(np.array([q.encode() for q in seqs], dtype=np.object_))
        result = triton.infer("genomic", [s], headers=auth())
        np.testing.assert_allclose(result.as_numpy("probabilities"), v1[0], atol=1e-5)

        images, v1 = samples["ultrasound"]
        i = tritonclient_http.InferInput("images", [len(images)], "BYTES")
        i.set_data_from_numpy(np.array(images, dtype=np.object_))
        result = triton.infer("ultrasound", [i], headers=auth())
        np.testing.assert_allclose(result.as_numpy("probabilities"), v1[0], atol=1e-5)
        assert [s.decode() for s in result.as_numpy("label")] == v1[1]

        from tritonclient.utils import InferenceServerException

        bad = tritonclient_http.InferInput("features", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        with pytest.raises(InferenceServerException) as e:
            triton.infer("exercise", [bad], headers=auth())
        assert e.value.status() == "422" and "invalid_input" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            triton.infer("exercise", [x])  # no token
        assert e.value.status() == "401"
    finally:
        triton.close()


# --------------------------------------------------------------------------- /v2: the same 4xx as /v1


@pytest.mark.ray
def test_v2_refuses_what_v1_refuses_with_the_same_status_code_and_detail(app):
    client, models = app
    f = len(models["exercise"]["input"]["feature_names"])
    js = {"Content-Type": "application/json"}

    def feats(data, shape):
        return {"inputs": [{"name": "features", "datatype": "FP32", "shape": shape, "data": data}]}

    def seqs(items):
        return {"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [len(items)], "data": items}]}

    def imgs(items):
        return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(items)], "data": items}]}

    rng = np.random.default_rng(0).normal(size=(51, f)).tolist()
    cases = [  # (name, /v1 route + request, /v2 model + request)
        ("wrong feature count", ("exercise", {"json": {"instances": [[1.0, 2.0, 3.0]]}}),
         ("exercise", {"json": feats([1.0, 2.0, 3.0], [1, 3])})),
        ("non-numeric value", ("exercise", {"json": {"instances": [["abc"] + [0.0] * (f - 1)]}}),
         ("exercise", {"json": feats(["abc"] + [0.0] * (f - 1), [1, f])})),
        ("boolean value", ("exercise", {"json": {"instances": [[True] + [0.0] * (f - 1)]}}),
         ("exercise", {"json": feats([True] + [0.0] * (f - 1), [1, f])})),
        ("NaN", ("exercise", {"content": '{"instances": [[NaN' + ", 0.0" * (f - 1) + "]]}", "headers": js}),
         ("exercise", {"content": '{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, %d], '
                                  '"data": [NaN%s]}]}' % (f, ", 0.0" * (f - 1)), "headers": js})),
        ("out of float32 range", ("exercise", {"json": {"instances": [[1e39] + [0.0] * (f - 1)]}}),
         ("exercise", {"json": feats([1e39] + [0.0] * (f - 1), [1, f])})),
        ("too many instances", ("exercise", {"json": {"instances": rng}}),
         ("exercise", {"json": feats(rng, [51, f])})),
        ("invalid JSON", ("exercise", {"content": '{"instances": [[1,', "headers": js}),
         ("exercise", {"content": '{"inputs": [{"name":', "headers": js})),
        ("wrong content type", ("exercise", {"content": "a,b\n1,2\n", "headers": {"Content-Type": "text/csv"}}),
         ("exercise", {"content": "a,b\n1,2\n", "headers": {"Content-Type": "text/csv"}})),
        ("body over the size limit", ("genomic", {"content": b"x" * (2 << 20), "headers": js}),
         ("genomic", {"content": b"x" * (2 << 20), "headers": js})),
        ("letters that are not nucleotides", ("genomic", {"json": {"sequences": ["ACGTXACGT"]}}),
         ("genomic", {"json": seqs(["ACGTXACGT"])})),
        ("sequence over the maximum length", ("genomic", {"json": {"sequences": ["ACGT" * 150]}}),
         ("genomic", {"json": seqs(["ACGT" * 150])})),
        ("sequence that is not a string", ("genomic", {"json": {"sequences": [42]}}),
         ("genomic", {"json": seqs([42])})),
        ("empty sequence list", ("genomic", {"json": {"sequences": []}}), ("genomic", {"json": seqs([])})),
        ("invalid base64", ("ultrasound", {"json": {"images": ["***not base64***"]}}),
         ("ultrasound", {"json": imgs(["***not base64***"])})),
        ("truncated PNG", ("ultrasound", {"json": {"images": [base64.b64encode(_png()[:60]).decode()]}}),
         ("ultrasound", {"json": imgs([base64.b64encode(_png()[:60]).decode()])})),
    ]
    failures = []
    for name, (task1, req1), (task2, req2) in cases:
        r1 = client.post(f"/v1/{task1}/predict", **req1)
        r2 = client.post(f"/v2/models/{task2}/infer", **req2)
        a, b = r1.json(), r2.json()
        same = r1.status_code == r2.status_code and a["error"] == b["error"]
        if name not in ("invalid JSON", "wrong content type"):  # details name the /v1 body's or /v2 doc's format
            same = same and a["detail"] == b["detail"]
        if not same or r1.status_code < 400 or set(b) != {"error", "detail"}:
            failures.append(f"{name}: v1 {r1.status_code} {a} | v2 {r2.status_code} {b}")
    assert not failures, "\n".join(failures)


def _png(size=(64, 64)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, 0).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.ray
def test_v2_framing_errors_are_400s_naming_the_input(app, samples):
    client, models = app
    rows = samples["exercise"][0][:2].astype("<f4")
    f = rows.shape[1]
    raw = rows.tobytes()

    def feats(size, chunks, header=None, shape=(2, f), dtype="FP32"):
        body, headers = binary_body({"inputs": [{"name": "features", "datatype": dtype, "shape": list(shape),
                                                 "parameters": {"binary_data_size": size}}]}, *chunks)
        if header is not None:
            headers[HEADER] = header
        return {"content": body, "headers": headers}

    seq = bytes_tensor([b"ACGTACGT", b"ACGT"])
    cases = [
        ("truncated binary tensor", "exercise", feats(len(raw), [raw[:-10]]), "invalid_tensor",
         ["'features'", "truncated"]),
        ("mis-sized binary tensor", "exercise", feats(len(raw) - 4, [raw[:-4]]), "invalid_tensor",
         ["'features'", str(len(raw) - 4), str(len(raw))]),
        ("bytes beyond the declared size", "exercise", feats(len(raw), [raw, b"\0" * 8]), "invalid_tensor",
         ["'features'", "8 byte(s)"]),
        ("header length beyond the body", "exercise", feats(len(raw), [raw], header="999999"), "invalid_header",
         [HEADER]),
        ("header length not a number", "exercise", feats(len(raw), [raw], header="abc"), "invalid_header", [HEADER]),
        ("FP16 features", "exercise", feats(len(raw) // 2, [raw[:len(raw) // 2]], dtype="FP16"), "invalid_tensor",
         ["'features'", "FP32"]),
        ("rank-1 features", "exercise", feats(len(raw), [raw], shape=(2 * f,)), "invalid_tensor",
         ["'features'", "shape"]),
        ("JSON data of the wrong size", "exercise",
         {"json": {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, f], "data": [0.0] * f}]}},
         "invalid_tensor", ["'features'", str(f), str(2 * f)]),
        ("unknown input name", "exercise",
         {"json": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, f], "data": [0.0] * f}]}},
         "invalid_tensor", ["'x'", "'features'"]),
        ("no inputs", "exercise", {"json": {"inputs": []}}, "invalid_request", ["inputs"]),
        ("input without data", "exercise", {"json": {"inputs": [{"name": "features", "datatype": "FP32",
                                                                 "shape": [1, f]}]}}, "invalid_tensor",
         ["'features'", "data"]),
        ("unknown output", "exercise", {"json": {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, f],
                                                             "data": [0.0] * f}], "outputs": [{"name": "logits"}]}},
         "invalid_request", ["'logits'"]),
        ("truncated BYTES element", "genomic",
         {"content": binary_body({"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [2],
                                              "parameters": {"binary_data_size": len(seq) - 2}}]}, seq[:-2])[0],
          "headers": binary_body({"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [2],
                                              "parameters": {"binary_data_size": len(seq) - 2}}]}, seq[:-2])[1]},
         "invalid_tensor", ["'sequences'", "element 1", "truncated"]),
        ("BYTES element count off the shape", "genomic",
         {"content": binary_body({"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [3],
                                              "parameters": {"binary_data_size": len(seq)}}]}, seq)[0],
          "headers": binary_body({"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [3],
                                              "parameters": {"binary_data_size": len(seq)}}]}, seq)[1]},
         "invalid_tensor", ["'sequences'", "2 element(s)", "3"]),
        ("sequences as FP32", "genomic",
         {"json": {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": [1], "data": [1.0]}]}},
         "invalid_tensor", ["'sequences'", "BYTES"]),
    ]
    failures = []
    for name, model, kwargs, code, words in cases:
        r = client.post(f"/v2/models/{model}/infer", **kwargs)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 400 or body.get("error") != code or not all(w in body.get("detail", "") for w in words):
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
    assert not failures, "\n".join(failures)
    assert client.get("/readyz").status_code == 200  # nothing broke


# --------------------------------------------------------------------------- /metrics


def scrape(client: httpx.Client) -> dict[tuple, float]:
    """GET /metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(snapshot: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in snapshot.items() if n == name and all(dict(ls).get(k) == str(x)
                                                                            for k, x in labels.items()))


def stable_scrape(client: httpx.Client, timeout_s: float = 90) -> dict:
    """/metrics once it has stopped changing over an export interval: earlier requests counted."""
    import ray

    interval = max(ray._config.metrics_report_interval_ms(), 1000) / 1000
    deadline = time.time() + timeout_s
    last = scrape(client)
    while time.time() < deadline:
        time.sleep(interval + 1.5)
        now = scrape(client)
        if now == last:
            return now
        last = now
    raise AssertionError(f"/metrics kept changing for {timeout_s:.0f} s")


@pytest.mark.ray
def test_metrics_count_requests_latency_batches_instances_and_labels(app, samples):
    client, models = app
    rows = samples["exercise"][0]
    seqs = samples["genomic"][0]
    before = stable_scrape(client)

    labels_seen: dict[str, int] = {}
    for i in range(5):  # 5 × 3 exercise rows over /v1
        r = client.post("/v1/exercise/predict", json={"instances": rows[3 * i:3 * i + 3].tolist()})
        assert r.status_code == 200
        for p in r.json()["predictions"]:
            labels_seen[p["label"]] = labels_seen.get(p["label"], 0) + 1
    assert client.post("/v1/exercise/predict", json={"instances": [[1.0]]}).status_code == 422
    body = {"inputs": [{"name": "sequences", "datatype": "BYTES", "shape": [4], "data": seqs[:4]}]}
    for _ in range(2):  # 2 × 4 sequences over /v2
        assert client.post("/v2/models/genomic/infer", json=body).status_code == 200
    with httpx.Client(base_url=str(client.base_url), timeout=30) as anon:
        assert anon.post("/v2/models/genomic/infer", json=body).status_code == 401
        assert anon.get("/metrics").status_code == 401  # token-protected like the rest

    expected = {  # (sample, labels): increase
        ("ray_medray_requests_total", (("model", "exercise"), ("protocol", "v1"), ("status", "200"))): 5,
        ("ray_medray_requests_total", (("model", "exercise"), ("protocol", "v1"), ("status", "422"))): 1,
        ("ray_medray_requests_total", (("model", "genomic"), ("protocol", "v2"), ("status", "200"))): 2,
        ("ray_medray_requests_total", (("model", "genomic"), ("protocol", "v2"), ("status", "401"))): 1,
        ("ray_medray_request_latency_seconds_count", (("code_class", "2xx"), ("model", "exercise"),
                                                      ("protocol", "v1"))): 5,
        ("ray_medray_request_latency_seconds_count", (("code_class", "4xx"), ("model", "genomic"),
                                                      ("protocol", "v2"))): 1,
        ("ray_medray_instances_total", (("model", "exercise"),)): 15,
        ("ray_medray_instances_total", (("model", "genomic"),)): 8,
        # one request at a time: one forward pass each, of 3 rows and of 4 sequences
        ("ray_medray_batch_size_count", (("model", "exercise"),)): 5,
        ("ray_medray_batch_size_bucket", (("le", "4.0"), ("model", "exercise"))): 5,
        ("ray_medray_batch_size_bucket", (("le", "2.0"), ("model", "exercise"))): 0,
        ("ray_medray_batch_size_count", (("model", "genomic"),)): 2,
        ("ray_medray_batch_size_bucket", (("le", "4.0"), ("model", "genomic"))): 2,
        ("ray_medray_batch_size_bucket", (("le", "2.0"), ("model", "genomic"))): 0,
    }
    expected.update({("ray_medray_predicted_labels_total", (("label", k), ("model", "exercise"))): n
                     for k, n in labels_seen.items()})
    deadline, after = time.time() + 90, {}
    while time.time() < deadline:
        after = scrape(client)
        if all(after.get(k, 0) - before.get(k, 0) >= v for k, v in expected.items()):
            break
        time.sleep(1)
    time.sleep(max(__import__("ray")._config.metrics_report_interval_ms(), 1000) / 1000 + 1.5)
    after = scrape(client)  # one more export: nothing beyond what was sent
    got = {k: after.get(k, 0) - before.get(k, 0) for k in expected}
    assert got == {k: float(v) for k, v in expected.items()}, got

    def grew(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("ray_medray_predicted_labels_total", model="exercise") == 15
    assert grew("ray_medray_requests_total", model="exercise") == 6 and grew("ray_medray_requests_total") == 9
    # histograms: cumulative buckets ending in +Inf == count (Ray exports sums from bucket midpoints)
    inf = grew("ray_medray_request_latency_seconds_bucket", model="exercise", protocol="v1", code_class="2xx",
               le="+Inf")
    assert inf == 5 and grew("ray_medray_request_latency_seconds_sum", model="exercise", protocol="v1") > 0
    assert grew("ray_medray_batch_size_bucket", model="genomic", le="+Inf") == 2

    # Ray's own metrics stay on the node's export port, beside medray's (what Prometheus scrapes)
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=30).text
    assert "ray_medray_requests_total{" in text and "ray_serve_" in text

    # the dashboard reads metrics the application exports
    exported = {n for n, _ in after}
    names = set(re.findall(r"\b(ray_medray_\w+)", DASHBOARD.read_text()))
    assert names and names <= exported, names - exported


# --------------------------------------------------------------------------- without Ray


def test_binary_framing_rules():
    from serve.inputs import RequestError
    from serve.v2 import parse_infer_request

    x = np.arange(6, dtype="<f4").reshape(2, 3)
    doc = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 3],
                       "parameters": {"binary_data_size": 24}}]}
    body, headers = binary_body(doc, x.tobytes())
    req = parse_infer_request(body, headers[HEADER])
    assert req.inputs[0].raw == x.tobytes() and req.outputs == {"probabilities": False, "label": False}
    for cut, words in ((body[:-1], ["'features'", "24 bytes", "23", "truncated"]),
                       (body + b"\0", ["'features'", "1 byte(s)"])):
        with pytest.raises(RequestError) as e:
            parse_infer_request(cut, headers[HEADER])
        assert e.value.status == 400 and all(w in e.value.detail for w in words), e.value.detail
    two = {"inputs": [dict(doc["inputs"][0]), {"name": "b", "datatype": "BYTES", "shape": [1],
                                                "parameters": {"binary_data_size": 9}}]}
    body, headers = binary_body(two, x.tobytes(), bytes_tensor([b"ACGTA"]))
    req = parse_infer_request(body, headers[HEADER])
    assert req.inputs[1].raw == bytes_tensor([b"ACGTA"])
    with pytest.raises(RequestError) as e:
        parse_infer_request(body[:-3], headers[HEADER])
    assert "'b'" in e.value.detail  # the input whose data is short, not the first one
    asked = {**doc, "parameters": {"binary_data_output": True},
             "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}]}
    body, headers = binary_body(asked, x.tobytes())
    req = parse_infer_request(body, headers[HEADER])
    assert req.outputs == {"label": False, "probabilities": True}


def test_metrics_from_several_processes_and_nodes_are_summed():
    from serve.metrics import aggregate

    def node(worker: str, n200: float, n422: float, bucket: float) -> str:
        common = f'Component="core_worker",NodeAddress="10.0.0.{worker}",WorkerId="{worker}"'
        return (
            "# HELP ray_node_cpu_count cpus\n# TYPE ray_node_cpu_count gauge\nray_node_cpu_count 4.0\n"
            "# HELP ray_medray_requests_total reqs\n# TYPE ray_medray_requests_total counter\n"
            f'ray_medray_requests_total{{{common},model="exercise",protocol="v1",status="200"}} {n200}\n'
            f'ray_medray_requests_total{{{common},model="exercise",protocol="v1",status="422"}} {n422}\n'
            "# HELP ray_medray_batch_size batch\n# TYPE ray_medray_batch_size histogram\n"
            f'ray_medray_batch_size_bucket{{{common},le="1.0",model="exercise"}} {bucket}\n'
            f'ray_medray_batch_size_bucket{{{common},le="+Inf",model="exercise"}} {bucket + 1}\n'
            f'ray_medray_batch_size_count{{{common},model="exercise"}} {bucket + 1}\n'
            f'ray_medray_batch_size_sum{{{common},model="exercise"}} {bucket + 7}\n')

    text = aggregate([node("1", 5, 1, 2), node("2", 3, 0, 1)])
    assert "ray_node_cpu_count" not in text and "WorkerId" not in text
    assert 'ray_medray_requests_total{model="exercise",protocol="v1",status="200"} 8.0' in text
    assert 'ray_medray_requests_total{model="exercise",protocol="v1",status="422"} 1.0' in text
    assert "# TYPE ray_medray_requests_total counter" in text and "# TYPE ray_medray_batch_size histogram" in text
    assert 'ray_medray_batch_size_bucket{le="1.0",model="exercise"} 3.0' in text
    assert 'ray_medray_batch_size_bucket{le="+Inf",model="exercise"} 5.0' in text
    assert 'ray_medray_batch_size_sum{model="exercise"} 17.0' in text
    assert text.index('le="1.0"') < text.index('le="+Inf"')
    assert aggregate([]) == ""


def test_route_rules_and_public_metrics(tmp_path):
    import asyncio

    from serve.security import SecurityConfig, SecurityMiddleware, audit_route, inference_route, route_task

    assert route_task("/v2/models/exercise/infer") == "exercise"
    assert route_task("/v2/models/genomic/versions/abc/ready") == "genomic"
    assert route_task("/v2/models/genomic") == "genomic" and route_task("/v2/models/cardiology/infer") is None
    assert inference_route("/v2/models/ultrasound/versions/1/infer") == ("ultrasound", "v2")
    assert inference_route("/v1/genomic/generate") == ("genomic-gan", "v1")
    assert inference_route("/v2/models/exercise") is None and inference_route("/metrics") is None
    assert audit_route("/v2/models/cardiology/infer") == "other"
    assert audit_route("/v2/models/genomic/infer") == "/v2/models/genomic/infer" and audit_route("/metrics") == "/metrics"

    class App:  # an ASGI app behind SecurityMiddleware: 200 for whatever reaches it
        def __init__(self, config):
            self.state = type("State", (), {"security": config})()

        async def __call__(self, scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    def status(config, path):
        app = App(config)
        sent = []

        async def send(m):
            sent.append(m)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": path, "headers": [], "app": app}
        asyncio.run(SecurityMiddleware(app)(scope, receive, send))
        return sent[0]["status"]

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    closed = SecurityConfig.from_args({"tokens_file": str(tokens)}, configure_log=False)
    open_ = SecurityConfig.from_args({"tokens_file": str(tokens)}, configure_log=False, public_metrics=True)
    closed.audit = open_.audit = False
    assert status(closed, "/metrics") == 401 and status(open_, "/metrics") == 200
    assert status(closed, "/v2/health/live") == 200 and status(closed, "/v2/models/exercise") == 401


def test_build_app_checks_the_metrics_setting():
    from serve.app import build_app

    with pytest.raises(ValueError, match="metrics"):
        build_app({"bundles": {"genomic": "x"}, "auth": {"enabled": False}, "metrics": {"public": "yes"}})
    with pytest.raises(ValueError, match="metrics"):
        build_app({"bundles": {"genomic": "x"}, "auth": {"enabled": False}, "metrics": {"port": 9}})
    build_app({"bundles": {"genomic": "x"}, "auth": {"enabled": False}, "metrics": {"public": True}})



def test_a_port_left_in_time_wait_by_an_earlier_server_is_free_for_the_next():
    """The port check binds as Serve's HTTP server does: the TIME_WAIT connections an earlier
    application leaves for a minute (here: one the server closed first) do not block a new one on
    the same port; a listener does."""
    import socket

    from medray.errors import MedrayError
    from serve.local import check_port

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end stays in TIME_WAIT
    time.sleep(0.1)
    client.close()
    server.close()
    check_port("127.0.0.1", port)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(MedrayError, match="in use"):
            check_port("127.0.0.1", holder.getsockname()[1])
