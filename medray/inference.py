"""Offline inference with a bundle: `medray predict` and `medray evaluate`.

Two engines give the same probabilities (tested to 1e-5), and the user does not choose:

* **in process** for small local inputs (at most `IN_PROCESS_MAX_MB` on disk, no cluster given):
  the readers of `medray.data` read the input here, `Bundle.predict` scores it. No Ray start-up.
* **on Ray Data** (`medray.batch_inference`) for everything else: URIs (`s3://`, `gs://`),
  large archives, a cluster (`--address` or RAY_ADDRESS), `--actors`/`--gpu`: read and
  preprocessed on the cluster with training's readers, scored by an actor pool that loads the
  bundle once per actor, written in parallel.

Both write through `medray.outputs` (staged, moved into place whole) with the same columns:
`id`, `label`, `p_<class>` for each class, `bundle` and `version`.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pandas as pd

from medray.bundle import Bundle
from medray.data.dataset import BadItemsError, skipped_warning
from medray.errors import DataError, MedrayError
from medray.metrics import classification_metrics
from medray.tasks import encode_labels, read_for_model

IN_PROCESS_MAX_MB = float(os.environ.get("MEDRAY_IN_PROCESS_MAX_MB", 64))
ENGINES = ("auto", "local", "ray")


def prediction_columns(bundle: Bundle) -> list[str]:
    return ["id", "label", *(f"p_{c}" for c in bundle.labels), "bundle", "version"]


def prediction_frame(bundle: Bundle, ids, probs: np.ndarray) -> pd.DataFrame:
    """The output rows of `probs` (N, K): one per input, in the columns of `prediction_columns`."""
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(bundle.labels, dtype=object)
    df = pd.DataFrame({"id": np.asarray(ids, dtype=object).astype(str),
                       "label": labels[probs.argmax(axis=1)] if len(probs) else np.array([], dtype=object)})
    for j, c in enumerate(bundle.labels):
        df[f"p_{c}"] = probs[:, j].astype(np.float64) if len(probs) else np.array([], dtype=np.float64)
    df["bundle"], df["version"] = bundle.name, bundle.version
    return df


def _input_bytes(path: str) -> float:
    """Bytes on disk of a local input (a folder's files; a manifest's images too); inf for a
    URI, which is never read in process."""
    if "://" in str(path):
        return float("inf")
    limit, total = IN_PROCESS_MAX_MB * 2**20, 0
    if os.path.isfile(path):
        total = os.path.getsize(path)
        if path.lower().endswith((".csv", ".tsv")) and total <= limit:
            head = pd.read_csv(path, nrows=0).columns
            if "path" in head and "sequence" not in head:  # an image manifest
                base = os.path.dirname(os.path.abspath(path))
                for rel in pd.read_csv(path, usecols=["path"])["path"].astype(str):
                    full = rel if os.path.isabs(rel) else os.path.join(base, rel)
                    total += os.path.getsize(full) if os.path.isfile(full) else 0
                    if total > limit:
                        break
        return total
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        if total > limit:
            break
    return total


def choose_engine(data: str, engine: str = "auto", *, address: str | None = None, actors: int | None = None,
                  gpu: bool = False) -> str:
    if engine not in ENGINES:
        raise MedrayError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if address or os.environ.get("RAY_ADDRESS") or actors or gpu:
        return "ray"
    return "local" if _input_bytes(data) <= IN_PROCESS_MAX_MB * 2**20 else "ray"


def _check_task(bundle: Bundle) -> None:
    if bundle.task == "genomic-gan":
        raise MedrayError(f"{bundle.path}: a generator bundle has nothing to predict; use `medray generate`")


# ----------------------------------------------------------------------------- in process
def _read_here(bundle: Bundle, data: str, require_labels: bool, skip_bad: bool):
    try:
        return read_for_model(bundle.task, data, bundle.preprocessor, label_column=bundle.meta.get("label_column"),
                              require_labels=require_labels, skip_bad=skip_bad)
    except BadItemsError as e:
        raise e.with_skip_hint("predict the rest" if not require_labels else "evaluate on the rest") from None


def predict_file(bundle: Bundle, data: str, require_labels: bool = False, skip_bad: bool = False):
    """(dataset, probabilities) for every input in `data`, read here as the bundle expects."""
    ds = _read_here(bundle, data, require_labels, skip_bad)
    return ds, bundle.predict(ds.inputs)


def truth_and_probs_here(bundle: Bundle, data: str, skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(true class indices, probabilities) of labelled `data`, scored in this process."""
    ds, probs = predict_file(bundle, data, require_labels=True, skip_bad=skip_bad)
    if ds.labels is None:
        raise DataError(f"{data}: no labels to evaluate against")
    return encode_labels(ds.labels, bundle.labels, data), probs


