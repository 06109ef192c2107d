"""Cross-validation: `medray cv` trains one Ray Train job per fold and seed and reports mean ± sd.

One validation split of a few hundred rows misleads by several points, and a random split of
data with groups (subjects, duplicate scans, gene loci) rewards memorising the groups. `medray cv`
splits by group (`--group-column`, the same specs as `medray train`) into K seeded folds, trains
each fold exactly as `medray train` does (same preset, recipe, preprocessing fitted on the fold's
training rows, calibration fitted on its validation rows), and summarises the folds' validation
metrics. The ECE it reports is the cross-fitted one (`medray.calibration.calibrate`): a
temperature fitted on one half of a fold's validation rows judged on the other half; averaged over
the folds (`ece`), and pooled: one ECE over all folds' validation rows together (`ece_pooled`),
which small folds do not bias upwards.

Each fold is its own run (its run name comes from its data and split), so re-running the same
command after a crash skips the finished folds and resumes the interrupted one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from medray.errors import MedrayError
from medray.metrics import pooled_ece
from medray.models import describe

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece", "ece_uncalibrated")


def fold_metrics(meta: dict) -> dict:
    """The summarised figures of one fold's bundle.json."""
    val, cal = meta["metrics"]["validation"], meta.get("calibration") or {}
    return {"accuracy": val["accuracy"], "balanced_accuracy": val["balanced_accuracy"], "macro_f1": val["macro_f1"],
            "auroc": val["auroc"], "ece": cal.get("ece_crossfit"), "ece_uncalibrated": cal.get("ece_uncalibrated"),
            "temperature": cal.get("temperature"), "val_rows": meta["data"]["val_rows"]}


def summarise(folds: list[dict]) -> dict:
    """{metric: {"mean", "sd", "n"}} over the folds (sample sd; metrics a fold lacks are left out)."""
    out = {}
    for m in METRICS:
        v = np.array([f[m] for f in folds if f.get(m) is not None], dtype=np.float64)
        if len(v):
            out[m] = {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4),
                      "n": int(len(v))}
    return out


def cross_validate(task: str, data: str, *, folds: int = 5, seeds=(0,), out: str | None = None, log=None,
                   mlflow: str | None = None, mlflow_experiment: str | None = None, **train_options) -> dict:
    """Grouped (or stratified) K-fold CV of `task` on `data`, one `medray.train.train` per fold and
    seed; `train_options` are `train`'s (model, epochs, group_column, workers, storage, …).
    `mlflow` (a tracking URI): one parent MLflow run for the command, one nested run per fold.
    Returns {"task", "folds", "seeds", "model", "group_column", "summary", "per_fold"}."""
    from medray import tracking
    from medray.console import say
    from medray.train import train

    log = log or say
    if folds < 2:
        raise MedrayError("--folds must be at least 2")
    seeds = list(seeds) or [0]
    per_fold, reliability = [], []
    experiment = mlflow_experiment or task
    parent = tracking.start(mlflow, experiment=experiment, run_name=f"cv {task} {folds}-fold seeds {seeds}", log=log,
                            params={"task": task, "folds": folds, "seeds": seeds, **train_options},
                            tags={"medray.task": task, "medray.data": str(data)})
    if parent.run_id:  # each fold: a run nested under the parent
        train_options = {**train_options, "mlflow_parent_run": parent.run_id, "mlflow_experiment": experiment}
    with tempfile.TemporaryDirectory(prefix="medray-cv-") as tmp, parent.failing():
        root = Path(out) if out else Path(tmp)
        for seed in seeds:
            for i in range(folds):
                meta = train(task, data, str(root / f"seed{seed}-fold{i}"), seed=seed, fold=(folds, i), log=log,
                             label=f"cv seed {seed} fold {i + 1}/{folds}", mlflow=mlflow, **train_options)
                per_fold.append({"seed": seed, "fold": i, **fold_metrics(meta)})
                reliability.append((meta.get("calibration") or {}).get("reliability_crossfit") or [])
    ece, rows = pooled_ece(reliability)
    result = {"task": task, "data": str(data), "folds": folds, "seeds": seeds, "model": describe(meta["model"]),
              "group_column": train_options.get("group_column"), "summary": summarise(per_fold),
              "pooled": {"ece": None if ece is None else round(ece, 4), "rows": rows}, "per_fold": per_fold}
    if out:
        (Path(out) / "cv.json").write_text(json.dumps(result, indent=2))
    parent.finish_cv(result)  # --mlflow: the summary's means and sds, and cv.json, on the parent run
    return result


def format_summary(result: dict) -> str:
    """A small table: one line per metric, mean ± sd and each fold's value."""
    split = f"grouped by {result['group_column']}" if result["group_column"] else "stratified"
    lines = [f"{result['task']} {result['model']}: {result['folds']}-fold CV ({split}) × seeds {result['seeds']}",
             f"{'metric':<20}{'mean ± sd':>18}   per fold"]
    for m, s in result["summary"].items():
        vals = " ".join(f"{f[m]:.3f}" for f in result["per_fold"] if f.get(m) is not None)
        lines.append(f"{m:<20}{s['mean']:>10.3f} ± {s['sd']:.3f}   {vals}")
    pooled = result.get("pooled") or {}
    if pooled.get("ece") is not None:
        lines.append(f"{'ece_pooled':<20}{pooled['ece']:>10.3f}           all folds' {pooled['rows']} validation rows "
                     "as one set (cross-fitted)")
    return "\n".join(lines)
