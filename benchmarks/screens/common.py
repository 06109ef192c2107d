"""What both recipe screens share: one fold's figures, and the candidate's summary line (printed and
appended to benchmarks/results/screen_<task>.jsonl)."""
import json
import time
from pathlib import Path

import numpy as np

from medray.metrics import classification_metrics

RESULTS = Path(__file__).resolve().parents[1] / "results"


def fold_figures(name, fold, y, probs, labels, t0, res):
    m = classification_metrics(y, probs, labels)
    res.append([m["accuracy"], m["balanced_accuracy"], m["ece"], time.time() - t0])
    print(name, "fold", fold, np.round(res[-1], 3), flush=True)


def summarise(task, name, res):
    r = np.array(res)
    line = {"name": name, "acc": r[:, 0].mean(), "acc_sd": r[:, 0].std(ddof=1) if len(r) > 1 else 0,
            "bal": r[:, 1].mean(), "ece": r[:, 2].mean(), "s": r[:, 3].sum(), "folds": r[:, 0].round(3).tolist()}
    print("RESULT", json.dumps(line), flush=True)
    with open(RESULTS / f"screen_{task}.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
