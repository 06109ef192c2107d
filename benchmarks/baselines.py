"""The classical baselines on the folds `medray cv` uses: the yardstick the default models must beat.

Issue 13 measured, on held-out data we do not have, a random forest on the exercise features, a
logistic regression on ultrasound pixels and a random forest on one-hot splice sequences. This runs
the same three (and a second one each) on `../shared/data`, read by the project's own readers and
split by `medray.split.split_indices` into the same seeded grouped folds (seed 0, 5 folds by subject /
duplicate group / gene locus), so a row here compares fold for fold with the `medray cv` rows in
benchmarks/results/model_selection.md. Probabilities are the estimators' own (uncalibrated), ECE as
in `medray.metrics` (15 bins).

    .venv/bin/python benchmarks/baselines.py                   # all three tasks, about 8 min
    .venv/bin/python benchmarks/baselines.py --tasks genomic

Writes benchmarks/results/baselines.json and baselines.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def load(task: str):
    """(features X, label names, labels y, groups) read the way `medray cv` reads each task."""
    from medray.split import resolve_groups
    if task == "exercise":
        from medray.data.exercise import read_exercise
        ds = read_exercise(str(DATA / "exercise/exercise_windows.csv"))
        groups = resolve_groups(str(DATA / "exercise/exercise_windows_meta.csv:subject"), ds)
        x = np.asarray(ds.inputs, dtype=np.float32)
    elif task == "ultrasound":
        from medray.data.ultrasound import read_ultrasound
        ds = read_ultrasound(str(DATA / "ultrasound/labels.csv"), size=32)
        groups = resolve_groups(str(DATA / "ultrasound/manifest.csv:dup_group"), ds)
        x = ds.inputs.reshape(len(ds), -1).astype(np.float32) / 255.0
    else:
        from medray.data.genomic import read_genomic
        ds = read_genomic(str(DATA / "genomic/splice.fasta"))
        groups = resolve_groups("id-prefix", ds)
        from medray.preprocessing import SequenceEncoder  # the models' one-hot (IUPAC codes as base mixtures)
        x = SequenceEncoder.fit(ds.inputs).transform(ds.inputs).reshape(len(ds), -1)
    names = sorted(set(ds.labels))
    y = np.array([names.index(v) for v in ds.labels])
    return x, names, y, groups


def estimators(task: str) -> dict:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    rf = lambda: RandomForestClassifier(n_estimators=500, n_jobs=2, random_state=0)  # noqa: E731
    lr = lambda c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))  # noqa: E731
    if task == "ultrasound":
        return {"logistic regression (32×32 pixels)": lr(0.01), "random forest (32×32 pixels)": rf()}
    if task == "genomic":
        return {"random forest (one-hot)": rf(), "logistic regression (one-hot)": lr(0.1)}
    return {"random forest (features)": rf(), "logistic regression (features)": lr(1.0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="*", default=["exercise", "ultrasound", "genomic"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (the public datasets; see the README)")
        return 0

    from sklearn.base import clone

    from medray.metrics import classification_metrics
    from medray.split import split_indices

    out = RESULTS / "baselines.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for task in args.tasks:
        x, names, y, groups = load(task)
        for name, make in estimators(task).items():
            t0, per_fold = time.time(), []
            for i in range(args.folds):
                tr, va = split_indices(y, groups, 0.2, args.seed, fold=(args.folds, i))
                model = clone(make).fit(x[tr], y[tr])
                m = classification_metrics(y[va], model.predict_proba(x[va]), names)
                per_fold.append({k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece")})
            summary = {k: {"mean": float(np.mean([f[k] for f in per_fold])),
                           "sd": float(np.std([f[k] for f in per_fold], ddof=1))} for k in per_fold[0]}
            results[f"{task} | {name}"] = {"task": task, "folds": args.folds, "seed": args.seed,
                                           "seconds": round(time.time() - t0), "summary": summary,
                                           "per_fold": per_fold}
            print(f"{task} | {name}: " + ", ".join(f"{k} {s['mean']:.3f} ± {s['sd']:.3f}" for k, s in summary.items())
                  + "  (folds: " + ", ".join(f"{f['accuracy']:.3f}" for f in per_fold) + ")", flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
            (RESULTS / "baselines.md").write_text(table(results))
    return 0


def table(results: dict) -> str:
    head = ("Classical baselines on the seeded grouped folds of `medray cv` (seed 0, 5 folds; uncalibrated "
            "probabilities). Command: `.venv/bin/python benchmarks/baselines.py`\n\n"
            "| task | baseline | accuracy | balanced acc. | macro F1 | ECE | s |\n|---|---|---|---|---|---|---|\n")
    cell = lambda s, m: f"{s[m]['mean']:.3f} ± {s[m]['sd']:.3f}"  # noqa: E731
    rows = [f"| {r['task']} | {k.split(' | ', 1)[1]} | {cell(r['summary'], 'accuracy')} "
            f"| {cell(r['summary'], 'balanced_accuracy')} | {cell(r['summary'], 'macro_f1')} "
            f"| {cell(r['summary'], 'ece')} | {r['seconds']} |" for k, r in results.items()]
    return head + "\n".join(sorted(rows)) + "\n"


if __name__ == "__main__":
    sys.exit(main())
