"""Jobs on a real two-node Ray cluster started here (`ray start --head` + `ray start --address`):
`medray submit` runs a training job spec with one worker on each node, `medray jobs logs/stop`."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port, shared

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TRAIN_V2_ENABLED"] = "1"
    # the nodes run in this environment, as a cluster's nodes run in theirs: `python` in a job's
    # entrypoint is this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _alive_nodes(dashboard: str) -> int:
    from ray.util.state import list_nodes

    return sum(1 for n in list_nodes(address=dashboard) if n.state == "ALIVE")


GCS = {}  # the running cluster's GCS address, for drivers that connect to it directly


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (GCS + dashboard/Jobs API) and one worker node, 3 logical CPUs each; stopped after."""
    gcs, dash = free_port(), free_port()
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "3", "--disable-usage-stats"]

    def own_ports():
        # each node's agents on ports of their own: with Ray's fixed defaults (52365, …) they
        # collide with the test session's local instance, and the head's job agent never comes up
        # ("No available agent to submit job")
        return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--ray-client-server-port", str(free_port())]

    logs = tmp_path_factory.mktemp("cluster-logs")
    procs = [subprocess.Popen([RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                               "--dashboard-port", str(dash), "--include-dashboard", "true",
                               "--resources", '{"medray_head": 1}', *common, *own_ports()],
                              env=_env(), start_new_session=True, stdout=open(logs / "head.log", "w"),
                              stderr=subprocess.STDOUT)]
    address = f"http://127.0.0.1:{dash}"
    GCS["address"] = f"127.0.0.1:{gcs}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{address}/api/version", timeout=2).status == 200, 120, "head node")
        procs.append(subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{gcs}",
                                       "--resources", '{"medray_worker": 1}', *common, *own_ports()],
                                      env=_env(), start_new_session=True, stdout=open(logs / "worker.log", "w"),
                                      stderr=subprocess.STDOUT))
        _wait(lambda: _alive_nodes(address) == 2, 120, "second node")
        yield address
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)


def _wait(check, timeout_s: float, what: str):
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(1)
    raise AssertionError(f"{what} not ready after {timeout_s}s: {last}")


