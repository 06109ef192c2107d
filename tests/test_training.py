"""Ray Train jobs on the real datasets: two workers, sharded data, per-epoch checkpoints, bundles,
resume, and the CLI's predict/evaluate on the bundles. One local Ray instance for the session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CASES, shared
from medray.bundle import load_bundle
from medray.errors import DataError
from medray.inference import evaluate_file, predict_file
from medray.train import train

pytestmark = pytest.mark.ray

@pytest.mark.parametrize("task", ["genomic", "exercise", "ultrasound"])
def test_two_workers_train_a_bundle_that_beats_the_majority_class(trained, storage, task):
    meta, path, data = trained(task)
    history = meta["metrics"]["history"]
    epochs = CASES[task][2]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    # each worker read only its shard: about half of the training rows each epoch
    n_train = meta["data"]["train_rows"]
    for h in history:
        assert len(h["rows_per_worker"]) == 2
        assert all(abs(r - n_train / 2) <= 0.05 * n_train for r in h["rows_per_worker"]), h["rows_per_worker"]
        assert sum(h["rows_per_worker"]) <= n_train
        # step times per worker: p50 <= p90 <= p99 <= max, all within the epoch's training time
        assert len(h["step_s"]) == 2, h["step_s"]
        for q in h["step_s"]:
            assert 0 < q[0] <= q[1] <= q[2] <= q[3] <= h["train_seconds"], (q, h["train_seconds"])
    # checkpoints in the storage path: the last epoch's, and every epoch's that took over the
    # checkpoint interval (1 s); shorter epochs are checkpointed in groups
    ckpts = sorted((storage / f"test-{task}").glob("checkpoint_*/checkpoint.json"))
    ckpt_epochs = sorted(json.loads(c.read_text())["epoch"] for c in ckpts)
    assert ckpt_epochs[-1] == epochs and len(set(ckpt_epochs)) == len(ckpt_epochs)
    assert {h["epoch"] for h in history if h["seconds"] >= 1.5} <= set(ckpt_epochs), (ckpt_epochs, history)
    # the bundle loads without Ray and beats always predicting the majority class: on accuracy, or,
    # for a model trained with balanced class weights (it trades majority-class hits for minority
    # recall), on balanced accuracy, where the majority-class predictor scores 1/K
    bundle = load_bundle(path)
    val = bundle.meta["metrics"]["validation"]
    counts = np.array(val["confusion_matrix"]).sum(axis=1)
    majority = counts.max() / counts.sum()
    if bundle.meta["training"]["class_weights"]:
        assert val["balanced_accuracy"] > 1 / len(counts) + 0.1, (val["balanced_accuracy"], len(counts))
    else:
        assert val["accuracy"] > majority, (val["accuracy"], majority)
    assert val["n"] == meta["data"]["val_rows"]  # every validation row scored (no equal-shard remainder dropped)
    # calibrated: a temperature fitted on the validation rows, applied when the bundle predicts
    cal = bundle.meta["calibration"]
    assert cal["method"] == "temperature" and cal["n"] == val["n"] and 0.05 <= cal["temperature"] <= 20
    assert val["ece"] == pytest.approx(cal["ece_calibrated"], abs=1e-6)
    for key in ("task", "model", "preprocessing", "labels", "input", "metrics", "versions"):
        assert key in bundle.meta
    assert bundle.meta["data"]["fingerprint"] and bundle.meta["versions"]["ray"]
    # the report in the bundle: curves, confusion matrix, ROC, reliability diagram, model card
    assert_report(path / "report", val, curves=True)
    # evaluation on the source data works end to end
    report = evaluate_file(bundle, data)
    assert report["n"] == meta["data"]["rows"] and report["labels"] == bundle.labels


def test_grouped_validation_split_is_disjoint_by_group(trained):
    meta, path, _ = trained("genomic")
    assert meta["data"]["split"]["group_column"] == "id-prefix"
    assert meta["data"]["train_rows"] + meta["data"]["val_rows"] == 2231


def test_cli_predict_matches_library_and_evaluate_prints_json(trained, tmp_path):
    _, path, data = trained("genomic")
    out = tmp_path / "pred.jsonl"
    cli = [sys.executable, "-m", "medray"]
    subprocess.run([*cli, "predict", str(path), "--data", data, "--out", str(out)], check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ds, probs = predict_file(load_bundle(path), data)
    assert [r["id"] for r in rows] == ds.ids
    got = np.array([[r[f"p_{c}"] for c in load_bundle(path).labels] for r in rows])
    assert np.allclose(got, probs, atol=1e-6)
    csv = subprocess.run([*cli, "predict", str(path), "--data", data], check=True, capture_output=True, text=True)
    assert csv.stdout.splitlines()[0] == "id,label,p_EI,p_IE,p_N,bundle,version"  # medray.inference.prediction_columns
    bundle = load_bundle(path)
    assert all(r["bundle"] == bundle.name and r["version"] == bundle.version for r in rows)
    ev = subprocess.run([*cli, "evaluate", str(path), "--data", data, "--report", str(tmp_path / "report")],
                        check=True, capture_output=True, text=True)
    report = json.loads(ev.stdout)
    for key in ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece", "reliability", "per_class",
                "confusion_matrix", "labels"):
        assert key in report
    assert set(report["per_class"]["EI"]) >= {"sensitivity", "specificity"}
    assert sum(r["count"] for r in report["reliability"]) == report["n"]
    # --report: the pictures and a card for this data (no training curves: those belong to the bundle)
    assert_report(tmp_path / "report", report, curves=False)
    assert f"`{data}`" in (tmp_path / "report" / "model_card.md").read_text()


def assert_report(folder: Path, metrics: dict, curves: bool) -> None:
    """A report folder: readable PNGs of a sensible size, and a model card that links them and
    states the figures."""
    from PIL import Image

    from medray.report import PICTURES

    expected = [p for p in PICTURES if curves or p != "curves.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*expected, "model_card.md"])
    for name in expected:
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300, (name, im.size)
            assert len(set(im.convert("L").get_flattened_data())) > 20, name  # drawn on, not blank
    card = (folder / "model_card.md").read_text()
    assert all(f"({name})" in card for name in expected)
    assert f"| {metrics['n']} | {metrics['accuracy']:.3f} | {metrics['balanced_accuracy']:.3f} |" in card


def test_resume_continues_at_epoch_three(ray_session, storage, tmp_path):
    data = str(shared("genomic", "splice.csv"))
    kw = dict(workers=2, storage=str(storage), name="test-resume", model="cnn1d", seed=1)
    first = train("genomic", data, str(tmp_path / "b2"), epochs=2, **kw)
    assert [h["epoch"] for h in first["metrics"]["history"]] == [1, 2]
    second = train("genomic", data, str(tmp_path / "b4"), epochs=4, **kw)
    history = second["metrics"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == first["metrics"]["history"]  # epochs 1-2 restored, not retrained
    assert second["training"]["epochs_trained"] == 4
    # a different dataset under the same run name is refused rather than mixed in
    sub = tmp_path / "other.csv"
    sub.write_text(Path(data).read_text().splitlines()[0] + "\n" + "\n".join(Path(data).read_text().splitlines()[1:600]))
    with pytest.raises(Exception, match="different data"):
        train("genomic", str(sub), str(tmp_path / "bx"), epochs=4, **kw)


def test_bad_training_inputs_fail_before_any_bundle(ray_session, tmp_path):
    one_class = tmp_path / "one.fa"
    one_class.write_text("".join(f">r{i} label=EI\nACGTACGT\n" for i in range(10)))
    with pytest.raises(DataError, match=r"only one class \('EI'\)"):
        train("genomic", str(one_class), str(tmp_path / "b"), epochs=1)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,label\nx,p\ny,q\n")
    with pytest.raises(DataError, match="no numeric feature columns"):
        train("exercise", str(bad), str(tmp_path / "b"), epochs=1)
    assert not (tmp_path / "b").exists()
    r = subprocess.run([sys.executable, "-m", "medray", "train", "genomic", "--data", str(one_class), "--out",
                        str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode == 2 and "only one class" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()
