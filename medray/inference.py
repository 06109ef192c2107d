"""Offline inference on files with a bundle: `medray predict` and `medray evaluate`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from medray.bundle import Bundle
from medray.errors import DataError
from medray.metrics import classification_metrics
from medray.tasks import encode_labels, read_for_model


def predict_file(bundle: Bundle, data: str, require_labels: bool = False):
    """(dataset, probabilities) for every input in `data`, read as the bundle expects."""
    ds = read_for_model(bundle.task, data, bundle.preprocessor, label_column=bundle.meta.get("label_column"),
                        require_labels=require_labels)
    return ds, bundle.predict(ds.inputs)


def evaluate_file(bundle: Bundle, data: str) -> dict:
    ds, probs = predict_file(bundle, data, require_labels=True)
    if ds.labels is None:
        raise DataError(f"{data}: no labels to evaluate against")
    y = encode_labels(ds.labels, bundle.labels, data)
    return classification_metrics(y, probs, bundle.labels)


def prediction_rows(bundle: Bundle, ids, probs: np.ndarray):
    for i, p in zip(ids, probs):
        row = {"id": i, "label": bundle.labels[int(np.argmax(p))]}
        row.update({f"p_{name}": float(v) for name, v in zip(bundle.labels, p)})
        yield row


def write_predictions(rows, out: str | None, stream) -> None:
    """CSV (default, or stdout) or JSON Lines when `out` ends in .jsonl."""
    rows = list(rows)
    fh = open(out, "w", newline="") if out else stream
    try:
        if out and Path(out).suffix.lower() == ".jsonl":
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        else:
            fields = list(rows[0].keys()) if rows else ["id", "label"]
            w = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    finally:
        if out:
            fh.close()