def medray(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medray", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    """`medray submit --follow` of a genomic spec: two workers spread over the two nodes."""
    tmp = tmp_path_factory.mktemp("submitted")
    spec = {"task": "genomic", "data": str(shared("genomic", "splice.fasta")), "out": str(tmp / "bundle"),
            "storage": str(tmp / "runs"), "name": "two-nodes", "epochs": 2, "workers": 2,
            "group_column": "id-prefix", "placement_strategy": "STRICT_SPREAD"}
    spec_file = tmp / "genomic.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    return medray("submit", str(spec_file), "--address", cluster, "--follow"), tmp


def test_submitted_job_trains_on_both_nodes_and_writes_its_bundle(cluster, submitted):
    r, tmp_path = submitted
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    last = meta["metrics"]["history"][-1]
    assert meta["training"]["epochs_trained"] == 2
    assert len(set(last["node_per_worker"])) == 2, f"both workers on one node: {last['node_per_worker']}"
    assert (tmp_path / "runs" / "two-nodes").is_dir()  # checkpoints where the spec says
    logs = medray("jobs", "logs", job_id, "--address", cluster)
    assert logs.returncode == 0 and "[medray] job done" in logs.stdout
    listed = medray("jobs", "list", "--address", cluster)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout


_SCAN = """
import json, sys
from medray.ray_runtime import ensure_ray
ensure_ray(sys.argv[1])
from medray.data import pipeline
keys = pipeline.read_keys(pipeline.open_source("ultrasound", sys.argv[2]))
print(json.dumps({"rows": len(keys), "nodes": keys.nodes}))
"""


def test_training_data_is_read_on_both_nodes(cluster):
    """The scan (decode and check every image) runs as Ray Data tasks spread over the cluster."""
    r = subprocess.run([sys.executable, "-c", _SCAN, GCS["address"], str(shared("ultrasound", "labels.csv"))],
                       capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rows"] == 552 and len(out["nodes"]) == 2, out
    assert min(out["nodes"].values()) >= 552 // 10, out  # each node read a real share


def test_submitted_predict_job_scores_on_both_nodes(cluster, submitted, tmp_path):
    """A batch-inference spec (`bundle:`), submitted like a training one: the images are read on
    both nodes and the two predictor actors spread over them; the result is a folder of Parquet
    parts that appears whole, with _SUCCESS."""
    import pyarrow.parquet as pq
    from ray.util.state import list_actors

    _, tmp = submitted
    assert (tmp / "bundle" / "bundle.json").is_file(), "the submitted job did not write its bundle"
    data = tmp_path / "night.fasta"  # 5x the public data, so each actor gets real work
    data.write_text(shared("genomic", "splice.fasta").read_text() * 5)
    spec = {"bundle": str(tmp / "bundle"), "data": str(data), "out": str(tmp_path / "scores"), "actors": 2,
            "batch_size": 128}
    spec_file = tmp_path / "predict.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    r = medray("submit", str(spec_file), "--address", cluster, "--follow")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    assert (tmp_path / "scores" / "_SUCCESS").exists()
    assert pq.read_table(tmp_path / "scores").num_rows == 5 * 2231
    logs = medray("jobs", "logs", job_id, "--address", cluster).stdout
    assert "[medray] job done" in logs and '"engine": "ray"' in logs, logs[-2000:]
    # Ray Data names its actors after the map they run. Asked through the dashboard's URL: given a
    # GCS address, the state API points this process's own Ray KV client at that GCS, and once the
    # cluster is stopped the session's driver exits (status 1, nothing printed) on its next use
    every = list_actors(address=cluster, detail=True, limit=10000)
    actors = [a for a in every if "MapBatches(Predictor)" in (a.class_name or "")]
    assert len({a.node_id for a in actors}) == 2, [(a.class_name, a.node_id, a.state) for a in every]


def test_rayservice_serve_config_deploys_on_the_cluster_and_predicts(cluster, submitted, tmp_path):
    """The serveConfigV2 of the rendered RayService (k8s/), deployed with `serve deploy`: only the
    bundle paths, the address it listens on and the tokens file are changed for this machine."""
    import shutil

    import httpx

    if not shutil.which("kubectl"):
        pytest.skip("kubectl not on PATH (Debian package kubectl) to render k8s/base")
    _, tmp = submitted
    assert (tmp / "bundle" / "bundle.json").is_file(), "the submitted job did not write its bundle"
    rendered = yaml.safe_load_all(subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "base")],
                                                 capture_output=True, text=True, check=True).stdout)
    (service,) = [d for d in rendered if d and d.get("kind") == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    config["proxy_location"] = "HeadOnly"  # both nodes share this machine (and so the port)
    app = config["applications"][0]
    app["args"]["bundles"] = {"genomic": str(tmp / "bundle")}  # the bundle the job above wrote
    assert app["args"]["auth"] == {"tokens_file": "/etc/medray/tokens"}  # the mounted Secret
    token = "cluster-test-token-" + "t" * 16
    (tmp_path / "tokens").write_text(token + "\n")
    app["args"]["auth"] = {"tokens_file": str(tmp_path / "tokens")}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("ingress", "genomic")]
    config_file = tmp_path / "serve-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    serve_cli = str(Path(sys.executable).with_name("serve"))
    r = subprocess.run([serve_cli, "deploy", str(config_file), "--address", cluster], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 180, "deployed application")
    seq = {"sequences": ["ACGT" * 15]}
    assert httpx.post(f"{url}/v1/genomic/predict", json=seq, timeout=30).status_code == 401
    answer = httpx.post(f"{url}/v1/genomic/predict", json=seq, timeout=30, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1, answer.text
    subprocess.run([serve_cli, "shutdown", "--address", cluster, "-y"], capture_output=True, env=_env(), timeout=120)


def test_rayjob_entrypoint_runs_on_the_cluster(cluster, tmp_path):
    """The genomic RayJob's entrypoint string from k8s/base, run as a job on this cluster with two
    changes only: the PVC's mount point `/data/` becomes `data/` in the job's directory (a folder of
    the same layout, datasets/ linked to ../shared/data), and `--epochs 2` is appended (the last
    flag wins) so it takes a minute, not the preset's thirty epochs."""
    import shutil

    from ray.job_submission import JobStatus, JobSubmissionClient

    if not shutil.which("kubectl"):
        pytest.skip("kubectl not on PATH (Debian package kubectl) to render k8s/base")
    rendered = yaml.safe_load_all(subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "base")],
                                                 capture_output=True, text=True, check=True).stdout)
    (job,) = [d for d in rendered if d and d.get("kind") == "RayJob" and d["metadata"]["name"].endswith("-genomic")]
    entrypoint = job["spec"]["entrypoint"]
    mount = tmp_path / "data"
    (mount / "datasets").mkdir(parents=True)
    (mount / "datasets" / "genomic").symlink_to(shared("genomic"))
    # 2 epochs: the preset's 30 take minutes on this machine
    command = f"cd {tmp_path} && " + entrypoint.replace("/data/", "data/") + " --epochs 2"
    client = JobSubmissionClient(cluster)
    job_id = client.submit_job(entrypoint=command)
    _wait(lambda: client.get_job_status(job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED),
          900, "RayJob entrypoint")
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    meta = json.loads((mount / "bundles" / "genomic" / "bundle.json").read_text())
    assert meta["task"] == "genomic" and meta["training"]["workers"] == 2
    assert (mount / "runs").is_dir()


def test_a_running_job_can_be_stopped(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = {"task": "genomic", "data": str(shared("genomic", "splice.fasta")), "out": str(tmp_path / "bundle"),
            "storage": str(tmp_path / "runs"), "name": "to-stop", "epochs": 200, "workers": 1}
    spec_file = tmp_path / "long.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    r = medray("submit", str(spec_file), "--address", cluster)
    assert r.returncode == 0, r.stderr[-2000:]
    job_id = r.stdout.strip().splitlines()[0]
    client = JobSubmissionClient(cluster)
    _wait(lambda: client.get_job_status(job_id) == JobStatus.RUNNING, 120, "job start")
    stop = medray("jobs", "stop", job_id, "--address", cluster)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    _wait(lambda: client.get_job_status(job_id) == JobStatus.STOPPED, 120, "job stop")
    assert not (tmp_path / "bundle").exists()


def test_bad_spec_is_refused_before_submission(tmp_path):
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text("task: genomic\ndata: x.fasta\nepochs: ten\n")
    r = medray("submit", str(spec_file), "--address", "http://127.0.0.1:9")
    assert r.returncode == 2 and "missing required setting 'out'" in r.stderr
    spec_file.write_text("task: genomic\ndata: x.fasta\nout: b\nepochs: ten\n")
    r = medray("submit", str(spec_file), "--address", "http://127.0.0.1:9")
    assert r.returncode == 2 and "'epochs' must be int" in r.stderr