def evaluate_file(bundle: Bundle, data: str, skip_bad: bool = False) -> dict:
    return classification_metrics(*truth_and_probs_here(bundle, data, skip_bad), bundle.labels)


# ----------------------------------------------------------------------------- the commands
def predict(bundle: Bundle, data: str, out: str | None = None, *, fmt: str | None = None, skip_bad: bool = False,
            engine: str = "auto", address: str | None = None, actors: int | None = None, batch_size: int = 256,
            gpu: bool = False, stream=None) -> dict:
    """Score `data` with `bundle` and write the rows to `out` (a file, a folder of parts, or
    `stream`/stdout when None). Returns a summary: rows, skipped, engine, seconds, output."""
    from medray import outputs

    _check_task(bundle)
    t0 = time.time()
    target = outputs.open_output(out, fmt) if out else None
    which = choose_engine(data, engine, address=address, actors=actors, gpu=gpu)
    if which == "ray":
        from medray.batch_inference import predict_on_ray

        summary = predict_on_ray(bundle, data, target, skip_bad=skip_bad, address=address, actors=actors,
                                 batch_size=batch_size, gpu=gpu, stream=stream or sys.stdout)
    else:
        ds, probs = predict_file(bundle, data, skip_bad=skip_bad)
        frame = prediction_frame(bundle, ds.ids, probs)
        cols = prediction_columns(bundle)
        if target is None:
            rows = outputs.write_stream(fmt or "csv", [frame], stream or sys.stdout, cols)
        elif target.single:
            rows = outputs.write_file(target, [frame], cols)
        else:  # a folder of one part, as the cluster engine writes it
            outputs.write_folder(target, lambda staged: outputs.write_part(target, staged, [frame], cols))
            rows = len(frame)
        summary = {"rows": rows, "skipped": list(ds.meta.get("skipped") or []), "engine": "local"}
        if summary["skipped"]:
            print(f"[medray] {skipped_warning(ds)}", file=sys.stderr)
    summary["seconds"] = round(time.time() - t0, 2)
    summary["output"] = out
    if summary["skipped"] and target is not None:
        summary["skipped_file"] = outputs.write_lines(target, "skipped.txt", summary["skipped"])
    return summary


def evaluate(bundle: Bundle, data: str, *, skip_bad: bool = False, engine: str = "auto", address: str | None = None,
             actors: int | None = None, batch_size: int = 256, gpu: bool = False, report: str | None = None) -> dict:
    """Metrics of `bundle` on labelled `data` (`medray.metrics.classification_metrics`); with
    `report`, the plots and model card of `medray.report` for that data are written there."""
    _check_task(bundle)
    if choose_engine(data, engine, address=address, actors=actors, gpu=gpu) == "ray":
        from medray.batch_inference import truth_and_probs_on_ray

        y, probs = truth_and_probs_on_ray(bundle, data, skip_bad=skip_bad, address=address, actors=actors,
                                          batch_size=batch_size, gpu=gpu)
    else:
        y, probs = truth_and_probs_here(bundle, data, skip_bad=skip_bad)
    if report:
        from medray.report import write_report

        write_report(report, bundle.meta, y, probs, evaluated_on=f"`{data}`")
    return classification_metrics(y, probs, bundle.labels)
