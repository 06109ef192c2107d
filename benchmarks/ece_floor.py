"""The ECE a perfectly calibrated model scores on N rows: the floor under every ECE figure.

The expected calibration error (15 equal-width bins, `medray.metrics.expected_calibration_error`)
of a finite sample is biased upwards: each bin's |accuracy - confidence| is never negative, so
sampling noise adds to it. This simulates models that are calibrated by construction (labels
drawn from the model's own probabilities, K classes, logits scaled so that the mean top-class
probability equals a given accuracy) and prints their mean ECE ± sd at the row counts of
`medray cv`'s folds and of the whole datasets. A measured ECE near this floor cannot tell a
calibrated model from a miscalibrated one; the pooled ECE of `medray cv` (every fold's rows as one
set) has the lowest floor the data allows.

    .venv/bin/python benchmarks/ece_floor.py           # ~10 s; results/ece_floor.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

# task: (classes, accuracy of the default in `medray cv`, rows per fold, rows in all folds)
CASES = {
    "ultrasound": (3, 0.746, 110, 552),
    "exercise": (7, 0.841, 316, 1578),
    "genomic": (3, 0.974, 446, 2231),
}


def _calibrated(rng, n: int, k: int, scale: float):
    z = rng.normal(size=(n, k)) * scale
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1).clip(max=k - 1)  # y ~ Categorical(p): calibrated
    return p, y


def _scale_for(accuracy: float, k: int) -> float:
    """The logit scale whose mean top-class probability is `accuracy` (bisection, 20k rows)."""
    lo, hi = 0.01, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        p, _ = _calibrated(np.random.default_rng(0), 20000, k, mid)
        lo, hi = (mid, hi) if p.max(1).mean() < accuracy else (lo, mid)
    return (lo + hi) / 2


def floor(accuracy: float, k: int, n: int, reps: int = 500, seed: int = 0) -> tuple[float, float]:
    from medray.metrics import expected_calibration_error

    rng, scale = np.random.default_rng(seed), _scale_for(accuracy, k)
    eces = [expected_calibration_error(y, p)[0] for p, y in (_calibrated(rng, n, k, scale) for _ in range(reps))]
    return float(np.mean(eces)), float(np.std(eces))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=500)
    args = p.parse_args(argv)
    lines = ["ECE (15 bins) of a perfectly calibrated model, mean ± sd over "
             f"{args.reps} simulated samples. Command: `.venv/bin/python benchmarks/ece_floor.py`\n",
             "| task | classes | accuracy | rows in a fold | its ECE floor (what `ece` averages) "
             "| rows in all folds | their ECE floor (`ece_pooled`) |",
             "|---|---|---|---|---|---|---|"]
    for task, (k, acc, fold_rows, all_rows) in CASES.items():
        cells = []
        for n in (fold_rows, all_rows):  # one fold's validation rows; all folds' pooled
            m, s = floor(acc, k, n, args.reps)
            cells.append(f"{n} | {m:.3f} ± {s:.3f}")
        lines.append(f"| {task} | {k} | {acc} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ece_floor.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
