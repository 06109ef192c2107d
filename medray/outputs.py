"""Where `medray predict` writes: one file or a folder of parts, a local/NFS path or a URI
(`s3://`, `gs://`, `file://`), Parquet (default), CSV or JSON Lines.

Nothing is ever half-written where the user looks. Every output is first written to a staging
place beside the target (`.NAME.tmp-…`) and moved into place when it is complete:

* a local file or folder is renamed into place (one atomic rename; a folder that exists is
  swapped with the new one atomically where Linux allows, as bundles are);
* on object storage, a file is copied into place in one request (it appears whole or not at all),
  and a folder's parts are copied, then `_SUCCESS` is written last: a folder without `_SUCCESS`
  is not a result (the convention Spark, Hadoop and Ray users read by).

A crash leaves at most a `.NAME.tmp-…` staging place, never a result that looks complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd

from medray.errors import MedrayError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json"}
PART_SUFFIX = {"parquet": "parquet", "csv": "csv", "json": "jsonl"}  # a part's name in a folder output
SUCCESS = "_SUCCESS"


@dataclass
class Output:
    """A resolved output: `single` (a file, named by its suffix) or a folder of parts."""

    path: str  # as the user gave it
    filesystem: object
    inner: str  # the path inside the filesystem
    fmt: str  # parquet | csv | json
    single: bool

    @property
    def local(self) -> bool:
        from pyarrow import fs

        return isinstance(self.filesystem, fs.LocalFileSystem)

    def staging(self) -> str:
        """A fresh staging path beside the target, inside the same filesystem."""
        p = PurePosixPath(self.inner)
        return str(p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:12]}")

    def side_file(self, what: str) -> str:
        """A file beside the output, e.g. `preds.skipped.txt` for `preds.parquet` or `preds/`."""
        p = PurePosixPath(self.inner)
        stem = p.name[: -len(p.suffix)] if self.single and p.suffix else p.name
        return str(p.parent / f"{stem}.{what}")


def open_output(path: str, fmt: str | None = None) -> Output:
    """Resolve `path`: a name ending in .parquet/.pq/.csv/.jsonl is one file, anything else a
    folder of parts (format `fmt`, default Parquet). The parent must exist (local paths)."""
    from pyarrow import fs

    path = str(path)
    try:
        if "://" in path:
            filesystem, inner = fs.FileSystem.from_uri(path.rstrip("/"))
        else:
            filesystem, inner = fs.LocalFileSystem(), os.path.abspath(path)
    except (OSError, ValueError) as e:
        raise MedrayError(f"{path}: cannot write there: {e}") from None
    suffix = PurePosixPath(inner).suffix.lower()
    single = suffix in FORMATS and not path.endswith("/")
    if fmt is not None and fmt not in ("parquet", "csv", "json"):
        raise MedrayError(f"output format {fmt!r}: choose parquet, csv or json")
    if single and fmt is not None and FORMATS[suffix] != fmt:
        raise MedrayError(f"{path}: the name says {FORMATS[suffix]}, --format says {fmt}")
    out = Output(path, filesystem, inner, FORMATS[suffix] if single else (fmt or "parquet"), single)
    if out.local and not os.path.isdir(os.path.dirname(inner)):
        raise MedrayError(f"{path}: the folder {os.path.dirname(inner)} does not exist")
    info = filesystem.get_file_info(inner)
    if single and info.type == fs.FileType.Directory:
        raise MedrayError(f"{path}: is a folder; give a file name or a folder path without a file suffix")
    if not single and info.type == fs.FileType.File:
        raise MedrayError(f"{path}: is a file; a folder output needs a path without a file suffix")
    return out


# ----------------------------------------------------------------------------- one file, streamed
class FileWriter:
    """Appends DataFrame batches to one file (Parquet row groups, CSV, JSON Lines), in order;
    `stream` (e.g. stdout) instead of a file writes CSV/JSON text there."""

    def __init__(self, fmt: str, sink=None, filesystem=None, path: str | None = None):
        self.fmt, self.rows, self._writer, self._header = fmt, 0, None, True
        self._own = sink is None
        self._fh = sink if sink is not None else filesystem.open_output_stream(path)
        if fmt == "parquet" and not self._own:
            raise MedrayError("Parquet needs a file; give --out NAME.parquet (stdout gets CSV or JSON Lines)")

    def write(self, df: pd.DataFrame) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._fh, table.schema)
            self._writer.write_table(table)
        else:
            text = (df.to_csv(index=False, header=self._header, lineterminator="\n", float_format="%.9g")
                    if self.fmt == "csv" else df.to_json(orient="records", lines=True, double_precision=9))
            if text and not text.endswith("\n"):
                text += "\n"
            self._fh.write(text.encode() if self._own else text)
        self._header = False
        self.rows += len(df)

    def close(self, columns: list[str] | None = None) -> None:
        if self.fmt == "parquet" and self._writer is None and columns is not None:  # no rows: still a valid file
            self.write(pd.DataFrame({c: pd.Series(dtype=object) for c in columns}))
        if self._writer is not None:
            self._writer.close()
        if self.fmt == "csv" and self._header and columns is not None:  # no rows: the header alone
            line = ",".join(columns) + "\n"
            self._fh.write(line.encode() if self._own else line)
        if self._own:
            self._fh.close()


def write_file(out: Output, batches, columns: list[str]) -> int:
    """Stream `batches` (DataFrames) into the single-file output `out`, staged and moved into
    place once complete; returns the row count."""
    staged = out.staging() + PurePosixPath(out.inner).suffix
    w = FileWriter(out.fmt, filesystem=out.filesystem, path=staged)
    try:
        for df in batches:
            w.write(df)
        w.close(columns)
        _move_file(out.filesystem, staged, out.inner)
    except BaseException:
        remove_quietly(out.filesystem, staged)
        raise
    return w.rows


def write_stream(fmt: str, batches, stream, columns: list[str]) -> int:
    w = FileWriter("json" if fmt == "json" else "csv", sink=stream)
    for df in batches:
        w.write(df)
    w.close(columns)
    return w.rows


# ----------------------------------------------------------------------------- a folder of parts
def write_folder(out: Output, write_parts) -> None:
    """The folder output `out`: `write_parts(staged)` writes every part into the staging folder
    `staged` (e.g. Ray Data's `write_parquet`), which is then moved into place whole; on any
    failure the staging folder is removed and the previous result is left as it was."""
    staged = out.staging()
    try:
        write_parts(staged)
        commit_folder(out, staged)
    except BaseException:
        remove_quietly(out.filesystem, staged)
        raise


def write_part(out: Output, staged: str, batches, columns: list[str], index: int = 0) -> int:
    """One part file `part-NNNNN.<suffix>` of the folder output `out` in `staged`."""
    out.filesystem.create_dir(staged)
    part = Output(out.path, out.filesystem, f"{staged}/part-{index:05d}.{PART_SUFFIX[out.fmt]}", out.fmt, True)
    return write_file(part, batches, columns)


def commit_folder(out: Output, staged: str) -> None:
    """Move the folder of parts `staged` (complete) into place as `out`."""
    from pyarrow import fs

    if out.local:
        with open(os.path.join(staged, SUCCESS), "wb"):
            pass
        if os.path.exists(out.inner):
            from medray.bundle import exchange_paths

            if exchange_paths(staged, out.inner):  # the old result now sits at `staged`
                shutil.rmtree(staged, ignore_errors=True)
                return
            old = f"{staged}.old"
            os.rename(out.inner, old)
            os.rename(staged, out.inner)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, out.inner)
        return
    filesystem = out.filesystem
    if filesystem.get_file_info(out.inner).type == fs.FileType.Directory:
        filesystem.delete_dir_contents(out.inner)  # the old result: its _SUCCESS goes first
    else:
        filesystem.create_dir(out.inner)
    for info in filesystem.get_file_info(fs.FileSelector(staged, recursive=False)):
        if info.type == fs.FileType.File:
            filesystem.copy_file(info.path, f"{out.inner}/{PurePosixPath(info.path).name}")
    with filesystem.open_output_stream(f"{out.inner}/{SUCCESS}"):
        pass
    remove_quietly(filesystem, staged)


def write_lines(out: Output, name: str, lines: list[str]) -> str:
    """A small side file beside the output (e.g. the skipped items), written whole or not at all."""
    target = out.side_file(name)
    staged = out.staging() + ".txt"
    with out.filesystem.open_output_stream(staged) as f:
        f.write(("\n".join(lines) + "\n").encode())
    _move_file(out.filesystem, staged, target)
    return target if "://" not in out.path else out.path.split("://", 1)[0] + "://" + target.lstrip("/")


def _move_file(filesystem, src: str, dst: str) -> None:
    from pyarrow import fs

    if isinstance(filesystem, fs.LocalFileSystem):
        os.replace(src, dst)
    else:  # object storage: one copy request makes `dst` appear whole
        filesystem.copy_file(src, dst)
        filesystem.delete_file(src)


def remove_quietly(filesystem, path: str) -> None:
    from pyarrow import fs

    try:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.Directory:
            filesystem.delete_dir(path)
        elif info.type == fs.FileType.File:
            filesystem.delete_file(path)
    except OSError:
        pass
