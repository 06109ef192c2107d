"""Kubernetes manifests (k8s/): rendered with `kubectl kustomize`, validated offline, cross-checked.

* every ray.io/v1 object against the KubeRay CRDs' openAPIV3Schema (jsonschema; objects are closed
  the way the API server's strict field validation treats them, so a misspelt field fails), and every
  core object with kubernetes-validate's bundled Kubernetes schemas;
* the RayService's serveConfigV2 is serve/config.yaml as k8s/render_serve_config.py turns it
  (so an edit to either one without re-running the script fails here);
* the Serve autoscaler's demand fits what the Ray autoscaler may add (worker maxReplicas);
* the training and nightly-scoring RayJobs: lifetimes, entrypoints the real `medray` parser accepts, bundles written
  where the RayService reads them; prod on GPUs, dev without;
* every container non-root, no privilege escalation, no capabilities, read-only root with /tmp.

No Ray and no cluster: needs kubectl (skipped without it) and, for the CRD checks, the KubeRay CRDs in
../shared/k8s/crds beside the checkout.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = Path(__file__).resolve().parents[2] / "shared" / "k8s" / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
LAYOUTS = ("base", "dev", "prod")
NAMESPACE = "medray"
RAY_UID = 1000
TASKS = ("exercise", "ultrasound", "genomic", "genomic-gan")  # what the RayJobs train and the RayService serves
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_script():
    spec = importlib.util.spec_from_file_location("render_serve_config", K8S / "render_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_script = _load_script()


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=None)
def _kustomize(layout: str) -> tuple:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: it renders the kustomize layouts (kubectl kustomize)")
    path = K8S / "base" if layout == "base" else K8S / "overlays" / layout
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.load_all(out.stdout, Loader=LOADER) if d)


def rendered(layout: str) -> list[dict]:
    """The objects of a layout (copies: tests may change them)."""
    return copy.deepcopy(list(_kustomize(layout)))


def objects(layout: str, kind: str) -> list[dict]:
    return [d for d in rendered(layout) if d["kind"] == kind]


def one(layout: str, kind: str) -> dict:
    found = objects(layout, kind)
    assert len(found) == 1, f"{layout}: expected one {kind}, found {len(found)}"
    return found[0]


def cluster_spec(obj: dict) -> dict:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    return {"RayCluster": lambda o: o["spec"], "RayJob": lambda o: o["spec"]["rayClusterSpec"],
            "RayService": lambda o: o["spec"]["rayClusterConfig"]}[obj["kind"]](obj)


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod a Ray object makes: head, worker groups, RayJob submitter."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    cs = cluster_spec(obj)
    pods = [(f"{name} head", cs["headGroupSpec"]["template"]["spec"])]
    pods += [(f"{name} {g['groupName']}", g["template"]["spec"]) for g in cs.get("workerGroupSpecs", [])]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        pods.append((f"{name} submitter", obj["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def ray_objects(layout: str) -> list[dict]:
    return [d for d in rendered(layout) if d["apiVersion"] == "ray.io/v1"]


def serve_config_of(layout: str) -> dict:
    return yaml.safe_load(one(layout, "RayService")["spec"]["serveConfigV2"])


def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity as a number ("500m" -> 0.5, "4" -> 4, 1 -> 1)."""
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def logical_cpus(group: dict) -> float:
    """CPUs Ray advertises for a pod of the group: rayStartParams num-cpus, else the container's CPU limit."""
    params = group.get("rayStartParams") or {}
    if "num-cpus" in params:
        return float(params["num-cpus"])
    return quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


def gpus(group: dict) -> float:
    params = group.get("rayStartParams") or {}
    if "num-gpus" in params:
        return float(params["num-gpus"])
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    return quantity(limits.get("nvidia.com/gpu", 0))


# --------------------------------------------------------------------------- CRD schemas


