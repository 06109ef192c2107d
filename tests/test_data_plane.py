"""The training data path on Ray Data (medray.data.pipeline): every item read and checked on the
cluster, splits on the key table, preprocessing fitted with streaming aggregates, data read
straight from object storage, and a driver whose memory does not grow with the data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, shared
from medray.data import pipeline
from medray.data.genomic import read_genomic
from medray.errors import DataError

pytestmark = pytest.mark.ray


def _fasta(path: Path, n: int, bad: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        seq = "".join(rng.choice(list("ACGT"), 40 + i % 7))
        seq = (bad or {}).get(i, seq)
        lines.append(f">S{i}-x label={'EI' if i % 2 else 'N'} some description\n{seq[:30]}\n{seq[30:]}\n")
    path.write_text("".join(lines))
    return path


def test_fasta_parsed_in_parallel_chunks_matches_the_in_process_reader(ray_session, tmp_path):
    path = _fasta(tmp_path / "s.fa", 300)
    src = pipeline.open_source("genomic", str(path), chunk_bytes=1024)
    assert len(src.units()) > 10  # many tasks, each parsing its byte range
    keys = pipeline.read_keys(src)
    ref = read_genomic(str(path))
    assert keys.ids == ref.ids and list(keys.labels) == list(ref.labels)
    assert keys.rows["_len"].tolist() == [len(s) for s in ref.inputs]
    # the same rows come back, preprocessed on the cluster, as the in-process encoder gives them
    from medray.preprocessing import SequenceEncoder

    enc = SequenceEncoder(46)
    rows = pipeline.dataset(src, keys.keys, enc, {"EI": 0, "N": 1}).take_all()
    by_key = {int(r["key"]): r for r in rows}
    x = np.stack([by_key[int(k)]["x"] for k in keys.keys])
    assert np.array_equal(x, enc.transform(ref.inputs))
    assert [int(by_key[int(k)]["y"]) for k in keys.keys] == [0 if lab == "EI" else 1 for lab in ref.labels]


def test_bad_records_across_chunks_are_numbered_in_the_file(ray_session, tmp_path):
    path = _fasta(tmp_path / "s.fa", 120, bad={7: "ACGTXACGT", 93: "ACG-T", 111: ""})
    src = pipeline.open_source("genomic", str(path), chunk_bytes=1024)
    with pytest.raises(DataError, match=r"3 unreadable records: record 8 \(S7-x\): invalid letter 'X' at position 5.*"
                                         r"record 94 \(S93-x\): invalid letter '-'.*record 112 \(S111-x\): empty"):
        pipeline.read_keys(src)
    keys = pipeline.read_keys(src, skip_bad=True)
    assert len(keys) == 117 and len(keys.skipped) == 3 and "S7-x" not in keys.ids
    assert keys.meta["source_rows"][7] == 8  # positions in the file, for row-aligned side tables


def test_table_bad_rows_missing_column_and_moments(ray_session, tmp_path):
    import pandas as pd

    from medray.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    df = pd.DataFrame(rng.normal(3, 2, (50, 4)), columns=["a", "b", "c", "d"])
    df["label"] = ["x", "y"] * 25
    df.to_csv(tmp_path / "ok.csv", index=False)
    src = pipeline.open_source("exercise", str(tmp_path / "ok.csv"))
    keys = pipeline.read_keys(src)
    tr = np.arange(0, 50, 2)
    m = pipeline.fit_table_moments(src, keys.keys[tr], per_channel=False)
    ref = StandardScaler.fit(df[["a", "b", "c", "d"]].to_numpy()[tr], ["a", "b", "c", "d"])
    assert np.allclose(StandardScaler.from_moments(m, ["a", "b", "c", "d"]).std, ref.std, atol=1e-6)
    series = pd.DataFrame(rng.normal(0, 1, (50, 16)) + rng.normal(0, 4, (50, 2)).repeat(8, axis=1),
                          columns=[f"{c}_{t:03d}" for c in ("ax", "ay") for t in range(8)])
    series["label"] = ["x", "y"] * 25
    series.to_csv(tmp_path / "series.csv", index=False)
    s_src = pipeline.open_source("exercise", str(tmp_path / "series.csv"))
    s_keys = pipeline.read_keys(s_src)
    for centre in (False, True):  # fitted on the cluster, as in this process
        m = pipeline.fit_table_moments(s_src, s_keys.keys[tr], per_channel=True, center_windows=centre)
        ref = StandardScaler.fit(series.drop(columns="label").to_numpy()[tr], s_src.feature_names, per_channel=True,
                                 center_windows=centre)
        got = StandardScaler.from_moments(m, s_src.feature_names, per_channel=True, center_windows=centre)
        assert np.allclose(got.mean, ref.mean, atol=1e-6) and np.allclose(got.std, ref.std, atol=1e-6)
    assert got.std[0] < 0.5 * StandardScaler.fit(series.drop(columns="label").to_numpy()[tr], s_src.feature_names,
                                                 per_channel=True).std[0]  # the offsets no longer count
    df["b"] = df["b"].astype(object)
    df.loc[3, "b"] = "oops"
    df.loc[9, "label"] = None
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad\.csv: 2 unreadable rows: line 5, column 'b': non-numeric value 'oops'; "
                                        r"line 11: missing label in column 'label'"):
        pipeline.read_keys(pipeline.open_source("exercise", str(tmp_path / "bad.csv")))
    with pytest.raises(DataError, match="label column 'target' not found"):
        pipeline.open_source("exercise", str(tmp_path / "ok.csv"), label_column="target")


def _png(path: Path, seed: int, size: int = 64) -> None:
    from medray.synthetic import ultrasound_image

    path.parent.mkdir(parents=True, exist_ok=True)
    kind = ["normal", "benign", "malignant"][seed % 3]
    Image.fromarray(ultrasound_image(kind, np.random.default_rng(seed), size)).save(path)


def test_fingerprint_follows_content_not_the_driver(ray_session, tmp_path):
    for i in range(12):
        _png(tmp_path / "img" / ["a", "b"][i % 2] / f"{i}.png", i)
    fp = lambda: pipeline.fingerprint(pipeline.read_keys(pipeline.open_source("ultrasound", str(tmp_path / "img"))),
                                      {})
    first = fp()
    assert fp() == first  # same data: same fingerprint (resume works)
    target = tmp_path / "img" / "a" / "4.png"
    size = target.stat().st_size
    _png(target, 99)  # same name, other pixels
    assert fp() != first, (size, target.stat().st_size)


def test_s3_data_is_read_straight_from_an_s3_server(ray_session, s3_server, storage, tmp_path, monkeypatch):
    """Training reads s3:// through pyarrow on the cluster: no copy in the local data cache."""
    from medray.data import location
    from medray.train import train

    monkeypatch.setattr(location, "CACHE", tmp_path / "cache")
    fasta = shared("genomic", "splice.fasta").read_bytes()
    with s3_server.open_output_stream("medray/data/splice.fasta") as f:
        f.write(fasta)
    root = shared("ultrasound")
    manifest = (root / "labels.csv").read_text().splitlines()
    picked = [manifest[0], *manifest[1:][::4]]  # a quarter of the images, every class
    for line in picked[1:]:
        rel = line.split(",")[0]
        with s3_server.open_output_stream(f"medray/us/{rel}") as f:
            f.write((root / rel).read_bytes())
    with s3_server.open_output_stream("medray/us/labels.csv") as f:
        f.write(("\n".join(picked) + "\n").encode())

    meta = train("genomic", "s3://medray/data/splice.fasta", str(tmp_path / "g"), epochs=1, workers=2,
                 storage=str(storage), name="s3-genomic", group_column="id-prefix")
    assert meta["data"]["source"] == "s3://medray/data/splice.fasta" and meta["data"]["rows"] == 2231
    meta = train("ultrasound", "s3://medray/us/labels.csv", str(tmp_path / "u"), model="cnn", epochs=1, workers=2,
                 storage=str(storage), name="s3-ultrasound")
    assert meta["data"]["rows"] == len(picked) - 1 and (tmp_path / "u" / "model.pt").exists()
    assert not (tmp_path / "cache").exists()  # nothing was copied to local disk
    # a missing object is named, with its URI
    with pytest.raises(DataError, match="s3://medray/nope.fasta: no such file"):
        train("genomic", "s3://medray/nope.fasta", str(tmp_path / "x"), epochs=1)


