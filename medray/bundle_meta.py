"""A model bundle's `bundle.json`: its name, format tag and the checks made when it is read.

Kept apart from `medray.bundle` (weights, models, torch) so that a process which only needs to
know what a bundle is, such as the driver that deploys the Serve application, reads it
without importing torch (about 2 s of `medray serve`'s start-up on a 2-core machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medray.errors import BundleError

FORMAT = "medray-bundle/1"
WEIGHTS = "model.pt"
META = "bundle.json"
REQUIRED = ("task", "model", "preprocessing", "labels", "input_shape", "weights")


def read_meta(path: str | os.PathLike) -> dict:
    """The bundle's bundle.json, checked (present, valid JSON, this format, required keys), or a
    BundleError naming the file and what is wrong with it."""
    path = Path(path)
    if not (path / META).is_file():
        raise BundleError(f"{path}: not a model bundle (no {META})")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path / META}: corrupt JSON: {e}") from None
    except OSError as e:
        raise BundleError(f"{path / META}: cannot read: {e.strerror}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BundleError(f"{path}: unsupported bundle format {got!r} (expected {FORMAT})")
    for key in REQUIRED:
        if key not in meta:
            raise BundleError(f"{path / META}: missing {key!r}")
    return meta
