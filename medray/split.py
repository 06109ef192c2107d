"""Validation splits: grouped when groups are known (subject, duplicate group, locus), else stratified."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold, train_test_split

from medray.data.dataset import Dataset
from medray.data.tables import read_table
from medray.errors import DataError


def resolve_groups(spec: str | None, ds: Dataset) -> np.ndarray | None:
    """Group key per row from `--group-column SPEC`:

    - `COLUMN`: a column of the data table (e.g. `subject`, or `dup_group` in an image manifest);
    - `FILE:COLUMN`: a column of a side table row-aligned with the data (e.g. `meta.csv:subject`);
    - `id-prefix` or `id-prefix:SEP`: the record id up to the first SEP (default `-`), e.g. the
      GenBank locus of `BABAPOE-DONOR-30`.
    """
    if not spec:
        return None
    if spec == "id-prefix" or spec.startswith("id-prefix:"):
        sep = spec.split(":", 1)[1] if ":" in spec else "-"
        return np.array([i.split(sep, 1)[0] for i in ds.ids], dtype=object)
    if spec in ds.table.columns:
        col = ds.table[spec]
        if col.isna().any():
            raise DataError(f"{ds.source}: group column {spec!r} has missing values")
        return col.astype(str).to_numpy()
    if ":" in spec:
        path, column = spec.rsplit(":", 1)
        side = read_table(path)
        if column not in side.columns:
            raise DataError(f"{path}: group column {column!r} not found (columns: {list(side.columns)[:8]})")
        rows = ds.meta.get("source_rows")  # rows kept after --skip-bad dropped unreadable ones
        expected = len(ds) + len(ds.meta.get("skipped") or [])
        if rows is None and len(side) != len(ds) or rows is not None and len(side) <= max(rows, default=-1):
            raise DataError(f"{path}: has {len(side)} rows but {ds.source} has {expected}; a group file must be "
                            "row-aligned")
        values = side[column].astype(str).to_numpy()
        return values if rows is None else values[np.asarray(rows, dtype=int)]
    raise DataError(
        f"{ds.source}: group column {spec!r} not found (columns: {list(ds.table.columns)[:8]}); "
        "use COLUMN, FILE:COLUMN or id-prefix[:SEP]"
    )


def flagged_rows(spec: str, ds: Dataset) -> np.ndarray:
    """Boolean mask of the rows that `spec` (COLUMN or FILE:COLUMN, as for groups) flags with
    1 / true / yes (case-insensitive); e.g. `manifest.csv:label_conflict` for `--exclude-train`."""
    values = np.array([str(v).strip().lower() for v in resolve_groups(spec, ds)])
    return np.isin(values, ["1", "1.0", "true", "yes"])


def split_indices(labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int,
                  fold: tuple[int, int] | None = None):
    """(train_idx, val_idx): grouped-stratified when groups are given, stratified otherwise.
    `fold=(k, i)` takes the i-th of k seeded folds (cross-validation) instead of `val_fraction`."""
    n = len(labels)
    idx = np.arange(n)
    if fold is not None:
        k, i = fold
        if not 0 <= i < k or k < 2:
            raise DataError(f"fold {i} of {k}: need at least 2 folds and 0 <= fold < folds")
        return _kfold(labels, groups, k, seed)[i]
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if groups is not None:
        n_splits = max(2, int(round(1 / val_fraction)))
        n_groups = len(set(groups))
        if n_groups < 2:
            raise DataError(f"grouped validation needs at least 2 groups, found {n_groups}")
        n_splits = min(n_splits, n_groups)
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        tr, va = next(folds.split(idx, labels, groups))
        return tr, va
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 else None
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(va)


def _kfold(labels: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> list:
    """k seeded (train_idx, val_idx) folds covering every row once as validation: grouped-stratified
    with groups (no group in two folds), else stratified."""
    idx = np.arange(len(labels))
    if groups is not None:
        n_groups = len(set(groups))
        if n_groups < k:
            raise DataError(f"{k}-fold grouped cross-validation needs at least {k} groups, found {n_groups}")
        return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, labels, groups))
    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < k:
        return list(KFold(n_splits=k, shuffle=True, random_state=seed).split(idx))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, labels))