_RSS = """
import json, sys
from medray.train import train
train("ultrasound", sys.argv[1], sys.argv[2], model="cnn", epochs=1, workers=2, storage=sys.argv[3],
      address=sys.argv[4], log=lambda *a: None)
# VmHWM, this process's own peak (ru_maxrss would carry the parent's peak over fork and exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": hwm / 1024}))
"""


def test_driver_peak_rss_stays_flat_from_a_small_to_a_10x_image_set(ray_session, tmp_path):
    """`medray train`'s driver lists files and holds the key table; the images never reach it.
    Each run is its own driver process connected to the session's Ray instance."""
    import ray

    address = ray.get_runtime_context().gcs_address
    peaks = {}
    for n in (90, 900):
        root = tmp_path / f"set{n}"
        for i in range(n):
            _png(root / ["normal", "benign", "malignant"][i % 3] / f"{i:05d}.png", i, size=128)
        r = subprocess.run([sys.executable, "-c", _RSS, str(root), str(tmp_path / f"b{n}"), str(tmp_path / "runs"),
                            address], capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        peaks[n] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        assert json.loads((tmp_path / f"b{n}" / "bundle.json").read_text())["data"]["rows"] == n
    print(f"driver peak RSS: {peaks}")
    # before the data plane, 900 decoded images cost the driver ~300 KB each (~270 MB more)
    assert peaks[900] - peaks[90] < 200, peaks


def test_same_seed_trains_the_same_weights_from_an_image_folder_of_many_blocks(ray_session, storage, tmp_path):
    """An image folder is read as many Ray Data blocks whose tasks finish in any order; the shards
    still get the same rows in the same order every run (medray.train_common.whole_validation_config),
    so one seed gives one model. Before, runs of the same command could train different weights (two
    runs differed in one try of two here: what varies is the order the blocks finish in, so three
    runs are compared)."""
    import hashlib

    from medray.train import train

    for i in range(12 * pipeline.IMAGE_BLOCK):  # twelve blocks
        _png(tmp_path / "img" / ["normal", "benign", "malignant"][i % 3] / f"{i:05d}.png", i, size=48)
    runs = []
    for run in range(3):
        out = tmp_path / f"b{run}"
        meta = train("ultrasound", str(tmp_path / "img"), str(out), epochs=1, workers=2, storage=str(storage),
                     name=f"same-seed-{run}", seed=0, overrides={"ensemble": 1}, log=lambda *a: None)
        weights = hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()
        runs.append((weights, meta["data"]["train_rows"], meta["calibration"]["ece_crossfit"],
                     meta["metrics"]["history"][-1]["rows_per_worker"]))
    assert runs[0] == runs[1] == runs[2], runs
