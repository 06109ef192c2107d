"""`--mlflow`: a Ray Train job logged to a real local MLflow store (sqlite, no server), read back
with MlflowClient; and the clear error when MLflow is not installed (medray/tracking.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medray.errors import MedrayError
from medray.report import PICTURES
from medray.synthetic import dna_sequence
from medray.tracking import EPOCH_METRICS, INSTALL_HINT, display_uri, resolve_uri

EPOCHS = 3


def tiny_fasta(path: Path, per_class: int = 60) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for kind in ("EI", "IE", "N"):
            for i in range(per_class):
                f.write(f">{kind}-{i} label={kind}\n{dna_sequence(kind, rng)}\n")
    return path


@pytest.mark.ray
def test_train_logs_params_epochs_report_and_bundle_to_a_sqlite_store(ray_session, storage, tmp_path, monkeypatch):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        pytest.fail("MLflow not installed (it is in the test extra: pip install -e '.[test]')")

    from medray.train import train

    data = tiny_fasta(tmp_path / "dna.fasta")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative sqlite path: made absolute on the driver, for the workers too
    started = time.time()
    meta = train("genomic", str(data), str(tmp_path / "bundle"), model="cnn1d", epochs=EPOCHS, workers=2,
                 storage=str(storage), name="test-mlflow", seed=0, mlflow="sqlite:///runs.db")
    written = time.time()
    uri = f"sqlite:///{work / 'runs.db'}"
    info = meta["training"]["mlflow"]
    assert info["tracking_uri"] == uri and info["experiment"] == "genomic"
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["training"]["mlflow"] == info

    client = MlflowClient(uri)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "test-mlflow"
    assert client.get_experiment(run.info.experiment_id).name == "genomic"
    # params: task, architecture, recipe, workers, seed, split, data sizes
    p, recipe = run.data.params, meta["training"]
    assert p["task"] == "genomic" and p["model.name"] == "cnn1d" and p["model.params.kernel_size"] == "7"
    assert int(p["epochs"]) == EPOCHS and int(p["workers"]) == 2 and p["seed"] == "0" and p["gpu"] == "false"
    assert float(p["lr"]) == recipe["lr"] and int(p["batch_size"]) == recipe["batch_size"]
    assert float(p["split.val_fraction"]) == 0.2 and int(p["data.train_rows"]) == meta["data"]["train_rows"]
    assert p["run_name"] == "test-mlflow"
    tags = run.data.tags
    assert tags["medray.version"] and tags["medray.data"] == str(data) and tags["medray.task"] == "genomic"
    # per-epoch metrics: one point per epoch (step = epoch), equal to the bundle's history, logged by
    # rank 0 during its epoch (between that epoch's start and the next one's), not afterwards
    history = meta["metrics"]["history"]
    starts = [h["started_at"] for h in history] + [written]
    for key in EPOCH_METRICS:
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        expected = [h[key] for h in history if h.get(key) is not None]
        if key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1"):
            assert len(expected) == EPOCHS, key
        assert [m.step for m in points] == [h["epoch"] for h in history if h.get(key) is not None], key
        assert [m.value for m in points] == pytest.approx(expected, rel=1e-9), key
        for m in points:
            assert starts[m.step - 1] - 0.01 <= m.timestamp / 1000 <= starts[m.step] + 0.01, (key, m.step)
    val = meta["metrics"]["validation"]
    assert run.data.metrics["final_accuracy"] == pytest.approx(val["accuracy"])
    assert run.data.metrics["calibration_temperature"] == pytest.approx(meta["calibration"]["temperature"])
    # artifacts: the report images, the whole bundle; beside the database, not in ./mlruns
    report = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report")}
    assert set(PICTURES) | {"model_card.md"} <= report
    bundle = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert {"bundle.json", "model.pt", "report"} <= bundle
    stored = work / "mlartifacts" / "genomic" / run.info.run_id / "artifacts"
    assert (stored / "bundle" / "model.pt").read_bytes() == (tmp_path / "bundle" / "model.pt").read_bytes()
    assert (stored / "report" / "roc.png").stat().st_size > 1000
    assert not (work / "mlruns").exists()
    assert run.info.start_time / 1000 >= started - 1


def test_mlflow_not_installed_fails_at_once_naming_the_extra(tmp_path, monkeypatch):
    data = tiny_fasta(tmp_path / "dna.fasta", per_class=5)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    from medray.train import train

    with pytest.raises(MedrayError, match=r"pip install 'medray\[mlflow\]'"):
        train("genomic", str(data), str(tmp_path / "b"), epochs=1, mlflow=f"sqlite:///{tmp_path}/runs.db")
    # the command line: status 2, one clear line, before Ray starts or anything is written
    script = ("import sys; sys.modules['mlflow'] = None\n"
              "from medray.cli import main\n"
              "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", script, "train", "genomic", "--data", str(data), "--out",
                        str(tmp_path / "b"), "--storage", str(tmp_path / "runs"), "--mlflow",
                        f"sqlite:///{tmp_path}/runs.db"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert INSTALL_HINT in r.stderr and "Traceback" not in r.stderr
    assert "read and checked" not in r.stdout + r.stderr  # stopped before Ray read the data
    assert not (tmp_path / "b").exists() and not (tmp_path / "runs.db").exists()
    # without --mlflow nothing imports MLflow (the base install has none)
    r = subprocess.run([sys.executable, "-c", "import sys, medray.cli, medray.train, medray.cv, medray.tracking; "
                        "medray.cli.build_parser(); print('mlflow' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_tracking_uris_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///runs.db") == f"sqlite:///{tmp_path}/runs.db"
    assert resolve_uri("sqlite:///sub/runs.db?timeout=30") == f"sqlite:///{tmp_path}/sub/runs.db?timeout=30"
    assert (tmp_path / "sub").is_dir()
    assert resolve_uri(f"sqlite:///{tmp_path}/runs.db") == f"sqlite:///{tmp_path}/runs.db"  # already absolute
    assert resolve_uri("mlruns") == str(tmp_path / "mlruns")
    for uri in ("http://mlflow.example:5000", "https://u:p@mlflow.example", "databricks", "postgresql://h/db"):
        assert resolve_uri(uri) == uri
    for bad in ("sqlite://", "sqlite:///:memory:", " "):
        with pytest.raises(MedrayError):
            resolve_uri(bad)
    assert display_uri("https://me:secret@mlflow.example:5000/x") == "https://me@mlflow.example:5000/x"


def test_cv_nests_one_run_per_fold_under_a_parent_run(tmp_path, monkeypatch):
    """`medray cv --mlflow`: the wiring of parent and fold runs, with train() stood in for by the
    same tracking calls it makes (the Ray Train side is the first test's)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        pytest.fail("MLflow not installed (it is in the test extra: pip install -e '.[test]')")
    import medray.train
    from medray import tracking
    from medray.cv import cross_validate

    calls = []

    def fake_train(task, data, out, *, seed, fold, mlflow, mlflow_experiment, mlflow_parent_run, label, log,
                   **options):
        calls.append(dict(fold=fold, mlflow=mlflow, experiment=mlflow_experiment, parent=mlflow_parent_run))
        tracker = tracking.start(mlflow, experiment=mlflow_experiment, run_name=f"fold{fold[1]}",
                                 parent_run_id=mlflow_parent_run, params={"fold": fold[1]}, log=log)
        acc = 0.8 + 0.1 * fold[1]
        history = [{"epoch": 1, "train_loss": 1.0, "val_accuracy": acc}]
        tracking.log_epoch(tracker.worker, history[0])  # what rank 0 does
        meta = {"model": {"name": "cnn1d"}, "calibration": {"temperature": 1.0}, "data": {"val_rows": 10},
                "metrics": {"history": history, "validation": {"accuracy": acc, "balanced_accuracy": acc,
                                                              "macro_f1": acc, "auroc": acc}}}
        tracker.annotate(meta)
        Path(out).mkdir(parents=True)
        Path(out, "bundle.json").write_text(json.dumps(meta))
        tracker.finish(meta, out)
        return meta

    monkeypatch.setattr(medray.train, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    result = cross_validate("genomic", "dna.fasta", folds=2, seeds=[0], log=lambda m: None,
                            mlflow="sqlite:///cv.db", model="cnn1d", epochs=1)
    uri = f"sqlite:///{tmp_path / 'cv.db'}"
    assert [c["fold"] for c in calls] == [(2, 0), (2, 1)] and {c["experiment"] for c in calls} == {"genomic"}
    client = MlflowClient(uri)
    parent = client.get_run(calls[0]["parent"])
    assert parent.info.status == "FINISHED" and parent.data.params["folds"] == "2"
    assert parent.data.metrics["cv_accuracy_mean"] == pytest.approx(result["summary"]["accuracy"]["mean"])
    assert "cv.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["fold0", "fold1"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["val_accuracy"] > 0.7 for r in children)
