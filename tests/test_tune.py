"""`medray tune`: the presets' search spaces, and a small Ray Tune search on the real splice data whose
trials are Ray Train jobs scored by grouped CV, ranked, early-stopped by ASHA and resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import shared
from medray.errors import MedrayError
from medray.tasks import TASKS


def test_every_preset_declares_a_search_space_of_its_own_models():
    from medray.tune import load_search, param_space, resolve

    for task in TASKS:
        search = load_search(task)
        space = param_space(search)
        assert "model" in space and "train.lr" in space
        for model in search["space"]["model"]["choice"]:
            # a draw resolves to train()'s overrides: only the drawn model's per-model entries apply
            draw = {k: (model if k == "model" else 0.00123456 if k.endswith("lr") else 1) for k in space}
            applied = resolve(task, draw)
            assert applied["model"] == model and applied["overrides"]["train"]["lr"] == 0.00123
            assert all(":" not in k for k in applied["values"])
            for owner in search["per_model"]:
                if owner != model:
                    assert not any(k in applied["values"] for k in search["per_model"][owner]
                                   if k not in search["space"])


def test_the_first_trial_is_the_presets_default_when_the_space_holds_it():
    from medray.tasks import load_preset
    from medray.tune import baseline_point, load_search, resolve

    for task in TASKS:
        preset = load_preset(task)
        point = baseline_point(task, load_search(task))
        assert point is not None, task
        values = resolve(task, point)
        assert values["model"] == preset["name"]
        for section, entries in values["overrides"].items():
            if section == "ensemble":
                assert entries == preset.get("ensemble", 1)
                continue
            for key, value in entries.items():  # the preset's value, or train()'s default where it has none
                assert value == preset[section].get(key, {"label_smoothing": 0.0}.get(key)), (task, section, key)
    # a space that cannot express the default: no baseline
    assert baseline_point("genomic", {"space": {"model": {"choice": ["cnn1d"]}}, "per_model": {}}) is None
    assert baseline_point("genomic", {"space": {"train.lr": {"grid": [0.1, 0.2]}}, "per_model": {}}) is None


@pytest.mark.parametrize("search, message", [
    ({"space": {"optimizer": {"choice": ["sgd"]}}}, "not model, ensemble or SECTION.KEY"),
    ({"space": {"model": {"choice": ["poscnn", "transformer"]}}}, r"model \['transformer'\] not in"),
    ({"space": {"train.lr": {"normal": [0, 1]}}}, "one of choice, grid, uniform, loguniform, randint"),
    ({"space": {"train.lr": {"loguniform": [0.001]}}}, r"loguniform takes \[low, high\]"),
    ({"per_model": {"resnet": {"params.dropout": 0.1}}}, "'resnet' is not a model"),
])
def test_a_bad_search_space_is_named(search, message):
    from medray.tune import check_search

    with pytest.raises(MedrayError, match=message):
        check_search("genomic", search)


def test_tune_command_refuses_bad_options_before_starting_ray(tmp_path, capsys):
    from medray.cli import main

    base = ["tune", "genomic", "--data", str(tmp_path / "x.fasta"), "--out", str(tmp_path / "t"), "--verbose"]
    assert main([*base, "--folds", "1"]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert main([*base, "--trials", "0"]) == 2
    assert "--trials, --concurrency and --workers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.ray
def test_tune_ranks_cv_scored_trials_stops_weak_ones_and_resumes(ray_session, tmp_path, capsys, monkeypatch):
    from medray.tune import format_ranking, tune

    data = str(shared("genomic", "splice.fasta"))
    # two trials in grid order: a working learning rate first, then one that cannot learn in 6 epochs:
    # ASHA (rung 1 = one fold) must stop the second, whose first fold is below the first trial's
    search = {"space": {"model": "poscnn", "train.lr": {"grid": [0.005, 1e-6]},
                        "params.dropout": {"uniform": [0.2, 0.4]}, "train.batch_size": {"choice": [32, 64]}}}
    monkeypatch.chdir(tmp_path)  # a relative --storage: the fold runs land here, not in Tune's trial folders
    options = dict(trials=1, folds=2, epochs=6, search=search, group_column="id-prefix", storage="runs",
                   baseline=False)
    result = tune("genomic", data, str(tmp_path / "tune"), **options)
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "tune" / "tune.json").read_text())
    ranking = saved["ranking"]
    assert len(ranking) == 2 and [r["rank"] for r in ranking] == [1, 2]
    assert {r["config"]["train.lr"] for r in ranking} == {0.005, 1e-6}  # every trial reported
    assert all(r["status"] in ("complete", "stopped") and r["folds_done"] >= 1 for r in ranking)
    # --concurrency 1 (the default): one trial after the other
    first, then = sorted(ranking, key=lambda r: r["started"])
    assert first["ended"] <= then["started"], ranking

    # the best trial: the working learning rate, both folds, figures = the folds' mean ± sd
    best = ranking[0]
    assert best["config"]["train.lr"] == 0.005 and best["status"] == "complete" and best["folds_done"] == 2
    accs = [f["accuracy"] for f in best["per_fold"]]
    assert best["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert best["summary"]["accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1), abs=1e-4)
    assert best["score"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert sum(f["val_rows"] for f in best["per_fold"]) == 2231  # grouped 2-fold CV over every sequence
    assert {"balanced_accuracy", "ece"} <= set(best["summary"])
    # its values come from the declared space
    assert best["config"]["model"] == "poscnn" and best["config"]["train.batch_size"] in (32, 64)
    assert 0.2 <= best["config"]["params.dropout"] <= 0.4

    # ranked: complete trials by score, best first, then the ones ASHA stopped
    complete = [r for r in ranking if r["status"] == "complete"]
    assert [r["score"] for r in complete] == sorted((r["score"] for r in complete), reverse=True)
    assert ranking == sorted(ranking, key=lambda r: (r["status"] != "complete", -r["folds_done"], -r["score"]))
    second = next(r for r in ranking if r["config"]["train.lr"] == 1e-6)
    assert second["status"] == "stopped" and second["folds_done"] == 1, ranking
    assert second["per_fold"][0]["accuracy"] < best["per_fold"][0]["accuracy"]
    assert saved["scheduler"] == {"name": "ASHA", "time_attr": "folds_done", "max_t": 2, "grace_period": 1,
                                  "reduction_factor": 2}
    assert "stopped early by ASHA after 1 fold(s)" in printed
    assert saved["finished"] and len(list((tmp_path / "runs").glob("genomic-poscnn-*"))) == 3  # 2 + 1 folds

    # the YAML snippet: the best trial's values in its model's preset entry, ready to paste
    snippet = yaml.safe_load(saved["best"]["yaml"])
    entry = snippet["models"]["poscnn"]
    assert snippet["default"] == "poscnn"
    assert entry["train"]["lr"] == 0.005 and entry["train"]["batch_size"] == best["config"]["train.batch_size"]
    assert entry["params"]["dropout"] == best["config"]["params.dropout"]
    assert entry["params"]["channels"] == 32  # not searched: the preset's
    table = format_ranking(result)
    assert f"{best['summary']['accuracy']['mean']:.3f} ± {best['summary']['accuracy']['sd']:.3f}" in \
        table.splitlines()[2]
    assert "(stopped by ASHA)" in table

    # the same search again: Tune's experiment is restored, no trial runs again, same ranking
    again = tune("genomic", data, str(tmp_path / "tune"), **options)
    printed = capsys.readouterr().out
    assert again["resumed"] and "resuming the search" in printed and "fold 1/2" not in printed
    assert [(r["config"], r["score"]) for r in again["ranking"]] == [(r["config"], r["score"]) for r in ranking]
