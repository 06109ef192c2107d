"""Cross-validation: folds that cover every row once and keep groups apart, and `medray cv` as
Ray Train jobs on the real splice data (one per fold), resumable, summarised as mean ± sd."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared
from medray.bundle import load_bundle
from medray.errors import DataError
from medray.split import flagged_rows, split_indices


def test_grouped_folds_cover_every_row_once_and_keep_groups_apart():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, size=500).astype(str)
    labels = rng.choice(["a", "b", "c"], size=500)
    seen = np.zeros(500, int)
    for i in range(5):
        tr, va = split_indices(labels, groups, 0.2, seed=3, fold=(5, i))
        assert not set(groups[tr]) & set(groups[va])
        assert len(tr) + len(va) == 500
        seen[va] += 1
    assert (seen == 1).all()
    # seeded: the same seed gives the same folds, another seed other folds
    assert np.array_equal(split_indices(labels, groups, 0.2, 3, fold=(5, 2))[1],
                          split_indices(labels, groups, 0.2, 3, fold=(5, 2))[1])
    assert not np.array_equal(split_indices(labels, groups, 0.2, 3, fold=(5, 2))[1],
                              split_indices(labels, groups, 0.2, 4, fold=(5, 2))[1])
    # without groups: stratified, each fold holds every class
    for i in range(5):
        _, va = split_indices(labels, None, 0.2, seed=0, fold=(5, i))
        assert set(labels[va]) == {"a", "b", "c"}
    with pytest.raises(DataError, match="at least 5 groups, found 3"):
        split_indices(labels[:30], np.array(["x", "y", "z"] * 10), 0.2, 0, fold=(5, 0))


@pytest.mark.ray
def test_exclude_train_flags_the_label_conflict_rows_of_a_side_table():
    import pandas as pd

    from medray.data.dataset import Dataset

    manifest = shared("ultrasound", "manifest.csv")
    side = pd.read_csv(manifest)
    ds = Dataset(source="labels.csv", inputs=None, ids=list(side["path"]), labels=None, table=side[["path"]])
    mask = flagged_rows(f"{manifest}:label_conflict", ds)
    assert mask.dtype == bool and mask.sum() == 19 == int(side["label_conflict"].sum())
    side["flag"] = ["True", "no", " yes ", "0"] * (len(side) // 4) + ["x"] * (len(side) % 4)
    assert flagged_rows("flag", Dataset(source="t", inputs=None, ids=[], labels=None, table=side)).sum() == \
        2 * (len(side) // 4)


def test_cv_trains_one_job_per_fold_and_summarises(ray_session, tmp_path, capsys, monkeypatch):
    from medray.cli import main

    data = str(shared("genomic", "splice.fasta"))
    args = ["cv", "genomic", "--data", data, "--group-column", "id-prefix", "--folds", "2", "--epochs", "2",
            "--storage", str(tmp_path / "runs"), "--out", str(tmp_path / "cv")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "cv" / "cv.json").read_text())
    folds = result["per_fold"]
    assert [f["fold"] for f in folds] == [0, 1]
    assert sum(f["val_rows"] for f in folds) == 2231  # every sequence validated exactly once
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        values = [f[m] for f in folds]
        assert result["summary"][m]["mean"] == pytest.approx(np.mean(values), abs=1e-4)
        assert result["summary"][m]["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
        assert f"{m:<20}{result['summary'][m]['mean']:>10.3f} ± " in printed
    # the pooled ECE: every validated sequence, as one set
    assert result["pooled"]["rows"] == 2231 and 0 <= result["pooled"]["ece"] < 1
    assert f"{'ece_pooled':<20}{result['pooled']['ece']:>10.3f}" in printed
    for i in range(2):  # each fold is a bundle of its own, calibrated on its own validation rows
        meta = load_bundle(tmp_path / "cv" / f"seed0-fold{i}").meta
        assert meta["data"]["split"] == {"val_fraction": None, "group_column": "id-prefix", "seed": 0,
                                         "fold": i, "folds": 2}
        assert meta["calibration"]["n"] == folds[i]["val_rows"]
    # the same command again finds every fold trained: same figures, no epoch trained again
    assert main(args) == 0
    again = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert again["summary"] == result["summary"]
    assert "already has 2 epochs" in capsys.readouterr().out
    # other medray code (an upgrade, an edited checkout): new runs, not the old code's folds
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2
    import medray.train_common

    monkeypatch.setattr(medray.train_common, "code_digest", lambda: "another medray")
    assert main(args) == 0
    assert "already has" not in capsys.readouterr().out
    after = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(after) == 4 and set(runs) < set(after)


def test_preset_overrides_name_their_section(tmp_path):
    from medray.errors import MedrayError
    from medray.train import train

    with pytest.raises(MedrayError, match="unknown section 'optimizer'"):
        train("genomic", str(shared("genomic", "splice.fasta")), str(tmp_path / "b"), overrides={"optimizer": {}})
    assert not (tmp_path / "b").exists()
