"""Model selection on ../shared/data by grouped K-fold cross-validation (`medray cv`), one Ray Train
job per fold, every candidate on the same folds. The presets' defaults and their comments come
from this table.

    .venv/bin/python benchmarks/model_selection.py                         # every candidate
    .venv/bin/python benchmarks/model_selection.py --tasks genomic --folds 5 --seeds 0

A candidate is (task, model, overrides of the preset: params / preprocessing / train / ensemble, and
`exclude_train`: a FILE:COLUMN under ../shared/data whose flagged rows are left out of training). Results:
benchmarks/results/model_selection.json (per fold) and model_selection.md (mean ± sd).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

# task: (data, group column), the grouping the held-out data is split by
SOURCES = {
    "exercise": ("exercise/exercise_windows.csv", "exercise/exercise_windows_meta.csv:subject"),
    "ultrasound": ("ultrasound/labels.csv", "ultrasound/manifest.csv:dup_group"),
    "genomic": ("genomic/splice.fasta", "id-prefix"),
}
CANDIDATES = [
    ("genomic", "poscnn", {}),  # batch 8 per worker since 2026-12-06 (was 64)
    # the batch size per worker (2 workers): 64 was the default before 2026-12-06
    ("genomic", "poscnn", {"train": {"batch_size": 4}}),
    ("genomic", "poscnn", {"train": {"batch_size": 64}}),
    ("genomic", "poscnn", {"train": {"batch_size": 32}}),
    ("genomic", "poscnn", {"train": {"batch_size": 16}}),
    ("genomic", "poscnn", {"train": {"batch_size": 16, "lr": 0.001}}),
    ("genomic", "poscnn", {"train": {"batch_size": 32, "mixup": 0.2}}),
    ("genomic", "poscnn", {"train": {"batch_size": 32}, "ensemble": 3}),
    ("genomic", "poscnn", {"train": {"label_smoothing": 0.1}}),
    ("genomic", "poscnn", {"ensemble": 3}),
    ("genomic", "poscnn", {"train": {"mixup": 0.2}}),
    ("genomic", "cnn_gru", {}),
    ("exercise", "cnn1d", {}),  # each window centred per channel since 2026-12-07 (center_windows)
    ("exercise", "cnn1d", {"preprocessing": {"per_channel": True, "center_windows": False}}),  # the default before
    ("exercise", "cnn1d", {"train": {"label_smoothing": 0.1}}),
    ("exercise", "cnn1d", {"ensemble": 1}),
    ("exercise", "cnn1d", {"train": {"batch_size": 64}}),  # the default before 2026-12-06 (now 16)
    ("exercise", "cnn1d", {"train": {"batch_size": 32}}),
    ("ultrasound", "convnet", {}),
    ("ultrasound", "convnet", {"ensemble": 1}),
    ("ultrasound", "convnet", {"train": {"batch_size": 16}}),
    ("ultrasound", "resnet", {}),
    ("ultrasound", "convnet", {"train": {"augment": {"hflip": True, "shift": 0.06, "brightness": 0.1, "contrast": 0.2,
                                                     "rotate": 10, "crop_scale": [0.7, 1.0]}}}),
    ("ultrasound", "convnet", {"exclude_train": "ultrasound/manifest.csv:label_conflict"}),
]


def _label(model: str, overrides: dict) -> str:
    extra = ", ".join(f"{k}={v}" for name, section in overrides.items()
                      for k, v in (section.items() if isinstance(section, dict) else [(name, section)]))
    return f"{model}" + (f" ({extra})" if extra else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="*", default=list(SOURCES))
    p.add_argument("--models", nargs="*", help="only these models")
    p.add_argument("--match", help="only candidates whose label contains this text")
    p.add_argument("--only", nargs="*", help="only these exact labels, e.g. 'exercise | cnn1d'")
    p.add_argument("--keep-bundles", metavar="DIR", help="keep every fold's bundle under DIR/<candidate> "
                   "(for post-hoc checks such as test-time augmentation)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--storage", default=str(ROOT / "runs" / "model-selection"))
    args = p.parse_args(argv)

    from medray.cv import cross_validate

    out = RESULTS / "model_selection.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for task, model, overrides in CANDIDATES:
        if task not in args.tasks or (args.models and model not in args.models):
            continue
        key = f"{task} | {_label(model, overrides)}"
        if (args.match and args.match not in key) or (args.only and key not in args.only):
            continue
        data, group = SOURCES[task]
        group = str(DATA / group) if ":" in group else group
        options = {"exclude_train": str(DATA / overrides["exclude_train"])} if "exclude_train" in overrides else {}
        if args.keep_bundles:
            options["out"] = str(Path(args.keep_bundles) / "".join(c if c.isalnum() else "_" for c in key)[:120])
            Path(options["out"]).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        r = cross_validate(task, str(DATA / data), folds=args.folds, seeds=args.seeds, model=model,
                           group_column=group, workers=2, storage=args.storage, log=lambda *a: None,
                           overrides={k: v for k, v in overrides.items() if k != "exclude_train"}, **options)
        results[key] = {"task": task, "model": model, "overrides": overrides, "folds": args.folds,
                        "seeds": args.seeds, "group_column": group, "seconds": round(time.time() - t0),
                        "summary": r["summary"], "pooled": r["pooled"], "per_fold": r["per_fold"]}
        print(f"{key}: " + ", ".join(f"{m} {s['mean']:.3f} ± {s['sd']:.3f}" for m, s in r["summary"].items()),
              flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        md = RESULTS / "model_selection.md"
        notes = md.read_text().partition("\n## ")  # dated notes below the table are kept
        md.write_text(table(results) + (f"\n## {notes[2]}" if notes[1] else ""))
    print(table(results))
    return 0


def table(results: dict) -> str:
    head = ("Grouped K-fold CV on ../shared/data (`medray cv`, 2 Ray Train workers, this 2-core machine). "
            "ECE: cross-fitted temperature scaling, mean ± sd over the folds, and pooled: one ECE over every fold's "
            "validation rows (`medray.metrics.pooled_ece`; runs before 2026-12-06 did not record it). "
            "Command: `.venv/bin/python benchmarks/model_selection.py`\n\n"
            "| task | model (overrides) | folds × seeds | accuracy | balanced acc. | macro F1 | AUROC | ECE "
            "| ECE pooled | ECE uncal. | s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for key, r in results.items():
        s = r["summary"]
        pooled = f"{r['pooled']['ece']:.3f}" if (r.get("pooled") or {}).get("ece") is not None else "–"
        cell = lambda m: f"{s[m]['mean']:.3f} ± {s[m]['sd']:.3f}" if m in s else "–"  # noqa: E731
        rows.append(f"| {r['task']} | {key.split(' | ', 1)[1]} | {r['folds']} × {len(r['seeds'])} | {cell('accuracy')} "
                    f"| {cell('balanced_accuracy')} | {cell('macro_f1')} | {cell('auroc')} | {cell('ece')} "
                    f"| {pooled} | {cell('ece_uncalibrated')} | {r['seconds']} |")
    return head + "\n".join(sorted(rows)) + "\n"


if __name__ == "__main__":
    sys.exit(main())
