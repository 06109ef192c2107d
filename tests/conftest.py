"""Shared fixtures: the real datasets in ../shared/data, one local Ray instance per session."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from serve.local import free_port  # noqa: F401 - the tests' ports (imported from here by test modules)

ROOT = Path(__file__).resolve().parents[1]


SERVE_PORT = free_port(span=17)  # the port the serving tests' application listens on (127.0.0.1)
S3_PORT = free_port()  # the S3-compatible server (moto) of the object-storage tests (127.0.0.1)
# set before Ray starts, so every Ray worker reads s3:// from that server as a cluster's nodes
# would from their own object store (pyarrow reads AWS_ENDPOINT_URL and the credentials)
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "medray-test",
                   "AWS_SECRET_ACCESS_KEY": "medray-test", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"})
SHARED = Path(os.environ.get("MEDRAY_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(*parts) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real dataset {p} not present (CI has ../shared/data beside the checkout)")
    return p


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (8 logical CPUs: see medray.ray_runtime)."""
    from medray.ray_runtime import ensure_ray
    from serve.local import throughput_env

    # Serve runs as `medray serve` runs it (throughput mode, direct ingress on SERVE_PORT); these
    # settings are read when Ray's processes start, so they are set before the instance starts.
    os.environ.update(throughput_env(SERVE_PORT))
    # with the dashboard (off by default locally): the fault tests find replicas through Ray's state API
    ray = ensure_ray(dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1:S3_PORT; yields a
    pyarrow S3FileSystem on it. Stopped at the end of the session."""
    import shutil
    import subprocess
    import sys
    import urllib.request

    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not installed (it is in the test extra: pip install -e '.[test]')")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(S3_PORT)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{S3_PORT}/", timeout=2)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto_server did not start on port {S3_PORT}")
            time.sleep(0.3)
    from pyarrow import fs

    filesystem, _ = fs.FileSystem.from_uri("s3://medray?allow_bucket_creation=true")
    filesystem.create_dir("medray")
    yield filesystem
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-storage")


CASES = {
    # task: (data, group column, epochs, learning rate: None = the preset's)
    "genomic": (lambda: shared("genomic", "splice.fasta"), "id-prefix", 8, None),
    "exercise": (lambda: shared("exercise", "exercise_windows.csv"),
                 lambda: f"{shared('exercise', 'exercise_windows_meta.csv')}:subject", 5, None),
    "ultrasound": (lambda: shared("ultrasound", "labels.csv"), None, 12, None),
}


@pytest.fixture(scope="session")
def trained(ray_session, storage, tmp_path_factory):
    """Bundles trained once per session on the real data (training tests check them; serving
    tests deploy them): trained(task) -> (bundle.json meta, bundle dir, data path)."""
    out = tmp_path_factory.mktemp("bundles")
    cache = {}

    def get(task):
        if task not in cache:
            data, group, epochs, lr = CASES[task]
            group = group() if callable(group) else group
            from medray.train import train

            meta = train(task, str(data()), str(out / task), epochs=epochs, lr=lr, workers=2, storage=str(storage),
                         name=f"test-{task}", group_column=group, seed=0)
            cache[task] = (meta, out / task, str(data()))
        return cache[task]

    return get


@pytest.fixture(scope="session")
def gan(ray_session, storage, tmp_path_factory):
    """A conditional genomic GAN trained once per session on the real splice data (2 workers)."""
    from medray.gan import train_gan

    out = tmp_path_factory.mktemp("gan") / "genomic-gan"
    # 8 × 500 critic steps with a faster recipe than the default (n_critic 2, lr 3e-4): ~1.5 min here
    meta = train_gan(str(shared("genomic", "splice.fasta")), str(out), epochs=8, n_critic=2, lr=3e-4, workers=2,
                     storage=str(storage), name="test-gan", conditional=True, seed=0)
    return meta, out


def shutdown_serve(timeout_s: float = 120.0) -> None:
    """serve.shutdown(), then wait until the controller is gone and SERVE_PORT is free: a shutdown
    that outlasts Serve's 30 s wait (a loaded machine) goes on in the background, and a Serve
    started meanwhile would connect to the dying controller."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    serve.shutdown()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", SERVE_PORT)) != 0:
                    return
        time.sleep(0.5)
    raise AssertionError(f"Serve did not shut down within {timeout_s:.0f}s")


def start_serve(bundles: dict, **kwargs) -> str:
    """serve.local.start on SERVE_PORT, after any earlier application is gone. Once seen here: a
    controller started right after a slow shutdown died during the first deploy (ActorDiedError);
    that start is retried once, after waiting for the shutdown again."""
    from ray.exceptions import RayActorError

    from serve.local import start

    shutdown_serve()  # another module's application, if its shutdown is still under way
    try:
        return start(bundles, port=SERVE_PORT, **kwargs)
    except RayActorError as e:
        print(f"[tests] Serve controller died during the first deploy ({type(e).__name__}); starting again")
        shutdown_serve()
        time.sleep(2)
        return start(bundles, port=SERVE_PORT, **kwargs)
