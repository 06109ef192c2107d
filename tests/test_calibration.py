"""Calibration: ECE and its reliability table, temperature scaling, and bundles that apply it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medray.bundle import load_bundle, write_bundle
from medray.calibration import calibrate, fit_temperature, scale
from medray.metrics import classification_metrics, expected_calibration_error, pooled_ece
from medray.models import build_model
from medray.preprocessing import StandardScaler


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def _overconfident(n=4000, k=3, factor=3.0, seed=0):
    """Labels drawn from softmax(z); the 'model' reports softmax(factor * z): overconfident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, k))
    y = np.array([rng.choice(k, p=p) for p in _softmax(z)])
    return _softmax(factor * z), y, _softmax(z)


def test_ece_by_hand():
    # two rows at confidence 0.9 (one right, one wrong) and two at 0.6 (both right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    ece, table = expected_calibration_error(y, probs, bins=10)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert [(r["lower"], r["count"], r["accuracy"]) for r in table] == [(0.6, 2, 1.0), (0.9, 2, 0.5)]
    report = classification_metrics(y, probs, ["a", "b"])
    assert report["ece"] == pytest.approx(ece, abs=1e-9)  # 15 bins there group the rows the same way
    assert sum(r["count"] for r in report["reliability"]) == 4


def test_temperature_undoes_overconfidence():
    probs, y, truth = _overconfident()
    t = fit_temperature(probs, y)
    assert t == pytest.approx(3.0, rel=0.15)
    assert np.allclose(scale(probs, 3.0), truth, atol=1e-6)
    cal = calibrate(probs, y)
    assert cal["ece_uncalibrated"] > 0.05
    assert cal["ece_calibrated"] < 0.02 and cal["ece_crossfit"] < 0.03
    # a calibrated model keeps T near 1 and its argmax is never changed
    t1 = fit_temperature(truth, y)
    assert t1 == pytest.approx(1.0, abs=0.15)
    assert (scale(probs, t).argmax(1) == probs.argmax(1)).all()


def test_pooled_ece_is_the_ece_of_every_row_and_undoes_small_fold_bias():
    _, y, truth = _overconfident(n=5 * 78, k=3, seed=3)  # calibrated probabilities, folds of 78 rows
    parts = [slice(i * 78, (i + 1) * 78) for i in range(5)]
    tables = [expected_calibration_error(y[s], truth[s])[1] for s in parts]
    ece, rows = pooled_ece(tables)
    assert rows == 5 * 78
    assert ece == pytest.approx(expected_calibration_error(y, truth)[0], abs=1e-5)
    # the folds' own ECEs overstate the miscalibration of a calibrated model; the pooled one less so
    assert np.mean([expected_calibration_error(y[s], truth[s])[0] for s in parts]) > ece + 0.02
    assert pooled_ece([[], []]) == (None, 0)
    # calibrate() records the cross-fitted table that cv pools: its rows are the validation rows
    cal = calibrate(truth, y)
    assert sum(b["count"] for b in cal["reliability_crossfit"]) == len(y)
    assert pooled_ece([cal["reliability_crossfit"]])[0] == pytest.approx(cal["ece_crossfit"], abs=1e-5)

def test_bundle_applies_its_temperature(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    prep = StandardScaler.fit(x, [f"f{i}" for i in range(5)])
    arch = {"name": "mlp", "params": {"hidden": [8], "dropout": 0.0}}
    model = build_model(arch, prep.input_shape, 3)
    meta = {"task": "exercise", "model": arch, "preprocessing": prep.to_dict(), "labels": ["a", "b", "c"],
            "input_shape": prep.input_shape, "metrics": {}, "calibration": {"method": "temperature", "temperature": 2.5}}
    path = write_bundle(tmp_path / "b", model.state_dict(), meta)
    b = load_bundle(path)
    assert b.temperature == 2.5
    model.eval()
    logits = model(torch.from_numpy(prep.transform(x))).detach()
    assert np.allclose(b.predict(x), torch.softmax(logits / 2.5, 1).numpy(), atol=1e-6)
    # a bundle written before calibration existed predicts as it did
    del meta["calibration"]
    old = load_bundle(write_bundle(tmp_path / "old", model.state_dict(), meta))
    assert old.temperature == 1.0
    assert np.allclose(old.predict(x), torch.softmax(logits, 1).numpy(), atol=1e-6)
    assert "calibration" not in json.loads((tmp_path / "old" / "bundle.json").read_text())
