"""Model bundles: a directory with `model.pt` (weights) and `bundle.json` (everything else).

`bundle.json` holds the task, model architecture and hyper-parameters, the fitted preprocessing,
label names, input spec, validation metrics, the training-data fingerprint, the weights' SHA-256
and the medray/torch/ray versions. Bundles are written to a temporary directory beside the
target and renamed into place, so a crash never leaves half a bundle; `load_bundle` checks the
weights' hash, so a corrupt or mismatched bundle is refused with a clear message. Loading needs
no Ray: training, `medray predict/evaluate` and serving all use `load_bundle`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medray import __version__
from medray.errors import BundleError
from medray.models import build_model, fuse_for_inference
from medray.preprocessing import preprocessor_from_dict
from medray.tasks import TASKS

from medray.bundle_meta import FORMAT, META, WEIGHTS, read_meta  # noqa: F401 - META: re-exported


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict:
    out = {"medray": __version__, "torch": torch.__version__}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:  # bundles load without Ray
        out["ray"] = None
    return out


def write_bundle(out: str | os.PathLike, state_dict: dict, meta: dict, extra=None) -> Path:
    """Atomically write a bundle directory to `out` (replacing an existing bundle there).
    `extra(folder, meta)` may add files (the report) to the bundle before it is moved into place."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    weights = buf.getvalue()
    meta = dict(meta, format=FORMAT, weights={"file": WEIGHTS, "sha256": _sha256(weights)}, versions=versions())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, data in ((WEIGHTS, weights), (META, json.dumps(meta, indent=2).encode())):
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if extra is not None:
            extra(tmp, meta)
        os.chmod(tmp, 0o755)
        if out.exists():
            if not (out / META).exists() and any(out.iterdir()):
                raise BundleError(f"{out}: exists and is not a medray bundle; refusing to replace it")
            if exchange_paths(tmp, out):  # one atomic step: `out` is the old or the new bundle, never absent
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old bundle
            else:  # no renameat2 here: two renames (a crash between them leaves the old one beside `out`)
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# Input values per forward pass of `Bundle.predict` (1 MiB of float32). Measured on 2 cores, one
# thread: the genomic model runs 177k sequences/s in passes of 256 and 219k in passes of 1,092 (78k
# at 2,048, out of cache); 256 ultrasound images ran 440/s in one pass and 657/s in passes of 64;
# exercise is flat from 256 to 873. Fewer, longer passes also hand the GIL back and forth less when
# a serving process's event loop runs beside the model's thread (docs/serving.md).
INFERENCE_CHUNK_ELEMENTS = 2**18


@dataclass
class Bundle:
    path: Path
    meta: dict
    model: torch.nn.Module
    preprocessor: object

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name

    @property
    def version(self) -> str:
        return self.meta["weights"]["sha256"][:12]

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted on validation data (`medray.calibration`); 1 = none."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "Bundle":
        """Move the model (e.g. to "cuda" for a GPU replica); predictions come back as NumPy."""
        self.model.to(device)
        return self

    @property
    def chunk_rows(self) -> int:
        """Rows per forward pass when `predict_arrays` is not told: INFERENCE_CHUNK_ELEMENTS input
        values (genomic 1,092 sequences, exercise 436 windows, ultrasound 64 images at 64×64)."""
        per_row = int(np.prod(self.meta["input_shape"]))
        return max(1, INFERENCE_CHUNK_ELEMENTS // per_row)

    @torch.inference_mode()
    def predict_arrays(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Calibrated class probabilities (N, K) float32 for already preprocessed inputs:
        softmax(logits / temperature), `batch_size` rows per forward pass (default `chunk_rows`)."""
        batch_size = batch_size or self.chunk_rows
        out = []
        device, temperature = self.device, self.temperature
        for i in range(0, len(x), batch_size):
            with warnings.catch_warnings():  # read-only input (Ray's zero-copy batches): only read here
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))
            xb = xb.to(device, non_blocking=True)
            out.append(torch.softmax(self.model(xb).float() / temperature, dim=1).cpu().numpy())
        if not out:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def predict(self, raw_inputs) -> np.ndarray:
        """Class probabilities for raw task inputs (feature rows, decoded images, sequences)."""
        return self.predict_arrays(self.preprocessor.transform(raw_inputs))


def load_bundle(path: str | os.PathLike) -> Bundle:
    path = Path(path)
    meta = read_meta(path)
    try:
        weights = (path / meta["weights"]["file"]).read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: cannot read weights: {e.strerror}") from None
    if _sha256(weights) != meta["weights"]["sha256"]:
        raise BundleError(f"{path}: weights do not match bundle.json (SHA-256 mismatch: corrupt or replaced file)")
    try:
        preprocessor = preprocessor_from_dict(meta["preprocessing"])
        model = build_model(meta["model"], meta["input_shape"], len(meta["labels"]))
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path}: weights do not fit the model in bundle.json: {str(e).splitlines()[0]}") from None
    model.eval()
    if meta["task"] in TASKS:  # classifiers (not the GAN's generator): batch norms folded away
        fuse_for_inference(model)
    return Bundle(path=path, meta=meta, model=model, preprocessor=preprocessor)
