"""Reading tabular files (CSV, TSV, Parquet) with errors that name the file."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from medray.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")


def is_table(path: str) -> bool:
    return str(path).lower().endswith(TABLE_SUFFIXES)


def read_table(path: str) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet file into a DataFrame; every failure is a DataError naming `path`."""
    path = str(path)
    if "://" not in path and not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    lower = path.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        else:
            sep = "\t" if lower.endswith(".tsv") else ","
            df = pd.read_csv(path, sep=sep)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: malformed table: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except Exception as e:  # pyarrow raises its own types for corrupt Parquet
        raise DataError(f"{path}: cannot read table: {e}") from None
    if df.empty:
        raise DataError(f"{path}: the table has no rows")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def row_name(path: str, index: int) -> str:
    """Human position of data row `index` (0-based): the line number for text tables."""
    if str(path).lower().endswith((".parquet", ".pq")):
        return f"row {index + 1}"
    return f"line {index + 2}"


def label_values(df: pd.DataFrame, column: str, path: str, bad=None) -> np.ndarray:
    """A label column as stripped strings. A missing label is reported to `bad` (a
    `medray.data.dataset.BadItems` collecting the problems of each row) or, without one, raises
    naming the first row whose label is missing."""
    raw = df[column]
    if raw.isna().any():
        missing = np.flatnonzero(raw.isna().to_numpy())
        if bad is None:
            raise DataError(f"{path}: {row_name(path, int(missing[0]))}: missing label in column {column!r}")
        for i in missing:
            bad.add(i, f"{row_name(path, int(i))}: missing label in column {column!r}")
    return raw.astype(str).str.strip().to_numpy()
