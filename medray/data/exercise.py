"""Wearable-sensor feature tables: numeric feature columns plus a label column."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medray.data.dataset import BadItems, Dataset
from medray.data.tables import label_values, read_table, row_name
from medray.errors import DataError


def numeric_column(df: pd.DataFrame, column: str, path: str, bad: BadItems, offset: int = 0) -> np.ndarray:
    """Column as float64; each row that is not a finite number is reported to `bad` (as row
    `offset + i` of the source: readers of a file in chunks pass the chunk's first row)."""
    raw = df[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    for i in np.flatnonzero(~np.isfinite(values)):
        shown = raw.iloc[i]
        what = "missing value" if pd.isna(shown) else f"non-numeric value {str(shown)[:40]!r}"
        bad.add(offset + i, f"{row_name(path, offset + int(i))}, column {column!r}: {what}")
    return values


def is_mostly_numeric(series: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return True
    parsed = pd.to_numeric(series, errors="coerce")
    return parsed.notna().mean() >= 0.5


def read_exercise(
    path: str,
    *,
    label_column: str | None = None,
    feature_names: list[str] | None = None,
    require_labels: bool = True,
    exclude: tuple[str, ...] = (),
    skip_bad: bool = False,
) -> Dataset:
    """Read a feature table.

    Training (feature_names=None): the label is `label_column` (default: the last column) and the
    features are the other numeric columns, minus `exclude` (e.g. a group column). A column that
    is mostly numbers but holds a non-number is an error naming the row; a text column
    (e.g. a subject name) is not a feature.
    Inference (feature_names given, from a bundle): exactly those columns, in that order; a label
    column, if present, is kept for evaluation and otherwise ignored.
    Every bad row (a feature that is no finite number, a missing label) is named in one error;
    with `skip_bad` those rows are dropped instead and listed in `meta["skipped"]`.
    """
    df = read_table(path)
    if feature_names is None:
        label_column = label_column or df.columns[-1]
    if label_column is not None and label_column not in df.columns and require_labels:
        raise DataError(f"{path}: label column {label_column!r} not found (columns: {preview(df.columns)})")

    if feature_names is None:
        candidates = [c for c in df.columns if c != label_column and c not in exclude]
        feature_names = [c for c in candidates if is_mostly_numeric(df[c])]
        if not feature_names:
            raise DataError(f"{path}: no numeric feature columns besides the label {label_column!r}")
    else:
        missing = [c for c in feature_names if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing feature column(s) {preview(missing)} that the model was trained on")

    bad = BadItems(path, "row", skip=skip_bad)
    x = np.empty((len(df), len(feature_names)), dtype=np.float32)
    for j, col in enumerate(feature_names):
        x[:, j] = numeric_column(df, col, path, bad)

    labels = None
    if label_column is not None and label_column in df.columns:
        labels = label_values(df, label_column, path, bad)
    keep = bad.keep(len(df))
    if len(keep) < len(df):
        df, x = df.iloc[keep].reset_index(drop=True), x[keep]
        labels = None if labels is None else labels[keep]
    return Dataset(
        source=str(path),
        inputs=x,
        ids=[str(i) for i in keep],
        labels=labels,
        table=df.drop(columns=feature_names),
        meta=bad.record({"feature_names": list(feature_names), "label_column": label_column}, keep),
    )


def preview(names, limit: int = 8) -> str:
    names = [str(n) for n in names]
    head = ", ".join(repr(n) for n in names[:limit])
    return head + (f", … ({len(names)} in all)" if len(names) > limit else "")
