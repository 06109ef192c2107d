"""For the in-process readers (`medray predict`/`evaluate`, the GAN's evaluation): data given as a
URI (s3://, gs://, hdfs://, file://…) is copied once to a local cache, so they only ever see local
files; plain paths (including mounted NFS/PVC paths) pass through. Training does not use this: it
reads URIs on the cluster (`medray.data.pipeline`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from medray.errors import DataError

CACHE = Path(os.environ.get("MEDRAY_DATA_CACHE", Path.home() / ".cache" / "medray" / "data"))


def is_uri(path: str) -> bool:
    return "://" in str(path)


def localize(path: str) -> str:
    """A local path holding the same file or folder as `path` (which may be a pyarrow/fsspec URI)."""
    path = str(path)
    if not is_uri(path):
        return path
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        info = filesystem.get_file_info(inner)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot open: {e}") from None
    if info.type == fs.FileType.NotFound:
        raise DataError(f"{path}: no such file or folder")
    key = hashlib.sha256(f"{path}|{info.mtime_ns}|{info.size}".encode()).hexdigest()[:16]
    dest = CACHE / key / (Path(inner).name or "data")
    if dest.exists():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest.parent))
    try:
        target = tmp / dest.name
        if info.type == fs.FileType.Directory:
            fs.copy_files(inner, str(target), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
        else:
            with filesystem.open_input_stream(inner) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        os.rename(target, dest)  # complete copies only: a crash leaves a .partial-* folder, never `dest`
    except OSError as e:
        raise DataError(f"{path}: copy failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
