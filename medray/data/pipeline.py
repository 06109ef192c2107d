"""The training data path on Ray Data: read where the data lives, check and split it on a key
table, fit preprocessing with streaming aggregates, and preprocess in `map_batches`.

The driver only *lists* the data (file names, an image manifest, a table's header) and holds a
**key table**: one small row per item (`_key`, label, group, id, the problem if it is unreadable,
a content hash, a few numbers for fitting). Everything else runs on the cluster, reading local or
NFS paths and URIs (`s3://`, `gs://`, `file://`) through pyarrow's filesystems, with nothing copied
to the driver's disk:

    units (files, byte ranges of a FASTA file, rows of an image listing)
      → scan   (map_batches: decode/parse every item, name each bad one)   → key table on the driver
      → split  (medray.split on the key table: grouped or stratified, seeded)
      → fit    (image moments and sequence lengths come with the scan; table moments in one
                map_batches pass over the training rows, merged on the driver)
      → dataset(keys, preprocessor)  (map_batches: read, keep the split's keys, transform → x, y)

The same per-item functions the in-process readers use (`decode_image`, `sequence_problem`,
`numeric_column`, `label_values`) run in those tasks, and the preprocessor applied in
`map_batches` is the object stored in the bundle, so training, batch and online inference read
and transform an input the same way.

Why not `read_images`/`read_csv` themselves: a missing or corrupt file there fails the whole read
with Ray's error; here each bad item becomes a named row of the key table (first five in full,
then a count), and every row gets a stable `_key` (its position) that splits, row-aligned side
tables and fingerprints need.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from medray.data.dataset import BadItems, BadItemsError
from medray.data.tables import TABLE_SUFFIXES, is_table, iter_table, label_values, row_name
from medray.errors import DataError

FILE_SHIFT = 40  # a table row's _key: file ordinal << 40 | row in the file
FASTA_CHUNK = 8 << 20  # bytes of FASTA parsed by one task
TABLE_CHUNK_ROWS = 8192  # rows of a table per batch a task yields
IMAGE_BLOCK = 64  # images decoded per batch


# ----------------------------------------------------------------------------- where the data lives
def open_location(path: str):
    """(pyarrow filesystem, path inside it, FileInfo) for a local/NFS path or a URI."""
    from pyarrow import fs

    path = str(path)
    try:
        if "://" in path:
            filesystem, inner = fs.FileSystem.from_uri(path)
        else:
            filesystem, inner = fs.LocalFileSystem(), os.path.abspath(path)
        info = filesystem.get_file_info(inner)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot open: {e}") from None
    if info.type == fs.FileType.NotFound:
        raise DataError(f"{path}: no such file or folder")
    return filesystem, inner, info


def read_bytes(filesystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as f:
        return f.read()


def _join(base: str, rel: str) -> str:
    if rel.startswith("/") or "://" in rel:
        return rel
    return str(PurePosixPath(base) / rel) if base else rel


def _display(source: "Source", inner: str) -> str:
    """How a file inside the source is named in messages: the path as the user would write it."""
    if source.scheme == "file":
        return f"file://{inner}"
    return f"{source.scheme}://{inner.lstrip('/')}" if source.scheme else inner


# ----------------------------------------------------------------------------- a source
@dataclass
class Source:
    """One dataset as the cluster reads it: what the driver learned from listing it, and how a
    task reads one unit of it. Picklable (the pyarrow filesystem travels with it)."""

    task: str  # exercise | ultrasound | genomic
    path: str  # as the user gave it
    filesystem: object
    kind: str  # table | fasta | images
    files: list = field(default_factory=list)  # (inner path, size) of each data file, in order
    # tables
    feature_names: list | None = None
    label_column: str | None = None
    group_column: str | None = None  # an in-data column the split groups by
    id_column: str | None = None
    # images
    listing: pd.DataFrame | None = None  # _key, path (inside filesystem), rel, where, label[, group]
    size: int = 128
    require_labels: bool = True
    scheme: str = ""
    chunk_bytes: int = FASTA_CHUNK  # FASTA bytes per task

    @property
    def unit_name(self) -> str:
        return {"table": "row", "fasta": "record", "images": "image"}[self.kind]

    def listing_digest(self) -> str:
        """Paths and sizes of what was listed (the data fingerprint adds each item's content hash)."""
        h = hashlib.sha256()
        for inner, size in self.files:
            h.update(f"{inner}\0{size}\n".encode())
        return h.hexdigest()

    def units(self) -> list[dict]:
        """Work units a task reads: a table file, a byte range of a FASTA file, or (images) none:
        the listing's rows are the units."""
        if self.kind == "table":
            return [{"file": f, "ordinal": k} for k, (f, _) in enumerate(self.files)]
        if self.kind == "fasta":
            out = []
            for k, (f, size) in enumerate(self.files):
                for start in range(0, max(size, 1), self.chunk_bytes):
                    out.append({"file": f, "ordinal": k, "start": start, "end": min(size, start + self.chunk_bytes)})
            return out
        raise ValueError("image sources have no file units")


def open_source(task: str, path: str, *, size: int = 128, label_column: str | None = None,
                group_column: str | None = None, require_labels: bool = True,
                chunk_bytes: int = FASTA_CHUNK, feature_names: list[str] | None = None) -> Source:
    """List `path` for `task` on the driver (names and headers only) and check what can be checked
    before reading: the label column, the feature columns, the manifest's columns.
    `feature_names` (inference: a bundle's) are the exercise columns to read, in that order; a
    label column is then optional unless `require_labels`."""
    from pyarrow import fs

    filesystem, inner, info = open_location(path)
    scheme = str(path).split("://", 1)[0] if "://" in str(path) else ""
    in_column = group_column if group_column and ":" not in group_column and group_column != "id-prefix" else None
    if task == "ultrasound":
        return _image_source(path, filesystem, inner, info, size, in_column, require_labels, scheme)
    if info.type == fs.FileType.Directory:
        suffixes = TABLE_SUFFIXES if task == "exercise" else (*TABLE_SUFFIXES, ".fa", ".fasta", ".fna", ".ffn")
        infos = [i for i in filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
                 if i.type == fs.FileType.File and i.path.lower().endswith(suffixes)
                 and not PurePosixPath(i.path).name.startswith((".", "_"))]
        infos.sort(key=lambda i: i.path)
        if not infos:
            raise DataError(f"{path}: no data files in the folder")
    else:
        infos = [info]
    files = [(i.path, int(i.size or 0)) for i in infos]
    if task == "genomic" and not is_table(files[0][0]):
        return Source(task, str(path), filesystem, "fasta", files, require_labels=require_labels, scheme=scheme,
                      chunk_bytes=max(1024, int(chunk_bytes)))
    src = Source(task, str(path), filesystem, "table", files, require_labels=require_labels, scheme=scheme)
    head = _head(filesystem, files[0][0])
    if head is None or head.empty:
        raise DataError(f"{path}: the table has no rows")
    if task == "exercise":
        from medray.data.exercise import is_mostly_numeric, preview

        label = label_column or (head.columns[-1] if feature_names is None else None)
        if label not in head.columns and (require_labels or feature_names is None):
            raise DataError(f"{path}: label column {label!r} not found (columns: {preview(head.columns)})")
        if feature_names is None:
            feats = [c for c in head.columns if c not in (label, in_column) and is_mostly_numeric(head[c])]
            if not feats:
                raise DataError(f"{path}: no numeric feature columns besides the label {label!r}")
        else:
            feats = list(feature_names)
            missing = [c for c in feats if c not in head.columns]
            if missing:
                raise DataError(f"{path}: missing feature column(s) {preview(missing)} that the model was trained on")
        src.feature_names, src.label_column = feats, (label if label in head.columns else None)
    else:
        if "sequence" not in head.columns:
            raise DataError(f"{path}: CSV needs a 'sequence' column (columns: {list(head.columns)[:8]})")
        if require_labels and "label" not in head.columns:
            raise DataError(f"{path}: CSV needs a 'label' column")
        src.label_column = "label" if "label" in head.columns else None
        src.id_column = "id" if "id" in head.columns else None
    if in_column:
        if in_column not in head.columns:
            raise DataError(f"{path}: group column {in_column!r} not found (columns: {list(head.columns)[:8]}); "
                            "use COLUMN, FILE:COLUMN or id-prefix[:SEP]")
        src.group_column = in_column
    return src


def _head(filesystem, path: str, rows: int = 2000) -> pd.DataFrame | None:
    """The first rows of a table, to choose feature columns: for Parquet, numeric columns are
    known from the schema and only the others are read (a row group can be the whole file)."""
    if not path.lower().endswith((".parquet", ".pq")):
        return next(iter_table(path, rows, filesystem=filesystem), None)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(filesystem.open_input_file(path))
        schema = pf.schema_arrow
    except Exception as e:
        raise DataError(f"{path}: cannot read table: {e}") from None
    if pf.metadata.num_rows == 0:
        return None
    numeric = [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    others = [f.name for f in schema if f.name not in numeric]
    sample = next(pf.iter_batches(batch_size=rows, columns=others), None) if others else None
    n = sample.num_rows if sample is not None else 1
    head = sample.to_pandas() if sample is not None else pd.DataFrame(index=range(n))
    for name in numeric:
        head[name] = np.zeros(n)
    head = head[[f.name for f in schema]]
    head.columns = [str(c).strip() for c in head.columns]
    return head


def _image_source(path, filesystem, inner, info, size, group_column, require_labels, scheme) -> Source:
    from pyarrow import fs

    from medray.data.tables import read_table
    from medray.data.ultrasound import IMAGE_SUFFIXES

    if info.type == fs.FileType.Directory:
        rows = []
        for i in filesystem.get_file_info(fs.FileSelector(inner, recursive=True)):
            rel = PurePosixPath(i.path).relative_to(PurePosixPath(inner))
            if (i.type == fs.FileType.File and not rel.parts[0].startswith(".")
                    and rel.suffix.lower() in IMAGE_SUFFIXES and (len(rel.parts) >= 2 or not require_labels)):
                rows.append({"path": i.path, "rel": str(rel), "label": rel.parts[0] if len(rel.parts) >= 2 else None,
                             "size": int(i.size or 0)})
        if not rows:
            raise DataError(f"{path}: no images found (expected one subfolder per class holding PNG/JPEG/DICOM files)")
        df = pd.DataFrame(rows)
        df = df.assign(_top=df["label"].isna()).sort_values(["_top", "label", "rel"], kind="stable")
        df = df.drop(columns="_top").reset_index(drop=True)
        if df["label"].isna().all():  # a flat folder (inference): no labels
            df = df.drop(columns="label")
        df["where"] = ""
        manifest = False
    elif is_table(inner):
        try:
            df = read_table(inner, filesystem=filesystem)
        except DataError as e:
            raise DataError(str(e).replace(inner, str(path), 1)) from None
        if "path" not in df.columns:
            raise DataError(f"{path}: manifest needs a 'path' column (columns: {list(df.columns)[:8]})")
        if require_labels and "label" not in df.columns:
            raise DataError(f"{path}: manifest needs a 'label' column")
        base = str(PurePosixPath(inner).parent)
        df = df.copy()
        df["rel"] = df["path"].astype(str)
        df["path"] = [_join(base, r) for r in df["rel"]]
        df["where"] = [f"{row_name(str(path), i)}: " for i in range(len(df))]
        df["size"] = 0
        manifest = True
    elif inner.lower().endswith(IMAGE_SUFFIXES):
        df = pd.DataFrame({"path": [inner], "rel": [PurePosixPath(inner).name], "where": [""],
                           "size": [int(info.size or 0)]})
        manifest = False
    else:
        raise DataError(f"{path}: expected a folder of class subfolders, a CSV manifest 'path,label', or an image file")
    if group_column:
        if group_column not in df.columns:
            raise DataError(f"{path}: group column {group_column!r} not found (columns: {list(df.columns)[:8]}); "
                            "use COLUMN, FILE:COLUMN or id-prefix[:SEP]")
    keep = ["path", "rel", "where", *(["label"] if "label" in df.columns else []),
            *([group_column] if group_column else [])]
    listing = df[keep].copy()
    listing.insert(0, "_key", np.arange(len(listing), dtype=np.int64))
    if "label" in listing.columns:  # a missing label stays missing (named by the scan)
        listing["label"] = listing["label"].where(listing["label"].notna(), None)
    files = list(zip(df["rel"].astype(str), df["size"].astype(int)))
    return Source("ultrasound", str(path), filesystem, "images", files, group_column=group_column,
                  listing=listing, size=size, require_labels=require_labels and "label" in listing.columns,
                  scheme=scheme, label_column="label" if manifest else None)


# ----------------------------------------------------------------------------- reading a unit (in tasks)
def _table_rows(source: Source, unit: dict):
    """(chunk DataFrame, first row index) of a table unit, in order."""
    row = 0
    text = (source.label_column, source.group_column, source.id_column)
    for chunk in iter_table(unit["file"], TABLE_CHUNK_ROWS, filesystem=source.filesystem, text_columns=text):
        yield chunk.reset_index(drop=True), row
        row += len(chunk)


def _fasta_records(source: Source, unit: dict):
    """(byte offset, Biopython record) of the records whose '>' lies in the unit's byte range."""
    from Bio import SeqIO

    start, end = unit["start"], unit["end"]
    with source.filesystem.open_input_file(unit["file"]) as f:
        lead = max(0, start - 1)
        f.seek(lead)
        data = f.read(end - lead)
        while True:  # extend to the end of the last record that starts in range
            more = f.read(1 << 20)
            if not more:
                break
            data += more
            nxt = data.find(b"\n>", end - lead - 1)
            if nxt >= 0:
                data = data[: nxt + 1]
                break
    # record starts: '>' at the start of the file or after a newline, at an offset in [start, end)
    starts = [p for p in _record_starts(data, lead) if start <= lead + p < end]
    if start == 0 and (not data.lstrip().startswith(b">")):
        raise DataError(f"{_display(source, unit['file'])}: not FASTA (the first record must start with '>')")
    if not starts:
        return
    try:
        text = data[starts[0]:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{_display(source, unit['file'])}: not UTF-8 text (byte {lead + starts[0] + e.start})") from None
    try:
        records = list(SeqIO.parse(io.StringIO(text), "fasta"))
    except ValueError as e:
        raise DataError(f"{_display(source, unit['file'])}: malformed FASTA: {e}") from None
    if len(records) != len(starts):  # cannot happen for FASTA Biopython reads; refuse rather than misalign
        raise DataError(f"{_display(source, unit['file'])}: malformed FASTA near byte {lead + starts[0]}")
    for p, rec in zip(starts, records):
        yield lead + p, rec


def _record_starts(data: bytes, lead: int) -> list[int]:
    out = [0] if lead == 0 and data.startswith(b">") else []
    i = data.find(b"\n>")
    while i >= 0:
        out.append(i + 1)
        i = data.find(b"\n>", i + 1)
    return out


def _row_hash(df: pd.DataFrame) -> np.ndarray:
    return pd.util.hash_pandas_object(df, index=False).to_numpy().view(np.int64)


def _str_hash(values) -> np.ndarray:
    return pd.util.hash_array(np.asarray(values, dtype=object)).view(np.int64)


KEY_COLUMNS = {"_key": np.int64, "_id": object, "_label": object, "_group": object, "_error": object,
               "_hash": np.int64, "_len": np.int64, "_seqhash": object, "_n": np.float64, "_mean": np.float64,
               "_m2": np.float64, "_node": object, "_fatal": object}


def _conform(df: pd.DataFrame) -> pd.DataFrame:
    """Every block of a key table with the same columns and types (absent ones: null or 0)."""
    out = {}
    for col, dtype in KEY_COLUMNS.items():
        if col in df.columns:
            v = df[col]
            out[col] = v.astype(dtype) if dtype is not object else v.astype(object).where(v.notna(), None)
        else:
            out[col] = np.full(len(df), None, dtype=object) if dtype is object else np.zeros(len(df), dtype)
    return pd.DataFrame(out)


def _fatal(message: str) -> pd.DataFrame:
    return pd.DataFrame({"_key": [-1], "_fatal": [message]})


# ----------------------------------------------------------------------------- the scan (on the cluster)
def scan_units(batch: pd.DataFrame, source: Source):
    """Key-table rows of the units in `batch` (a map_batches function): one row per item, with
    `_error` naming what is wrong with it; a problem with a whole file is one `_fatal` row."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    for df, _ in _scan_blocks(batch, source):
        yield _done(df, node)


def _done(df: pd.DataFrame, node: str) -> pd.DataFrame:
    df = _conform(df)
    df["_node"] = node
    return df


def _scan_blocks(batch: pd.DataFrame, source: Source, with_inputs: bool = False):
    """(key-table block, raw inputs row-aligned with it or None) of the units in `batch`. The
    raw inputs (with `with_inputs`) are what preprocessors take; a bad item's is a placeholder
    (images: zeros; table rows: NaN) or, for a sequence, whatever was read."""
    if source.kind == "images":
        yield _scan_images(batch, source, with_inputs)
        return
    for unit in batch.to_dict("records"):
        try:
            if source.kind == "table":
                for chunk, first in _table_rows(source, unit):
                    df = _scan_table_chunk(source, unit, chunk, first)
                    yield df, (_table_inputs(source, chunk) if with_inputs else None)
            else:
                yield _scan_fasta(source, unit)
        except DataError as e:
            yield _fatal(str(e)), None


def _table_inputs(source: Source, chunk: pd.DataFrame):
    """A table chunk's raw inputs: the feature matrix (non-numbers as NaN) or the sequences."""
    if source.task == "exercise":
        return chunk[source.feature_names].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
    return [s.strip().upper() if isinstance(s, str) else "" for s in chunk["sequence"]]


def _scan_table_chunk(source: Source, unit: dict, chunk: pd.DataFrame, first: int) -> pd.DataFrame:
    from medray.data.exercise import numeric_column
    from medray.data.genomic import sequence_hash, sequence_problem

    name = _display(source, unit["file"]) if len(source.files) > 1 else source.path
    bad = BadItems(name, "row")
    rows = np.arange(first, first + len(chunk))
    out = pd.DataFrame({"_key": (np.int64(unit["ordinal"]) << FILE_SHIFT) + rows})
    if source.task == "exercise":
        missing = [c for c in source.feature_names if c not in chunk.columns]
        if missing:
            raise DataError(f"{name}: missing feature column(s) {missing[:8]}")
        for col in source.feature_names:
            numeric_column(chunk, col, name, bad, offset=first)
        out["_hash"] = _row_hash(chunk[source.feature_names + [source.label_column]])
        out["_id"] = rows.astype(str)
    else:
        seqs = chunk["sequence"]
        lengths, hashes = np.zeros(len(chunk), np.int64), []
        for i, s in enumerate(seqs):
            if not isinstance(s, str):
                bad.add(first + i, f"{row_name(name, first + i)}: missing sequence")
                hashes.append("")
                continue
            s = s.strip().upper()
            problem = sequence_problem(s)
            if problem:
                bad.add(first + i, f"{row_name(name, first + i)}: {problem}")
            lengths[i] = len(s)
            hashes.append(sequence_hash(s))
        out["_len"] = lengths
        out["_seqhash"] = hashes
        out["_hash"] = _str_hash(hashes)
        out["_id"] = chunk[source.id_column].astype(str).to_numpy() if source.id_column else rows.astype(str)
    if source.label_column and source.label_column in chunk.columns:
        out["_label"] = label_values(chunk, source.label_column, name, bad, offset=first)
        out.loc[chunk[source.label_column].isna().to_numpy(), "_label"] = None
    else:
        out["_label"] = None
    if source.group_column:
        out["_group"] = chunk[source.group_column].astype(str).where(chunk[source.group_column].notna(), None).to_numpy()
    out["_error"] = [bad.items.get(int(r)) for r in rows]
    return out


def _scan_fasta(source: Source, unit: dict) -> tuple[pd.DataFrame, list[str]]:
    from medray.data.genomic import record_label, record_sequence, sequence_hash

    keys, ids, labels, errors, lengths, seqhash, seqs = [], [], [], [], [], [], []
    for offset, rec in _fasta_records(source, unit):
        seq, problem = record_sequence(rec)
        seqs.append(seq)
        keys.append((unit["ordinal"] << FILE_SHIFT) + offset)
        ids.append(rec.id)
        labels.append(record_label(rec))
        errors.append(problem)
        lengths.append(len(seq))
        seqhash.append(sequence_hash(seq) if not problem else "")
    return pd.DataFrame({"_key": np.array(keys, dtype=np.int64), "_id": ids, "_label": labels, "_error": errors,
                         "_len": np.array(lengths, dtype=np.int64), "_seqhash": seqhash,
                         "_hash": _str_hash([f"{i}\0{h}" for i, h in zip(ids, seqhash)])}), seqs


def _scan_images(batch: pd.DataFrame, source: Source, with_inputs: bool = False):
    from medray.data.ultrasound import decode_image
    from medray.preprocessing import ImageNormalizer

    n = len(batch)
    out = pd.DataFrame({"_key": batch["_key"].to_numpy(np.int64), "_id": batch["rel"].to_numpy()})
    out["_label"] = batch["label"].to_numpy() if "label" in batch.columns else None
    if source.group_column:
        col = batch[source.group_column]
        out["_group"] = col.astype(str).where(col.notna(), None).to_numpy()
    errors, hashes = [None] * n, [0] * n
    mean, m2 = np.zeros(n), np.zeros(n)
    pixels = np.zeros((n, source.size, source.size), np.uint8) if with_inputs else None
    for i, (path, rel, where) in enumerate(zip(batch["path"], batch["rel"], batch["where"])):
        if source.require_labels and "label" in batch.columns and pd.isna(batch["label"].iloc[i]):
            errors[i] = f"{where}missing label in column 'label'"
            continue
        try:
            data = read_bytes(source.filesystem, path)
        except FileNotFoundError:
            errors[i] = f"{where}{_display(source, path)}: no such image file"
            continue
        except OSError as e:
            errors[i] = f"{where}{rel}: cannot read: {e}"
            continue
        try:
            img = decode_image(data, source.size, name=rel)
        except DataError as e:
            errors[i] = f"{where}{e}"
            continue
        if with_inputs:
            pixels[i] = img
        else:  # the fitting numbers and content hash training needs
            m = ImageNormalizer.moments(img[None])
            mean[i], m2[i] = m.mean[0], m.m2[0]
            hashes[i] = int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)
    out["_error"] = errors
    out["_n"] = float(source.size * source.size)
    out["_mean"], out["_m2"], out["_hash"] = mean, m2, np.array(hashes, dtype=np.int64)
    return out, pixels


def _unit_dataset(source: Source, shuffle_seed: int | None = None, rows: np.ndarray | None = None):
    """The units of `source` as a Ray Dataset, one block per unit (images: blocks of listing rows)."""
    import ray.data

    if source.kind == "images":
        listing = source.listing if rows is None else source.listing.iloc[rows]
        if shuffle_seed is not None:
            listing = listing.iloc[np.random.default_rng(shuffle_seed).permutation(len(listing))]
        n_blocks = max(1, min(256, -(-len(listing) // IMAGE_BLOCK)))
        parts = [p for p in np.array_split(np.arange(len(listing)), n_blocks) if len(p)]
        return ray.data.from_pandas([listing.iloc[p].reset_index(drop=True) for p in parts]), IMAGE_BLOCK
    units = source.units()
    if shuffle_seed is not None:
        units = [units[i] for i in np.random.default_rng(shuffle_seed).permutation(len(units))]
    return ray.data.from_items(units, override_num_blocks=len(units)), 1


def scan(source: Source) -> pd.DataFrame:
    """The key table of `source`, read and checked on the cluster: one row per item, in `_key`
    order. A whole-file problem (not FASTA, a malformed table) raises DataError."""
    ds, per_batch = _unit_dataset(source)
    # SPREAD: reading is I/O and decoding, worth every node of the cluster
    table = ds.map_batches(scan_units, fn_kwargs={"source": source}, batch_size=per_batch, batch_format="pandas",
                           scheduling_strategy="SPREAD").to_pandas()
    return checked_table(source, table)


def checked_table(source: Source, table: pd.DataFrame) -> pd.DataFrame:
    """Scanned key-table rows (in any order) checked and sorted: a whole-file problem (a
    `_fatal` row) or no items at all raises DataError."""
    fatal = table["_fatal"].dropna()
    if len(fatal):
        raise DataError(str(fatal.iloc[0]))
    table = table.drop(columns="_fatal")
    if table.empty:
        raise DataError(f"{source.path}: no rows" if source.kind == "table" else f"{source.path}: no FASTA records")
    return table.sort_values("_key", kind="stable").reset_index(drop=True)


SCANNED_COLUMNS = ("_key", "_id", "_label", "_error", "_fatal", "_node")  # the key-table part of scan_inputs


def scan_inputs(batch: pd.DataFrame, source: Source, preprocessor):
    """Batch inference's one read (a map_batches function): the key-table rows of the units in
    `batch` (SCANNED_COLUMNS) with each item's preprocessed input `x`, every item read and
    decoded once. A bad item's `x` comes from a placeholder and its `_ok` is false: it is named
    (or skipped) from the rows that come back, with the scan's own messages."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    for df, raw in _scan_blocks(batch, source, with_inputs=True):
        df = _done(df, node)[list(SCANNED_COLUMNS)]
        ok = (df["_error"].isna() & df["_fatal"].isna()).to_numpy()
        if raw is None:  # a whole-file problem's marker row
            raw = _placeholders(source, len(df))
        elif isinstance(raw, list):  # bad sequences may hold anything: an empty one instead
            raw = [r if o else "" for r, o in zip(raw, ok)]
        out = {c: df[c].to_numpy() for c in df.columns}
        out.update(x=preprocessor.transform(raw), _ok=ok)  # bad images are zeros, bad rows NaN: not scored
        yield out


def _placeholders(source: Source, n: int):
    """`n` raw inputs of the source's kind that preprocess to the right shape (never scored)."""
    if source.kind == "images":
        return np.zeros((n, source.size, source.size), np.uint8)
    if source.task == "exercise":
        return np.zeros((n, len(source.feature_names)), np.float32)
    return [""] * n


def scan_inputs_dataset(source: Source, preprocessor):
    """Every item of `source` read once on the cluster, as rows of `scan_inputs`."""
    ds, per_batch = _unit_dataset(source)
    return ds.map_batches(scan_inputs, fn_kwargs={"source": source, "preprocessor": preprocessor},
                          batch_size=per_batch, batch_format="pandas", scheduling_strategy="SPREAD")


# ----------------------------------------------------------------------------- the key table on the driver
@dataclass
class KeyTable:
    """The items kept after the scan: `rows` are their key-table rows (keys, labels, ids, groups,
    hashes, fitting numbers) in source order; `positions` their places among all `total` items of
    the source (for row-aligned side tables); `skipped` the messages of the items left out.
    Quacks like a reader's `Dataset` where splits and skip reports need it (`source`, `ids`,
    `table`, `meta`)."""

    src: Source
    rows: pd.DataFrame
    positions: np.ndarray
    total: int
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def source(self) -> str:
        return self.src.path

    @property
    def keys(self) -> np.ndarray:
        return self.rows["_key"].to_numpy(np.int64)

    @property
    def labels(self) -> np.ndarray | None:
        if self.rows["_label"].isna().any():
            return None
        return self.rows["_label"].astype(str).str.strip().to_numpy(dtype=object)

    @property
    def ids(self) -> list[str]:
        return self.rows["_id"].astype(str).tolist()

    @property
    def table(self) -> pd.DataFrame:
        """The in-data group column, when the split groups by one."""
        if self.src.group_column:
            return pd.DataFrame({self.src.group_column: self.rows["_group"].to_numpy(dtype=object)})
        return pd.DataFrame()

    @property
    def nodes(self) -> dict:
        """Items read per cluster node (node id → count) by the scan."""
        return {str(k): int(v) for k, v in self.rows["_node"].value_counts().items()}

    @property
    def meta(self) -> dict:
        if not self.skipped:
            return {}
        return {"skipped": self.skipped, "skipped_unit": self.src.unit_name,
                "source_rows": [int(p) for p in self.positions]}


def resolve(source: Source, table: pd.DataFrame, *, skip_bad: bool = False, require_labels: bool = True) -> KeyTable:
    """Name the bad items of a scanned key table (BadItemsError listing them, first five in full)
    or, with `skip_bad`, drop them and keep their messages."""
    name = source.path
    bad = BadItems(name, source.unit_name, skip=skip_bad)
    errors = table["_error"].to_numpy(dtype=object)
    if source.kind == "fasta":
        ids = table["_id"].tolist()
        for k in np.flatnonzero(pd.notna(errors)):
            bad.add(k, f"record {k + 1} ({ids[k]}): {errors[k]}")
        missing = np.flatnonzero(table["_label"].isna().to_numpy())
        if len(missing) and (require_labels or len(missing) < len(table)):
            for k in missing:
                bad.add(k, f"record {k + 1} ({ids[k]}) has no 'label=' token in its header")
    else:
        for k in np.flatnonzero(pd.notna(errors)):
            bad.add(k, str(errors[k]))
    keep = bad.keep(len(table))
    return KeyTable(source, table.iloc[keep].reset_index(drop=True), keep, len(table), bad.messages)


def read_keys(source: Source, *, skip_bad: bool = False, require_labels: bool = True,
              rest: str = "train on the rest", scanned: pd.DataFrame | None = None) -> KeyTable:
    """scan + resolve; bad items raise with a hint about `--skip-bad` (to `rest`). `scanned`:
    key-table rows a read already brought back (batch inference's `scan_inputs`), not rescanned."""
    try:
        table = scan(source) if scanned is None else checked_table(source, scanned)
        return resolve(source, table, skip_bad=skip_bad, require_labels=require_labels)
    except BadItemsError as e:
        raise e.with_skip_hint(rest) from None


def fingerprint(keys: KeyTable, extra: dict) -> str:
    """What the data is, from the listing (paths, sizes) and the content hash of every kept item
    (computed on the cluster by the scan), plus `extra` (labels, split, fitted preprocessing)."""
    import json

    h = hashlib.sha256(keys.src.listing_digest().encode())
    h.update(np.ascontiguousarray(keys.keys).tobytes())
    h.update(np.ascontiguousarray(keys.rows["_hash"].to_numpy(np.int64)).tobytes())
    h.update("\0".join(map(str, keys.rows["_label"].tolist())).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- rows of a split (in tasks)
_REFS: dict = {}


def resolve_ref(ref):
    """A numpy array passed by object reference, fetched once per worker process."""
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _REFS:
        _REFS.clear()
        _REFS[key] = ray.get(ref)
    return _REFS[key]


def kept(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Mask of `keys` that are in the sorted array `wanted`."""
    if len(wanted) == 0:
        return np.zeros(len(keys), bool)
    pos = np.searchsorted(wanted, keys)
    pos[pos >= len(wanted)] = len(wanted) - 1
    return wanted[pos] == keys


def raw_rows(batch: pd.DataFrame, source: Source, wanted):
    """(keys, raw inputs, labels) of the wanted items in the units of `batch`: a feature matrix,
    a list of sequences, or a uint8 image stack (the inputs preprocessors take)."""
    wanted = resolve_ref(wanted)
    if source.kind == "images":
        from medray.data.ultrasound import decode_image

        sel = batch[kept(batch["_key"].to_numpy(np.int64), wanted)]
        imgs = np.empty((len(sel), source.size, source.size), np.uint8)
        for i, (path, rel) in enumerate(zip(sel["path"], sel["rel"])):
            imgs[i] = decode_image(read_bytes(source.filesystem, path), source.size, name=rel)
        labels = sel["label"].astype(str).str.strip().to_numpy(dtype=object) if "label" in sel else None
        yield sel["_key"].to_numpy(np.int64), imgs, labels
        return
    for unit in batch.to_dict("records"):
        if source.kind == "table":
            for chunk, first in _table_rows(source, unit):
                keys = (np.int64(unit["ordinal"]) << FILE_SHIFT) + np.arange(first, first + len(chunk))
                mask = kept(keys, wanted)
                if not mask.any():
                    continue
                chunk = chunk[mask]
                labels = (chunk[source.label_column].astype(str).str.strip().to_numpy(dtype=object)
                          if source.label_column in chunk.columns else None)
                yield keys[mask], _table_inputs(source, chunk), labels
        else:
            from medray.data.genomic import record_label

            records = list(_fasta_records(source, unit))
            keys = np.array([(unit["ordinal"] << FILE_SHIFT) + off for off, _ in records], np.int64)
            mask = kept(keys, wanted)
            for lo in range(0, len(records), TABLE_CHUNK_ROWS):
                idx = np.flatnonzero(mask[lo: lo + TABLE_CHUNK_ROWS]) + lo
                if len(idx):
                    yield (keys[idx], [str(records[i][1].seq).strip().upper() for i in idx],
                           np.array([record_label(records[i][1]) for i in idx], dtype=object))


def _transform_batch(batch: pd.DataFrame, source: Source, wanted, preprocessor, label_index: dict | None):
    for keys, raw, labels in raw_rows(batch, source, wanted):
        x = preprocessor.transform(raw)
        if label_index is None or labels is None:
            y = np.zeros(len(keys), np.int64)
        else:
            y = np.array([label_index[str(v)] for v in labels], dtype=np.int64)
        yield {"x": x, "y": y, "key": keys}


def _moments_batch(batch: pd.DataFrame, source: Source, wanted, per_channel: bool, center_windows: bool = False):
    from medray.preprocessing import Moments, StandardScaler

    for keys, x, _ in raw_rows(batch, source, wanted):
        m = Moments.of(StandardScaler.moment_columns(x, source.feature_names, per_channel, center_windows))
        yield {"first": keys[:1], "n": np.array([m.n]), "mean": m.mean[None, :], "m2": m.m2[None, :]}


def _put(keys: np.ndarray):
    import ray

    return ray.put(np.sort(np.asarray(keys, dtype=np.int64)))


def dataset(source: Source, keys: np.ndarray, preprocessor, label_index: dict | None, *, shuffle_seed=None):
    """The items `keys` of `source` as a Ray Dataset of preprocessed rows {x, y, key}, read and
    transformed by `map_batches` on the cluster. With `shuffle_seed`, units (files, FASTA ranges,
    images) come in a seeded random order."""
    wanted = np.sort(np.asarray(keys, dtype=np.int64))
    rows = None
    if source.kind == "images":  # only the listing rows wanted, so no task reads the others
        rows = np.flatnonzero(kept(source.listing["_key"].to_numpy(np.int64), wanted))
    ds, per_batch = _unit_dataset(source, shuffle_seed, rows)
    return ds.map_batches(_transform_batch, batch_size=per_batch, batch_format="pandas",
                          fn_kwargs={"source": source, "wanted": _put(wanted), "preprocessor": preprocessor,
                                     "label_index": label_index})


def fit_table_moments(source: Source, keys: np.ndarray, per_channel: bool, center_windows: bool = False):
    """Moments of the training rows' features (per feature, or per channel), one partial per
    block computed on the cluster, merged here."""
    from medray.preprocessing import Moments

    ds, per_batch = _unit_dataset(source)
    parts = ds.map_batches(_moments_batch, batch_size=per_batch, batch_format="pandas",
                           fn_kwargs={"source": source, "wanted": _put(keys), "per_channel": per_channel,
                                      "center_windows": center_windows})
    rows = sorted(parts.take_all(), key=lambda r: int(r["first"]))  # merged in source order: same bits every run
    if not rows:
        raise DataError(f"{source.path}: no training rows to fit preprocessing on")
    return Moments.merge([r["n"] for r in rows], [r["mean"] for r in rows], [r["m2"] for r in rows])


def collect_inputs(source: Source, keys: np.ndarray) -> list:
    """Raw inputs of a few items (e.g. a reference sample of sequences), in `keys` order."""
    wanted = np.sort(np.asarray(keys, dtype=np.int64))
    ds, per_batch = _unit_dataset(source)

    def fetch(batch):
        for k, raw, _ in raw_rows(batch, source, wanted):
            yield {"key": k, "raw": np.asarray(raw, dtype=object)}

    rows = ds.map_batches(fetch, batch_size=per_batch, batch_format="pandas").take_all()
    by_key = {int(r["key"]): r["raw"] for r in rows}
    return [by_key[int(k)] for k in keys if int(k) in by_key]
