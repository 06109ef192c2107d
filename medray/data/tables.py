"""Reading tabular files (CSV, TSV, Parquet) with errors that name the file."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from medray.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")


def is_table(path: str) -> bool:
    return str(path).lower().endswith(TABLE_SUFFIXES)


def iter_table(path: str, chunk_rows: int = 1 << 20, filesystem=None, text_columns=()):
    """DataFrame chunks (`chunk_rows` rows each) of a CSV/TSV/Parquet file, in order; every
    failure is a DataError naming `path`. With a pyarrow `filesystem`, `path` is a path inside it
    (a table or image manifest on S3, read by a Ray task). `text_columns` (labels, groups, ids)
    are read as text in every chunk of a CSV, so `1` stays `1` whatever the other chunks hold."""
    path = str(path)
    if filesystem is None:
        if "://" not in path and not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path) if "://" in path else (fs.LocalFileSystem(), path)
    else:
        inner = path
    lower = path.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(filesystem.open_input_file(inner)).iter_batches(batch_size=chunk_rows):
                df = batch.to_pandas()
                df.columns = [str(c).strip() for c in df.columns]
                yield df
            return
        sep = "\t" if lower.endswith(".tsv") else ","
        with filesystem.open_input_stream(inner) as stream:
            dtype = {c: str for c in text_columns if c} or None
            for df in pd.read_csv(stream, sep=sep, chunksize=chunk_rows, dtype=dtype):
                df.columns = [str(c).strip() for c in df.columns]
                yield df
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


def read_table(path: str, filesystem=None) -> pd.DataFrame:
    """A whole CSV/TSV/Parquet file as a DataFrame (see `iter_table`); an empty table is an error."""
    chunks = list(iter_table(path, filesystem=filesystem))
    df = pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else (chunks[0] if chunks else pd.DataFrame())
    if df.empty:
        raise DataError(f"{path}: the table has no rows")
    return df


def row_name(path: str, index: int) -> str:
    """Human position of data row `index` (0-based): the line number for text tables."""
    if str(path).lower().endswith((".parquet", ".pq")):
        return f"row {index + 1}"
    return f"line {index + 2}"


def label_values(df: pd.DataFrame, column: str, path: str, bad=None, offset: int = 0) -> np.ndarray:
    """A label column as stripped strings. A missing label is reported to `bad` (a
    `medray.data.dataset.BadItems` collecting the problems of each row) or, without one, raises
    naming the first row whose label is missing."""
    raw = df[column]
    if raw.isna().any():
        missing = np.flatnonzero(raw.isna().to_numpy())
        if bad is None:
            raise DataError(f"{path}: {row_name(path, int(missing[0]))}: missing label in column {column!r}")
        for i in missing:
            bad.add(offset + i, f"{row_name(path, offset + int(i))}: missing label in column {column!r}")
    return raw.astype(str).str.strip().to_numpy()
