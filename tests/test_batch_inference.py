"""Batch inference (`medray predict`/`evaluate`) on Ray Data, against the in-process path.

Real bundles trained on ../shared/data (conftest `trained`), a real local Ray instance, real files,
a real S3-compatible server (moto) on 127.0.0.1, real signals. The two-node case is in
test_cluster_jobs.py (it needs its own `ray start` cluster).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, shared
from medray.bundle import load_bundle
from medray.data.dataset import BadItemsError
from medray.inference import evaluate, predict, prediction_columns

pytestmark = pytest.mark.ray


def _probs(df: pd.DataFrame) -> np.ndarray:
    return df[[c for c in df.columns if c.startswith("p_")]].to_numpy(np.float64)


def _assert_same_rows(got: pd.DataFrame, ref: pd.DataFrame) -> None:
    """The same predictions in any order (a folder's parts come in no order; ids may repeat: the
    public splice data has records of one id twice)."""
    def canonical(df):
        p = [c for c in df.columns if c.startswith("p_")]
        return df.assign(**{f"_r{c}": df[c].round(4) for c in p}).sort_values(
            ["id", *(f"_r{c}" for c in p)], kind="stable").reset_index(drop=True)

    a, b = canonical(got), canonical(ref)
    assert len(a) == len(b) and a["id"].tolist() == b["id"].tolist()
    np.testing.assert_allclose(_probs(a), _probs(b), atol=1e-5)


@pytest.mark.parametrize("task", ["exercise", "genomic", "ultrasound"])
def test_cluster_and_in_process_predictions_agree(ray_session, trained, task, tmp_path):
    _, bundle_dir, data = trained(task)
    bundle = load_bundle(bundle_dir)
    here = predict(bundle, data, str(tmp_path / "here.csv"), engine="local")
    there = predict(bundle, data, str(tmp_path / "there.parquet"), engine="ray", actors=2, batch_size=64)
    assert (here["engine"], there["engine"]) == ("local", "ray")
    a, b = pd.read_csv(tmp_path / "here.csv", dtype={"id": str}), pd.read_parquet(tmp_path / "there.parquet")
    assert list(a.columns) == list(b.columns) == prediction_columns(bundle)
    assert here["rows"] == there["rows"] == len(a) == len(b) > 100
    assert a["id"].tolist() == b["id"].tolist()  # one file: input order, whichever engine ran
    np.testing.assert_allclose(_probs(a), _probs(b), atol=1e-5)
    assert (a["label"] == b["label"]).all()
    assert set(b["bundle"]) == {bundle.name} and set(b["version"]) == {bundle.version}
    # and both are what Bundle.predict gives on the reader's arrays (what serving runs)
    from medray.inference import predict_file

    ds, probs = predict_file(bundle, data)
    np.testing.assert_allclose(_probs(b), probs, atol=1e-5)


def test_evaluate_on_the_cluster_gives_the_in_process_metrics(ray_session, trained):
    _, bundle_dir, data = trained("genomic")
    bundle = load_bundle(bundle_dir)
    here = evaluate(bundle, data, engine="local")
    there = evaluate(bundle, data, engine="ray", actors=2)
    assert there["n"] == here["n"] > 2000
    assert there["confusion_matrix"] == here["confusion_matrix"]
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert there[k] == pytest.approx(here[k], abs=1e-6), k


def test_folder_output_is_parallel_parts_and_replaces_the_previous_result_whole(ray_session, trained, tmp_path):
    _, bundle_dir, data = trained("genomic")
    bundle = load_bundle(bundle_dir)
    out = tmp_path / "scores"
    out.mkdir()
    (out / "from-last-night.parquet").write_bytes(b"old")
    s = predict(bundle, data, str(out), engine="ray", actors=2, batch_size=128)
    parts = sorted(p.name for p in out.iterdir())
    assert "_SUCCESS" in parts and "from-last-night.parquet" not in parts
    assert [p for p in parts if p.endswith(".parquet")], parts  # Ray Data's parts (one per output block)
    got = pq.read_table(out).to_pandas()
    assert len(got) == s["rows"] == 2231
    assert list(got.columns) == prediction_columns(bundle)
    _assert_same_rows(got, pd.read_parquet(_local(bundle, data, tmp_path)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scores.tmp-")]  # no staging left behind

    csv = tmp_path / "scores-csv"
    predict(bundle, data, str(csv), fmt="csv", engine="ray", actors=1)
    assert sum(len(pd.read_csv(p)) for p in csv.glob("*.csv")) == 2231 and (csv / "_SUCCESS").exists()


def _local(bundle, data, tmp_path) -> Path:
    path = tmp_path / "reference.parquet"
    if not path.exists():
        predict(bundle, data, str(path), engine="local")
    return path


def _image_folder(tmp_path: Path, n: int = 6) -> Path:
    """A flat folder of real ultrasound images (no class subfolders: a night's unlabelled studies)
    plus a corrupt PNG and a truncated one."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    for src in sorted(shared("ultrasound", "benign").glob("*.png"))[:n]:
        shutil.copy(src, folder / src.name)
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    good = sorted(shared("ultrasound", "normal").glob("*.png"))[0].read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    return folder


@pytest.mark.parametrize("engine", ["ray", "local"])
def test_bad_images_are_named_and_nothing_is_written_unless_skipped(ray_session, trained, tmp_path, engine):
    _, bundle_dir, _ = trained("ultrasound")
    bundle = load_bundle(bundle_dir)
    folder = _image_folder(tmp_path)
    out = tmp_path / "night.parquet"
    with pytest.raises(BadItemsError) as e:
        predict(bundle, str(folder), str(out), engine=engine)
    msg = str(e.value)
    assert "2 unreadable images" in msg and "corrupt.png" in msg and "truncated.png" in msg, msg
    assert "--skip-bad to predict the rest" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incoming"]  # nothing written, not even staging

    s = predict(bundle, str(folder), str(out), engine=engine, skip_bad=True)
    got = pd.read_parquet(out)
    assert got["id"].tolist() == sorted(p.name for p in folder.glob("*.png") if "corrupt" not in p.name
                                        and "truncated" not in p.name)
    assert s["rows"] == 6 and len(s["skipped"]) == 2
    side = (tmp_path / "night.skipped.txt").read_text().splitlines()
    assert len(side) == 2 and "corrupt.png" in side[0] and "truncated.png" in side[1], side


def test_a_job_killed_while_writing_leaves_no_result_that_looks_complete(trained, tmp_path):
    """`medray predict` in its own process and Ray instance, SIGKILLed (the whole process group)
    while its output file is staged and being streamed: the target never appears; the next run
    writes it."""
    _, bundle_dir, _ = trained("genomic")
    data = tmp_path / "run.fasta"  # 10x the public data: long enough to kill mid-write
    text = shared("genomic", "splice.fasta").read_text()
    data.write_text(text * 10)
    out = tmp_path / "scores.csv"
    cmd = [sys.executable, "-m", "medray", "predict", str(bundle_dir), "--data", str(data), "--out", str(out),
           "--engine", "ray", "--actors", "1", "--batch-size", "16"]
    ray_tmp = tempfile.mkdtemp(prefix="rayp", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp)
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            # the staging file is opened before the batches are scored and streamed into it: from
            # then until the rename, a kill lands mid-write
            if [p for p in tmp_path.iterdir() if p.name.startswith(".scores.csv.tmp-")]:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the kill:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert not out.exists(), "a killed job left a result that looks complete"
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".scores.csv.tmp-")]  # it was mid-write
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_instance(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    r = subprocess.run([*cmd[:-6], "--engine", "local"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(pd.read_csv(out)) == 10 * 2231


def _kill_instance(ray_tmp: str) -> None:
    """SIGKILL what is left of the Ray instance the killed driver started (its processes carry
    RAY_TMPDIR in their environment)."""
    mark = f"RAY_TMPDIR={ray_tmp}".encode()
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if mark in (p / "environ").read_bytes().split(b"\0"):
                    os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                continue


def test_s3_input_is_scored_and_s3_output_written_on_an_s3_server(ray_session, s3_server, trained, tmp_path):
    _, bundle_dir, data = trained("genomic")
    bundle = load_bundle(bundle_dir)
    s3_server.create_dir("medray/night-in")
    with s3_server.open_output_stream("medray/night-in/splice.fasta") as f:
        f.write(Path(data).read_bytes())
    s = predict(bundle, "s3://medray/night-in/splice.fasta", "s3://medray/night-out/genomic", engine="auto")
    assert s["engine"] == "ray" and s["rows"] == 2231  # a URI is always read on the cluster
    from pyarrow import fs

    names = [i.base_name for i in s3_server.get_file_info(fs.FileSelector("medray/night-out/genomic"))]
    assert "_SUCCESS" in names and any(n.endswith(".parquet") for n in names), names
    got = pq.read_table("medray/night-out/genomic", filesystem=s3_server).to_pandas()
    ref = pd.read_parquet(_local(bundle, data, tmp_path))
    _assert_same_rows(got, ref)
    assert not [n for n in [i.base_name for i in s3_server.get_file_info(fs.FileSelector("medray"))]
                if ".tmp-" in n]  # the staging prefix is gone

    predict(bundle, "s3://medray/night-in/splice.fasta", "s3://medray/night-out/genomic.parquet")
    one = pq.read_table("medray/night-out/genomic.parquet", filesystem=s3_server).to_pandas()
    assert one["id"].tolist() == ref["id"].tolist()  # one file: in input order
    np.testing.assert_allclose(_probs(one), _probs(ref), atol=1e-5)