def _closed_jsonschema(node):
    """An OpenAPI v3 schema node of a CRD as JSON Schema. `x-kubernetes-*` keys are dropped after
    use: int-or-string becomes anyOf integer/string, preserve-unknown-fields keeps an object open;
    every other object with `properties` is closed (additionalProperties false), as structural
    schemas and kubectl's strict field validation treat unknown fields. `nullable` admits null.
    CEL rules (x-kubernetes-validations) are not evaluated."""
    if isinstance(node, list):
        return [_closed_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: _closed_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = _closed_jsonschema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency: pip install -e '.[test]'")
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not present at {CRDS} (CI has ../shared/k8s/crds beside the checkout)")
    validators = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((CRDS / filename).read_text(), Loader=LOADER)
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _closed_jsonschema(v1["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def crd_errors(validators, obj: dict) -> list[str]:
    assert obj["apiVersion"] == "ray.io/v1", obj["apiVersion"]
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validators[obj["kind"]].iter_errors(obj))


@pytest.fixture(scope="module")
def k8s_validate():
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate is a test dependency: pip install -e '.[test]'")
    version = kv.latest_version()  # the newest Kubernetes whose schemas the package bundles (offline)

    def errors(obj: dict) -> list[str]:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
        return []

    errors.version = version
    return errors


# --------------------------------------------------------------------------- the generated Serve config


def test_generated_files_are_current():
    """k8s/base/rayservice.yaml and the prod serve-config patch are what the script writes now."""
    for path, content in render_script.render().items():
        assert path.read_text() == content, (
            f"{path.relative_to(ROOT)} is out of date: run python k8s/render_serve_config.py")
    assert render_script.main(["--check"]) == 0


def test_k8s_serve_config_is_serve_config_yaml_with_only_paths_host_tokens_and_gpus_changed():
    source = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    k8s = render_script.k8s_serve_config(source, gpus_per_model_replica=0.5)
    app, src_app = k8s["applications"][0], source["applications"][0]
    tasks = list(src_app["args"]["bundles"])
    assert tasks == list(TASKS), "the RayJobs and this test know these tasks; add a RayJob for a new one"
    assert app["args"]["bundles"] == {t: f"/data/bundles/{t}" for t in tasks}
    assert k8s["http_options"]["host"] == "0.0.0.0"
    deployments = {d["name"]: d for d in app["deployments"]}
    assert all(deployments[t]["ray_actor_options"]["num_gpus"] == 0.5 for t in tasks)
    assert deployments["ingress"]["ray_actor_options"].get("num_gpus", 0) == 0
    assert app["args"]["local_models"] == [] and src_app["args"]["local_models"]  # GPU replicas only
    # ... so no model may wait at zero replicas for its first request (the source starts local ones at 0)
    assert any(d["autoscaling_config"].get("min_replicas") == 0 for d in src_app["deployments"] if d["name"] in tasks)
    assert all(deployments[t]["autoscaling_config"]["min_replicas"] >= 1 for t in tasks)

    # undo exactly those changes: what is left must be serve/config.yaml, untouched
    undone = copy.deepcopy(k8s)
    undone["http_options"]["host"] = source["http_options"]["host"]
    undone["applications"][0]["args"]["bundles"] = src_app["args"]["bundles"]
    assert app["args"]["auth"] == {"tokens_file": "/etc/medray/tokens"}  # on, from the mounted Secret
    undone["applications"][0]["args"]["auth"] = src_app["args"]["auth"]
    undone["applications"][0]["args"]["local_models"] = src_app["args"]["local_models"]
    src_deployments = {d["name"]: d for d in src_app["deployments"]}
    for d in undone["applications"][0]["deployments"]:
        if d["name"] in tasks:
            d["autoscaling_config"] = src_deployments[d["name"]]["autoscaling_config"]
        options, src_options = d.get("ray_actor_options", {}), src_deployments[d["name"]].get("ray_actor_options", {})
        if "num_gpus" in src_options:
            options["num_gpus"] = src_options["num_gpus"]
        else:
            options.pop("num_gpus", None)
    assert undone == source
    assert source["http_options"]["host"] == "127.0.0.1", "the script must not modify its input"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rayservice_serve_config_v2_is_generated_from_serve_config_yaml(layout):
    source = render_script.load_serve_config(ROOT / "serve" / "config.yaml")
    gpus_per_replica = render_script.PROD_GPUS_PER_MODEL_REPLICA if layout == "prod" else None
    assert serve_config_of(layout) == render_script.k8s_serve_config(source, gpus_per_replica)


def test_an_edit_to_serve_config_yaml_alone_is_caught(tmp_path):
    """Change serve/config.yaml (a copy) without re-rendering: the committed RayService no longer matches."""
    edited = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    edited["applications"][0]["deployments"][1]["autoscaling_config"]["max_replicas"] += 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    outputs = render_script.render(serve_config=path)
    base_file = K8S / "base" / "rayservice.yaml"
    assert outputs[base_file] != base_file.read_text()
    committed = yaml.safe_load(yaml.safe_load(base_file.read_text())["spec"]["serveConfigV2"])
    assert committed != render_script.k8s_serve_config(edited)


# --------------------------------------------------------------------------- schema validation


EXPECTED_KINDS = {
    "base": {"Namespace": 1, "ServiceAccount": 1, "Secret": 1, "PersistentVolumeClaim": 1, "NetworkPolicy": 1,
             "Ingress": 1, "RayCluster": 1, "RayJob": 5, "RayService": 1},
}
EXPECTED_KINDS["dev"] = EXPECTED_KINDS["base"]
EXPECTED_KINDS["prod"] = {k: v for k, v in EXPECTED_KINDS["base"].items() if k != "Secret"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_renders_the_expected_objects_in_the_namespace(layout):
    docs = rendered(layout)
    kinds = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds == EXPECTED_KINDS[layout]
    for d in docs:
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == NAMESPACE
        else:
            assert d["metadata"]["namespace"] == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ray_objects_are_valid_against_the_kuberay_crds(layout, crd_validators):
    checked = 0
    for obj in ray_objects(layout):
        errors = crd_errors(crd_validators, obj)
        assert errors == [], f"{layout}: {obj['kind']}/{obj['metadata']['name']}:\n" + "\n".join(errors)
        checked += 1
    assert checked == 7


@pytest.mark.parametrize("layout", LAYOUTS)
def test_core_objects_are_valid_kubernetes(layout, k8s_validate):
    checked = set()
    for obj in rendered(layout):
        if obj["apiVersion"] == "ray.io/v1":
            continue
        errors = k8s_validate(obj)
        assert errors == [], (f"{layout}: {obj['kind']}/{obj['metadata']['name']} (Kubernetes "
                              f"{k8s_validate.version}):\n" + "\n".join(errors))
        checked.add(obj["kind"])
    assert checked >= {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "NetworkPolicy", "Ingress"}


def test_broken_ray_manifests_are_rejected(crd_validators):
    cluster = one("base", "RayCluster")
    assert crd_errors(crd_validators, cluster) == []

    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["minReplicas"] = "two"
    assert any(e.startswith("spec.workerGroupSpecs.0.minReplicas:") for e in crd_errors(crd_validators, wrong_type))

    missing = copy.deepcopy(cluster)
    del missing["spec"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in e for e in crd_errors(crd_validators, missing))

    misspelt = copy.deepcopy(cluster)
    misspelt["spec"]["enableInTreeAutoscalling"] = misspelt["spec"].pop("enableInTreeAutoscaling")
    assert any("enableInTreeAutoscalling" in e for e in crd_errors(crd_validators, misspelt))

    bad_quantity = copy.deepcopy(cluster)
    bad_quantity["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "four"
    assert crd_errors(crd_validators, bad_quantity) != []

    service = one("base", "RayService")
    no_cluster = copy.deepcopy(service)
    del no_cluster["spec"]["rayClusterConfig"]
    assert any("rayClusterConfig" in e for e in crd_errors(crd_validators, no_cluster))

    job = objects("base", "RayJob")[0]
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["ttlSecondsAfterFinished"] = "10m"
    assert any(e.startswith("spec.ttlSecondsAfterFinished:") for e in crd_errors(crd_validators, bad_job))


def test_broken_core_manifests_are_rejected(k8s_validate):
    ingress = one("base", "Ingress")
    assert k8s_validate(ingress) == []
    bad_port = copy.deepcopy(ingress)
    bad_port["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["number"] = "8000"
    assert k8s_validate(bad_port) != []

    pvc = one("base", "PersistentVolumeClaim")
    unknown = copy.deepcopy(pvc)
    unknown["spec"]["accesModes"] = unknown["spec"].pop("accessModes")
    assert k8s_validate(unknown) != []


# --------------------------------------------------------------------------- autoscaling


def capacity_problems(serve_config: dict, cluster: dict, *, cpu_at_max: bool) -> list[str]:
    """Does what Serve may ask for fit in what the Ray autoscaler may add? (k8s/README.md, "Autoscaling")

    GPUs: sum over deployments of max_replicas x num_gpus <= sum over worker groups of
    maxReplicas x GPUs per pod, and each replica's GPUs and CPUs fit on one pod.
    CPUs: the minimum replicas always fit; with cpu_at_max, the maximum replicas too.
    """
    problems = []
    groups = cluster.get("workerGroupSpecs", [])
    gpu_capacity = sum(g["maxReplicas"] * gpus(g) for g in groups)
    cpu_capacity = sum(g["maxReplicas"] * logical_cpus(g) for g in groups)
    largest_gpu = max((gpus(g) for g in groups), default=0)
    largest_cpu = max((logical_cpus(g) for g in groups), default=0)
    gpu_max = cpu_min = cpu_max = 0.0
    for app in serve_config["applications"]:
        for d in app["deployments"]:
            scaling = d.get("autoscaling_config") or {}
            lo = scaling.get("min_replicas", d.get("num_replicas", 1))
            hi = scaling.get("max_replicas", d.get("num_replicas", 1))
            opts = d.get("ray_actor_options") or {}
            g, c = opts.get("num_gpus", 0), opts.get("num_cpus", 1)
            gpu_max += hi * g
            cpu_min += lo * c
            cpu_max += hi * c
            if g > largest_gpu:
                problems.append(f"a {d['name']} replica needs {g} GPU, no worker pod has that many")
            if c > largest_cpu:
                problems.append(f"a {d['name']} replica needs {c} CPU, no worker pod has that many")
    if gpu_max > gpu_capacity:
        problems.append(f"Serve may ask for {gpu_max} GPUs; the worker groups reach {gpu_capacity}")
    if cpu_min > cpu_capacity:
        problems.append(f"the minimum replicas need {cpu_min} CPUs; the worker groups reach {cpu_capacity}")
    if cpu_at_max and cpu_max > cpu_capacity:
        problems.append(f"Serve may ask for {cpu_max} CPUs; the worker groups reach {cpu_capacity}")
    if gpu_max == 0 and gpu_capacity > 0:
        problems.append("GPU worker pods but no Serve replica uses a GPU")
    return problems


@pytest.mark.parametrize("layout", LAYOUTS)
def test_serve_autoscaler_and_ray_autoscaler_agree(layout):
    service = one(layout, "RayService")
    cluster = cluster_spec(service)
    assert cluster["enableInTreeAutoscaling"] is True
    # dev is capped at one small worker on purpose: only the minimum replicas must fit there
    assert capacity_problems(serve_config_of(layout), cluster, cpu_at_max=layout != "dev") == []


def test_prod_gpu_arithmetic():
    """The README's numbers: 0.5 GPU x (4+4+4+2) model replicas = 7 GPUs <= maxReplicas 8 one-GPU pods."""
    config = serve_config_of("prod")
    models = [d for d in config["applications"][0]["deployments"] if d["name"] != "ingress"]
    need = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_gpus"] for d in models)
    (group,) = cluster_spec(one("prod", "RayService"))["workerGroupSpecs"]
    assert group["groupName"] == "gpu-workers" and gpus(group) == 1
    assert group["maxReplicas"] >= math.ceil(need) > 0


def test_autoscaler_check_fails_when_serve_outgrows_the_workers():
    config = serve_config_of("prod")
    cluster = cluster_spec(one("prod", "RayService"))
    assert capacity_problems(config, cluster, cpu_at_max=True) == []
    bigger = copy.deepcopy(config)
    for d in bigger["applications"][0]["deployments"]:
        if d["name"] == "genomic":
            d["autoscaling_config"]["max_replicas"] += 4  # +2 GPUs: 9 > 8
    assert any("GPUs" in p for p in capacity_problems(bigger, cluster, cpu_at_max=True))
    whole_gpu = copy.deepcopy(config)
    whole_gpu["applications"][0]["deployments"][1]["ray_actor_options"]["num_gpus"] = 2
    assert any("no worker pod has that many" in p for p in capacity_problems(whole_gpu, cluster, cpu_at_max=True))


# --------------------------------------------------------------------------- GPUs: prod yes, dev no


def test_prod_workers_have_gpus_on_gpu_nodes():
    for obj in ray_objects("prod"):
        cs = cluster_spec(obj)
        head = cs["headGroupSpec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in str(head["containers"][0].get("resources")), "the head needs no GPU"
        (group,) = cs["workerGroupSpecs"]
        spec = group["template"]["spec"]
        resources = spec["containers"][0]["resources"]
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert quantity(resources["requests"]["nvidia.com/gpu"]) >= 1, name
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"], name
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                   for t in spec.get("tolerations", [])), name
        assert spec.get("nodeSelector"), name


@pytest.mark.parametrize("layout", ("base", "dev"))
def test_base_and_dev_have_no_gpus(layout):
    for obj in ray_objects(layout):
        assert "nvidia.com/gpu" not in yaml.safe_dump(obj), f"{obj['kind']}/{obj['metadata']['name']}"
        for where, spec in pod_specs(obj):
            assert not spec.get("tolerations") and not spec.get("nodeSelector"), where
    for app in serve_config_of(layout)["applications"]:
        assert all(d.get("ray_actor_options", {}).get("num_gpus", 0) == 0 for d in app["deployments"])
    for job in objects(layout, "RayJob"):
        assert "--gpu" not in shlex.split(job["spec"]["entrypoint"])


def test_dev_is_one_small_cpu_worker_per_cluster():
    for obj in ray_objects("dev"):
        (group,) = cluster_spec(obj)["workerGroupSpecs"]
        assert group["maxReplicas"] == 1, obj["metadata"]["name"]
        assert quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) <= 2


# --------------------------------------------------------------------------- training jobs


def parse_entrypoint(entrypoint: str):
    from medray.cli import build_parser

    argv = shlex.split(entrypoint)
    assert argv[0] == "medray", entrypoint
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`medray` rejects the RayJob entrypoint (see its usage message above): {entrypoint}")


def _jobs(layout: str, command: str) -> list[dict]:
    """The RayJobs of a layout whose entrypoint runs `medray COMMAND` (train or predict)."""
    return [j for j in objects(layout, "RayJob") if shlex.split(j["spec"]["entrypoint"])[1] == command]


def _lifetimes(job: dict) -> None:
    spec, name = job["spec"], job["metadata"]["name"]
    assert spec["shutdownAfterJobFinishes"] is True, name
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0, name
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] >= 3600, name
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1, name
    assert "clusterSelector" not in spec, f"{name}: each job brings its own cluster"


def _mounts_shared_volume(job: dict) -> None:
    for where, pod in pod_specs(job)[:-1]:  # head and workers, not the submitter
        data = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/data"]
        assert data and not data[0].get("readOnly"), where
        (volume,) = [v for v in pod["volumes"] if v["name"] == data[0]["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == "medray-data", where


def test_every_rayjob_trains_or_predicts():
    for layout in LAYOUTS:
        names = {j["metadata"]["name"] for j in objects(layout, "RayJob")}
        assert names == {j["metadata"]["name"] for c in ("train", "predict") for j in _jobs(layout, c)}, layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nightly_scoring_job_scores_a_served_bundle_on_its_own_cluster(layout):
    jobs = _jobs(layout, "predict")
    assert jobs, f"{layout}: no batch-inference RayJob"
    served = serve_config_of(layout)["applications"][0]["args"]["bundles"]
    for job in jobs:
        name = job["metadata"]["name"]
        _lifetimes(job)
        args = parse_entrypoint(job["spec"]["entrypoint"])  # the real CLI: a wrong flag fails here
        assert args.bundle in served.values(), f"{name}: {args.bundle} is not a bundle the RayService serves"
        assert name == f"medray-predict-{args.bundle.rsplit('/', 1)[1]}"
        for path in (args.data, args.out):
            assert path.startswith("/data/"), f"{name}: {path} is not on the shared volume"
        assert args.out.startswith("/data/predictions/") and "." not in args.out.rsplit("/", 1)[1], \
            f"{name}: a folder of parts (written in parallel) under /data/predictions"
        assert args.engine == "ray", f"{name}: a cluster job always scores on Ray Data"
        assert args.gpu is (layout == "prod"), name
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if args.gpu:
            assert sum(g["minReplicas"] * gpus(g) for g in groups) >= args.actors, name
        else:  # the actors (1 CPU each) and the read tasks beside them
            assert sum(g["minReplicas"] * logical_cpus(g) for g in groups) >= args.actors + 1, name
        _mounts_shared_volume(job)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_jobs_clean_up_and_train_what_is_served(layout):
    jobs = _jobs(layout, "train")
    served = serve_config_of(layout)["applications"][0]["args"]["bundles"]
    trained = {}
    for job in jobs:
        spec, name = job["spec"], job["metadata"]["name"]
        _lifetimes(job)
        args = parse_entrypoint(spec["entrypoint"])  # the real CLI: a wrong flag fails here
        assert args.command == "train" and name == f"medray-train-{args.task}"
        assert args.out == f"/data/bundles/{args.task}", name
        for path in (args.data, args.storage):
            assert path.startswith("/data/"), f"{name}: {path} is not on the shared volume"
        if args.group_column and ":" in args.group_column and "/" in args.group_column:
            assert args.group_column.startswith("/data/"), name
        assert args.gpu is (layout == "prod"), name
        trained[args.task] = args.out

        # the job's cluster can run the Ray Train workers it asks for, with the volume mounted
        cs = spec["rayClusterSpec"]
        groups = cs["workerGroupSpecs"]
        assert sum(g["minReplicas"] * logical_cpus(g) for g in groups) >= args.workers + 1, name
        if args.gpu:
            assert sum(g["minReplicas"] * gpus(g) for g in groups) >= args.workers, name
        _mounts_shared_volume(job)
    assert trained == served, "every served bundle is written by a training job, and only those"


def test_prod_entrypoints_are_base_plus_gpu():
    base = {j["metadata"]["name"]: vars(parse_entrypoint(j["spec"]["entrypoint"])) for j in objects("base", "RayJob")}
    prod = {j["metadata"]["name"]: vars(parse_entrypoint(j["spec"]["entrypoint"])) for j in objects("prod", "RayJob")}
    assert base.keys() == prod.keys()
    for name in base:
        assert prod[name]["gpu"] and not base[name]["gpu"]
        assert {**prod[name], "gpu": False} == base[name], f"{name}: prod differs from base beyond --gpu"


# --------------------------------------------------------------------------- security


def _effective(container: dict, pod: dict, key: str):
    value = (container.get("securityContext") or {}).get(key)
    return value if value is not None else (pod.get("securityContext") or {}).get(key)


def assert_hardened(c: dict, pod: dict, label: str) -> None:
    """Non-root (uid 1000), no privilege escalation, no capabilities, read-only root with an emptyDir /tmp."""
    assert _effective(c, pod, "runAsNonRoot") is True, label
    assert _effective(c, pod, "runAsUser") == RAY_UID, label
    sc = c.get("securityContext") or {}
    assert sc.get("allowPrivilegeEscalation") is False, label
    assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), label
    assert not (sc.get("capabilities") or {}).get("add"), label
    assert sc.get("privileged") in (None, False), label
    assert sc.get("readOnlyRootFilesystem") is True, label
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{label}: Ray needs a writable /tmp"
    assert c["resources"].get("requests") and c["resources"].get("limits"), label


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_container_runs_as_non_root_without_privileges(layout):
    checked = 0
    for obj in ray_objects(layout):
        cs = cluster_spec(obj)
        for where, pod in pod_specs(obj):
            assert (pod.get("securityContext") or {}).get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
            for c in pod.get("initContainers", []) + pod["containers"]:
                assert_hardened(c, pod, f"{where} {c['name']}")
                checked += 1
        if cs.get("enableInTreeAutoscaling"):  # the autoscaler sidecar KubeRay adds to the head pod
            opts = cs["autoscalerOptions"]
            sc = opts["securityContext"]
            label = f"{obj['kind']}/{obj['metadata']['name']} autoscaler"
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == RAY_UID, label
            assert sc["allowPrivilegeEscalation"] is False and "ALL" in sc["capabilities"]["drop"], label
            assert sc["readOnlyRootFilesystem"] is True, label
            assert any(m["mountPath"] == "/tmp" for m in opts["volumeMounts"]), label
            assert opts["resources"]["requests"] and opts["resources"]["limits"], label
            checked += 1
    # RayCluster 2 (+autoscaler), 5 RayJobs x 3 (head, workers, submitter), RayService 2 (+autoscaler)
    assert checked == 2 + 1 + 5 * 3 + 2 + 1


def test_dockerfile_builds_the_pinned_ray_and_runs_as_ray():
    dockerfile = (K8S / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', pyproject).group(1)
    image = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert image == f"rayproject/ray:{ray_pin}-py311-gpu"
    assert 'requires-python = ">=3.11,<3.12"' in pyproject
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.M)
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1].split(":")[0] == str(RAY_UID)
    assert re.search(r"^WORKDIR /home/ray/app$", dockerfile, re.M)
    assert "pip install --no-cache-dir ." in dockerfile
    assert re.search(r"^COPY .*\bserve/ serve/$", dockerfile, re.M)
    for layout in LAYOUTS:
        for obj in ray_objects(layout):
            assert cluster_spec(obj)["rayVersion"] == ray_pin, f"{layout}: {obj['metadata']['name']}"


# --------------------------------------------------------------------------- serving


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rayservice_upgrade_readiness_env_and_tokens(layout):
    service = one(layout, "RayService")
    assert service["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    assert service["spec"]["excludeHeadPodFromServeSvc"] is True
    for where, pod in pod_specs(service):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1", where
            assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", where
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            tokens = mounts["/etc/medray"]
            assert tokens.get("readOnly") is True and "subPath" not in tokens, where  # subPath would freeze updates
            secret = volumes[tokens["name"]]["secret"]
            assert secret["secretName"] == "medray-tokens", where
            assert {"key": "tokens", "path": "tokens"} in secret["items"], f"{where}: file /etc/medray/tokens"
            assert mounts["/data"].get("readOnly") is True, f"{where}: serving only reads bundles"
    secrets = [s for s in objects(layout, "Secret") if s["metadata"]["name"] == "medray-tokens"]
    if layout == "prod":
        assert secrets == [], "prod must not apply the committed placeholder over the real tokens"
    else:
        import base64

        (secret,) = secrets
        text = base64.b64decode(secret["data"]["tokens"]).decode()
        assert "placeholder" in text.lower()
        from serve.security import parse_tokens

        assert len(parse_tokens(text)) == 1  # the application starts with it (dev clusters only)
    auth = serve_config_of(layout)["applications"][0]["args"]["auth"]
    assert auth == {"tokens_file": "/etc/medray/tokens"}, "the application must read the mounted Secret"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_network_policy_admits_only_the_ingress_controller_to_serve(layout):
    (policy,) = objects(layout, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    assert spec["policyTypes"] == ["Ingress"]
    serve_port = serve_config_of(layout)["http_options"]["port"]
    ray_pods = {"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}
    intra = False
    for rule in spec["ingress"]:
        assert rule.get("from"), f"a rule without `from` admits every source: {rule}"
        for peer in rule["from"]:
            assert "ipBlock" not in peer and peer.get("namespaceSelector") != {} and peer.get("podSelector") != {}
        ports = [p["port"] for p in rule.get("ports", [])]
        if rule["from"] == [ray_pods] and not ports:
            intra = True  # Ray pods reach each other on every port
        elif serve_port in ports:
            assert ports == [serve_port], rule
            assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "ingress-nginx"}}}], rule
        else:
            assert ports and serve_port not in ports, rule
    assert intra, "Ray pods must be able to reach each other (GCS, raylets, object transfer, HAProxy)"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ingress_serves_the_rayservice_over_tls(layout):
    (ingress,) = objects(layout, "Ingress")
    service = one(layout, "RayService")
    config = serve_config_of(layout)
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"] == "medray-tls"
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in tls["hosts"]
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == f"{service['metadata']['name']}-serve-svc"  # KubeRay's Serve service
            assert backend["port"]["number"] == config["http_options"]["port"]
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 2**20 >= config["applications"][0]["args"]["limits"]["max_body_bytes"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_ray_pod_mounts_the_shared_volume(layout):
    (pvc,) = objects(layout, "PersistentVolumeClaim")
    for obj in ray_objects(layout):
        for where, pod in pod_specs(obj):
            if where.endswith("submitter"):
                continue
            claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
            assert claims == [pvc["metadata"]["name"]], where


def test_data_loader_pod_is_valid_hardened_and_mounts_the_volume(k8s_validate):
    pod = yaml.safe_load((K8S / "data-loader.yaml").read_text())
    assert k8s_validate(pod) == []
    assert pod["metadata"]["namespace"] == NAMESPACE
    spec = pod["spec"]
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = spec["containers"]
    assert_hardened(container, spec, "data-loader")
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claim == "medray-data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
