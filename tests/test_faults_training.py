"""Training faults with real processes and real signals (issue "Reliability").

* a Ray Train worker process is SIGKILLed mid-epoch: the worker group restarts from the latest
  checkpoint (FailureConfig max_failures) and the run finishes with every epoch once;
* the `medray train` driver process is SIGKILLed mid-run: the same command again resumes from
  the latest checkpoint;
* partial checkpoint folders (a crash while Ray copied one to storage) are neither trusted by
  medray's own checks nor picked by Ray on resume.

Measured figures are printed and written to benchmarks/results/faults_training.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, shared
from medray.bundle import load_bundle
from medray.train import train
from medray.train_common import RAY_SNAPSHOT as SNAPSHOT
from medray.train_common import (CHECKPOINT_META, STATE, latest_local_checkpoint, resolve_run_storage,
                                 verified_checkpoint_meta)

pytestmark = pytest.mark.ray


@pytest.fixture(autouse=True)
def checkpoint_every_epoch(monkeypatch):
    """These tests kill runs between epochs and count what each checkpoint holds: one per epoch,
    however short the epochs are on this machine (medray.train_common.checkpoint_interval_s)."""
    monkeypatch.setenv("MEDRAY_CHECKPOINT_INTERVAL_S", "0")

RESULTS = ROOT / "benchmarks" / "results" / "faults_training.json"


def _record(key: str, figures: dict) -> None:
    """Merge one test's measured figures into the results file (and print them)."""
    print(f"[faults] {key}: {json.dumps(figures)}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:
        results = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        results = {}
    results[key] = {**figures, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count()}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def _complete_epochs(run_dir: Path) -> dict[int, Path]:
    """epoch -> folder of the complete (verified) checkpoints under run_dir."""
    out = {}
    for meta in run_dir.glob("checkpoint_*/" + CHECKPOINT_META):
        m = verified_checkpoint_meta(meta.parent)
        if m is not None:
            out[m["epoch"]] = meta.parent
    return out


def _wait_for(cond, timeout: float, what: str, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _history_is_complete(history: list[dict], epochs: int) -> None:
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), [h["epoch"] for h in history]


# ----------------------------------------------------------------------------- worker SIGKILL
def _alive_train_workers() -> list[int]:
    """pids of the live Ray Train worker actors (the only run in this Ray instance while the test runs)."""
    import ray
    from ray.util.state import list_actors

    # the address explicitly: without it the state API follows /tmp/ray/ray_current_cluster, the
    # instance started last on this machine, which need not be this session's
    actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_worker_sigkill_mid_epoch_restarts_from_the_latest_checkpoint(ray_session, tmp_path):
    data = str(shared("genomic", "splice.fasta"))
    # epochs of ~0.2 s here: enough of them that the run is still going when the kill comes
    storage, name, epochs = tmp_path / "runs", "fault-worker", 20
    run_dir = storage / name
    outcome = {}

    def run():
        try:
            outcome["meta"] = train("genomic", data, str(tmp_path / "bundle"), epochs=epochs, batch_size=16, workers=2,
                                    storage=str(storage), name=name, max_failures=2, seed=0)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = e

    t_start = time.time()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # two complete checkpoints: their spacing is one epoch; then kill half-way through the next one
    t1 = _wait_for(lambda: time.time() if 1 in _complete_epochs(run_dir) or "error" in outcome else None, 240,
                   "checkpoint of epoch 1")
    t2 = _wait_for(lambda: time.time() if 2 in _complete_epochs(run_dir) or "error" in outcome else None, 120,
                   "checkpoint of epoch 2")
    assert "error" not in outcome, outcome.get("error")
    epoch_s = t2 - t1
    time.sleep(epoch_s / 2)
    workers = _alive_train_workers()
    assert len(workers) == 2, workers
    before = _complete_epochs(run_dir)
    last_ckpt = max(before)
    assert last_ckpt < epochs, "the run ended before the kill; make the epochs longer"
    os.kill(workers[0], signal.SIGKILL)
    t_kill = time.time()
    old_pids = set(workers)

    # the worker group comes back (new processes) and reports the next epoch
    def new_group():
        alive = _alive_train_workers()
        return time.time() if len(alive) == 2 and not old_pids & set(alive) else None

    t_back = _wait_for(new_group, 120, "a new worker group", poll=0.2)
    t_next = _wait_for(lambda: time.time() if last_ckpt + 1 in _complete_epochs(run_dir) else None, 120,
                       f"checkpoint of epoch {last_ckpt + 1} after the restart")
    thread.join(300)
    assert not thread.is_alive(), "training did not finish after the worker restart"
    assert "error" not in outcome, outcome.get("error")
    total_s = time.time() - t_start

    meta = outcome["meta"]
    history = meta["metrics"]["history"]
    _history_is_complete(history, epochs)
    assert meta["training"]["epochs_trained"] == epochs
    # the history shows the restart: attempt 1 up to the last checkpoint before the kill, then attempt 2
    # starting with the epoch right after it (the one the kill interrupted is trained again, none skipped)
    assert [h["attempt"] for h in history] == [1] * last_ckpt + [2] * (epochs - last_ckpt), history
    assert history[last_ckpt]["resumed_from_epoch"] == last_ckpt
    assert all(h["resumed_from_epoch"] is None for i, h in enumerate(history) if i != last_ckpt)
    assert all(h["world_size"] == 2 and len(h["rows_per_worker"]) == 2 for h in history)
    assert sorted(_complete_epochs(run_dir)) == list(range(1, epochs + 1))
    assert load_bundle(tmp_path / "bundle").meta["training"]["epochs_trained"] == epochs

    _record("worker_sigkill", {
        "task": "genomic", "model": meta["model"]["name"], "workers": 2, "batch_size": 16, "epochs": epochs,
        "epoch_seconds_before_kill": round(epoch_s, 2),
        "killed_after_seconds_into_epoch": round(t_kill - t2, 2),
        "killed_during_epoch": last_ckpt + 1, "resumed_from_epoch": last_ckpt,
        "epochs_redone_partially": 1, "completed_epochs_lost": 0,
        "seconds_kill_to_new_worker_group": round(t_back - t_kill, 2),
        "seconds_kill_to_next_checkpoint": round(t_next - t_kill, 2),
        "restarted_epoch_seconds": history[last_ckpt]["seconds"],
        "total_run_seconds": round(total_s, 1),
    })


# ----------------------------------------------------------------------------- driver SIGKILL
def _registered_epoch(run_dir: Path) -> int | None:
    """Epoch of the newest checkpoint in Ray Train's run snapshot (None: none yet)."""
    try:
        snap = json.loads((run_dir / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None
    epochs = [r["metrics"]["epoch"] for r in snap.get("checkpoint_results", [])]
    return max(epochs) if epochs else None


def _instance_processes(ray_tmp: str) -> list[int]:
    """pids of processes that belong to the Ray instance under `ray_tmp`: its driver's environment
    (RAY_TMPDIR) is inherited by every process of the instance. (Not the command line: Ray renames
    its worker processes "ray::RayTrainWorker…", and a worker missed that way went on checkpointing
    after the reap.)"""
    pids, mark = [], f"RAY_TMPDIR={ray_tmp}".encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if mark in (p / "environ").read_bytes().split(b"\0") or ray_tmp.encode() in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def _reap_instance(ray_tmp: str, timeout: float = 20) -> dict:
    """Wait for the dead driver's Ray instance to go away by itself (Ray ties its processes to the
    driver); SIGKILL whatever is left of that instance only (never a global `ray stop`)."""
    t0 = time.time()
    while time.time() - t0 < timeout and _instance_processes(ray_tmp):
        time.sleep(0.2)
    left = _instance_processes(ray_tmp)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"seconds_until_instance_gone": round(time.time() - t0, 2), "leftover_processes_killed": len(left)}


def test_driver_sigkill_then_same_command_resumes_from_the_latest_checkpoint(tmp_path):
    data = str(shared("genomic", "splice.fasta"))
    # epochs of ~0.2 s here (cached shards): enough of them that the run outlives the wait for Ray's
    # first registered checkpoint plus a second (5 epochs once ended before the kill in CI)
    storage, name, epochs = tmp_path / "runs", "fault-driver", 40
    run_dir = storage / name
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "medray", "train", "genomic", "--data", data, "--out", str(out),
           "--epochs", str(epochs), "--batch-size", "16", "--workers", "2", "--storage", str(storage), "--name", name]
    # its own local Ray instance, in its own temp dir (short: Ray's socket paths have a length limit)
    ray_tmp = tempfile.mkdtemp(prefix="rayf", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    try:
        log1 = tmp_path / "first.log"
        t0 = time.time()
        with open(log1, "wb") as f:
            first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def registered_checkpoint():
                if first.poll() is not None:
                    raise AssertionError(f"first run ended ({first.returncode}) before the kill:\n{log1.read_text()}")
                return _registered_epoch(run_dir)

            # a checkpoint Ray has registered (what a resume can use), then into the next epoch
            _wait_for(registered_checkpoint, 300, "a registered checkpoint", poll=0.2)
            time.sleep(1.0)
            on_disk = max(_complete_epochs(run_dir))
            assert on_disk < epochs and first.poll() is None, "the run ended before the kill"
            os.kill(first.pid, signal.SIGKILL)
            t_kill = time.time()
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
        assert first.returncode == -signal.SIGKILL
        assert not out.exists(), "a killed run must not leave a bundle"
        registered_at_kill = _registered_epoch(run_dir)
        cleanup = _reap_instance(ray_tmp)
        # Ray Train's controller is an actor of the dead driver's instance: until that instance is
        # gone it may still register a checkpoint (seen in CI: epoch 5 registered after the kill)
        registered = _registered_epoch(run_dir)
        on_disk_after = max(_complete_epochs(run_dir))
        assert registered_at_kill <= registered < epochs, (registered_at_kill, registered)
        assert latest_local_checkpoint(run_dir)["epoch"] == registered  # what medray checks = what Ray resumes

        log2 = tmp_path / "second.log"
        t1 = time.time()
        second = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=400)
        t_end = time.time()
        log2.write_text(second.stdout)
        assert second.returncode == 0, second.stdout[-4000:]
    finally:
        _reap_instance(ray_tmp, timeout=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    m = re.findall(r"\[medray\] .*resumed from the checkpoint of epoch (\d+)", second.stdout)
    assert m, second.stdout[-4000:]
    resumed = int(m[0])
    # from the newest checkpoint Ray had registered when the driver's instance was gone: possibly
    # older than the newest complete folder on disk (copied, not yet registered), never newer
    assert resumed == registered >= 1 and resumed <= on_disk_after, (resumed, registered, on_disk_after)
    # (Ray forwards each worker line to the driver twice here: the order of first sightings counts)
    epoch_lines = list(dict.fromkeys(int(e) for e in re.findall(rf"\[medray\] .*epoch (\d+)/{epochs} ", second.stdout)))
    assert epoch_lines == list(range(resumed + 1, epochs + 1)), epoch_lines  # the second run only trains the rest

    meta = json.loads((out / "bundle.json").read_text())
    history = meta["metrics"]["history"]
    _history_is_complete(history, epochs)
    assert [h["attempt"] for h in history] == [1] * resumed + [2] * (epochs - resumed)
    assert history[resumed]["resumed_from_epoch"] == resumed
    assert load_bundle(out).meta["training"]["epochs_trained"] == epochs

    first_epochs = [int(e) for e in re.findall(rf"\[medray\] .*epoch (\d+)/{epochs} ", log1.read_text())]
    _record("driver_sigkill", {
        "task": "genomic", "workers": 2, "batch_size": 16, "epochs": epochs,
        "first_run_seconds_until_kill": round(t_kill - t0, 1),
        "epochs_reported_by_first_run": max(first_epochs) if first_epochs else 0,
        "newest_complete_checkpoint_on_disk_at_kill": on_disk, "newest_registered_by_ray_at_kill": registered_at_kill,
        "registered_after_the_kill": registered - registered_at_kill,
        "resumed_from_epoch": resumed, "completed_epochs_trained_again": on_disk_after - resumed,
        "epochs_trained_by_second_run": len(epoch_lines),
        **cleanup,
        "second_run_seconds": round(t_end - t1, 1),
    })


# ----------------------------------------------------------------------------- partial checkpoints
def _plant_partial_checkpoints(run_dir: Path, good: Path, epoch: int) -> list[str]:
    """Folders a crash during Ray's copy to storage could leave, named later than every real one."""
    state = (good / STATE).read_bytes()
    meta = json.loads((good / CHECKPOINT_META).read_text())
    later = dict(meta, epoch=epoch)
    kinds = {
        "truncated_state": {STATE: state[: len(state) // 2], CHECKPOINT_META: json.dumps(later)},
        "meta_without_state": {CHECKPOINT_META: json.dumps(later)},
        "state_without_meta": {STATE: state},
        "truncated_meta": {STATE: state, CHECKPOINT_META: json.dumps(later)[:15]},
        "empty_state": {STATE: b"", CHECKPOINT_META: json.dumps(later)},
        # whole, but never registered by Ray (the run died between the copy and the registration)
        "complete_unregistered": {STATE: state, CHECKPOINT_META: json.dumps(later)},
    }
    names = []
    for i, (kind, files) in enumerate(kinds.items()):
        d = run_dir / f"checkpoint_2999-12-31_23-59-{50 + i}.000000"
        d.mkdir()
        for fname, content in files.items():
            (d / fname).write_bytes(content.encode() if isinstance(content, str) else content)
        names.append(d.name)
    # an older-format checkpoint.json (no size/hash, as the GAN writes) over a truncated state.pt
    d = run_dir / "checkpoint_2999-12-31_23-59-59.999999"
    d.mkdir()
    (d / STATE).write_bytes(state[:-100])
    (d / CHECKPOINT_META).write_text(json.dumps({"epoch": epoch, "fingerprint": meta["fingerprint"]}))
    names.append(d.name)
    return names


def test_partial_checkpoint_folders_are_not_trusted_or_resumed_from(ray_session, tmp_path):
    data = str(shared("genomic", "splice.fasta"))
    storage, name = tmp_path / "runs", "fault-partial"
    run_dir = storage / name
    kw = dict(workers=2, storage=str(storage), name=name, seed=0, model="cnn1d")
    first = train("genomic", data, str(tmp_path / "b2"), epochs=2, **kw)
    _history_is_complete(first["metrics"]["history"], 2)
    good = _complete_epochs(run_dir)
    assert sorted(good) == [1, 2]
    # every complete checkpoint records its state file's size and hash
    ckpt_meta = json.loads((good[2] / CHECKPOINT_META).read_text())
    assert ckpt_meta["state_bytes"] == (good[2] / STATE).stat().st_size and len(ckpt_meta["state_sha256"]) == 64

    # partial folders claiming epoch 4 (≥ the epochs asked next: the old check would have said
    # "already has 4 epochs") and later than any real one
    planted = _plant_partial_checkpoints(run_dir, good[2], epoch=4)
    assert [n for n in planted if verified_checkpoint_meta(run_dir / n) is not None] == [planted[-2]]
    assert latest_local_checkpoint(run_dir)["epoch"] == 2
    # Ray resumes from what its snapshot lists, which never names a folder whose copy did not finish
    snapshot = (run_dir / SNAPSHOT).read_text()
    assert not any(n in snapshot for n in planted)

    # the next run resumes from epoch 2 (not from a partial folder, not from scratch) and finishes
    logs = []
    second = train("genomic", data, str(tmp_path / "b3"), epochs=3, log=logs.append, **kw)
    assert not any("already has" in line for line in logs), logs
    history = second["metrics"]["history"]
    _history_is_complete(history, 3)
    assert history[:2] == first["metrics"]["history"]  # restored, not retrained
    assert history[2]["resumed_from_epoch"] == 2 and history[2]["attempt"] == 2
    assert load_bundle(tmp_path / "b3").meta["training"]["epochs_trained"] == 3
    assert latest_local_checkpoint(run_dir)["epoch"] == 3
    # a partial folder with another fingerprint (a damaged copy of checkpoint.json) does not make
    # medray refuse the run as "trained on different data"
    bad = run_dir / "checkpoint_3000-01-01_00-00-00.000000"
    bad.mkdir()
    (bad / CHECKPOINT_META).write_text(json.dumps({"epoch": 9, "fingerprint": "0" * 64, "state_bytes": 10,
                                                   "state_sha256": "0" * 64}))
    (bad / STATE).write_bytes(b"x" * 5)
    logs.clear()
    assert resolve_run_storage(str(storage), name, second["data"]["fingerprint"], 3, log=logs.append) == str(storage)
    assert logs == [f"[medray] run {name!r} already has 3 epochs; writing its bundle"]
    _record("partial_checkpoints", {"planted_folders": len(planted), "trusted": 0,
                                    "resumed_from_epoch": history[2]["resumed_from_epoch"]})
