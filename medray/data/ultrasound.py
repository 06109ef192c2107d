"""Ultrasound images: PNG/JPEG (grayscale or colour) and DICOM, by class folder or CSV manifest.

Images are decoded to 8-bit grayscale and resized here; normalisation is fitted preprocessing
(`medray.preprocessing.ImageNormalizer`). Serving decodes request bodies with `decode_image`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from medray.data.dataset import BadItems, Dataset
from medray.data.tables import is_table, label_values, read_table, row_name
from medray.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
MAX_PIXELS = 40_000_000  # decompression-bomb guard: refuse images above 40 megapixels

Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def _dicom_to_gray(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        frames = max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
        # checked before decoding: every frame is decoded, and a compressed cine loop of a few MB
        # can inflate to gigabytes while each frame is within the per-image limit
        if rows * cols * frames > max_pixels:
            raise DataError(f"{name}: DICOM holds {frames} frame(s) of {cols}x{rows} pixels "
                            f"({rows * cols * frames} in all), over the {max_pixels}-pixel limit")
        pixels = ds.pixel_array.astype(np.float32)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{name}: unreadable DICOM: {str(e)[:200]}") from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):  # colour ultrasound frame
        pixels = pixels[..., :3].mean(axis=-1)
    elif pixels.ndim == 3:  # multi-frame cine loop: first frame
        pixels = pixels[0]
    if pixels.ndim != 2 or pixels.size == 0:
        raise DataError(f"{name}: DICOM pixel data has unsupported shape {pixels.shape}")
    if pixels.size > max_pixels:
        raise DataError(f"{name}: image has {pixels.size} pixels, over the {max_pixels} limit")
    pixels = pixels.astype(np.float64) * slope + intercept
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = np.zeros_like(pixels) if hi <= lo else (pixels - lo) * (255.0 / (hi - lo))
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_image(data: bytes, size: int, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/BMP/TIFF/DICOM bytes to a (size, size) uint8 grayscale array.

    Raises DataError naming `name` for empty, truncated, non-image, oversized (decompression
    bomb) or otherwise undecodable input.
    """
    if not data:
        raise DataError(f"{name}: empty file")
    if _is_dicom(data):
        img = Image.fromarray(_dicom_to_gray(data, name, max_pixels), mode="L")
    else:
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DataError(f"{name}: image is {w}x{h} pixels, over the {max_pixels} limit")
            img.load()  # forces full decode: truncated files fail here
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError(f"{name}: image is over the {MAX_PIXELS}-pixel limit (decompression bomb)") from None
        except UnidentifiedImageError:
            raise DataError(f"{name}: not an image file (PNG, JPEG, BMP, TIFF or DICOM expected)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{name}: corrupt or truncated image: {e}") from None
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" else img.convert("RGB")
        img = img.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str, size: int, name: str | None = None) -> np.ndarray:
    """The image file at `path`, decoded; errors name it as `name` (default: the path)."""
    name = str(path) if name is None else name
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror}") from None
    return decode_image(data, size, name=name)


def _list_class_folders(root: Path, require_labels: bool = True) -> pd.DataFrame:
    """Images in class subfolders (label = the subfolder); for inference (`require_labels`
    False) also the images directly in `root`, unlabelled, after those."""
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"path": str(f.relative_to(root)), "label": class_dir.name})
    if not require_labels:
        rows += [{"path": f.name, "label": None} for f in sorted(root.iterdir())
                 if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    if not rows:
        raise DataError(f"{root}: no images found (expected one subfolder per class holding PNG/JPEG/DICOM files)")
    df = pd.DataFrame(rows)
    return df.drop(columns="label") if df["label"].isna().all() else df


def list_images(path: str, require_labels: bool = True) -> tuple[Path, pd.DataFrame]:
    """The images of a dataset: (root that paths are relative to, table with `path` [, `label`])."""
    p = Path(path)
    if p.is_dir():
        return p, _list_class_folders(p, require_labels)
    if p.is_file() and is_table(str(p)):
        df = read_table(str(p))
        if "path" not in df.columns:
            raise DataError(f"{p}: manifest needs a 'path' column (columns: {list(df.columns)[:8]})")
        if require_labels and "label" not in df.columns:
            raise DataError(f"{p}: manifest needs a 'label' column")
        return p.parent, df
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return p.parent, pd.DataFrame({"path": [p.name]})
    raise DataError(f"{path}: expected a folder of class subfolders, a CSV manifest 'path,label', or an image file")


def read_ultrasound(path: str, *, size: int, require_labels: bool = True, skip_bad: bool = False) -> Dataset:
    """Images decoded to (size, size) grayscale. Every unreadable image (missing, empty, truncated,
    not an image, too large) and manifest row without a label is named in one error; with
    `skip_bad` those are dropped instead and listed in `meta["skipped"]`."""
    root, df = list_images(path, require_labels=require_labels)
    manifest = Path(path).is_file() and is_table(str(path))
    bad = BadItems(path if manifest or Path(path).is_dir() else root, "image", skip=skip_bad)
    labels = label_values(df, "label", str(path), bad) if "label" in df.columns else None
    images = np.empty((len(df), size, size), dtype=np.uint8)
    rels = df["path"].astype(str).tolist()
    for i, rel in enumerate(rels):
        if i in bad:  # no label: not worth decoding
            continue
        where = f"{row_name(path, i)}: " if manifest else ""
        full = rel if os.path.isabs(rel) else str(root / rel)
        if not os.path.exists(full):
            bad.add(i, f"{where}{full}: no such image file")
            continue
        try:
            images[i] = load_image(full, size, name=rel)
        except DataError as e:
            bad.add(i, f"{where}{e}")
    keep = bad.keep(len(df))
    if len(keep) < len(df):
        images, df = images[keep], df.iloc[keep]
        labels = None if labels is None else labels[keep]
    return Dataset(source=str(path), inputs=images, ids=[rels[i] for i in keep], labels=labels,
                   table=df.reset_index(drop=True), meta=bad.record({}, keep))
