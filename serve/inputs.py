"""HTTP request bodies → the raw inputs `Bundle.predict` takes, with every limit checked.

Parsing and validation happen here, in the ingress, before anything reaches a model replica;
the model replicas only see well-formed arrays. Each problem raises `RequestError` with a
status code, a short error code and a detail naming what was wrong (the instance index, the
feature, the letter, the image). The readers of `medray.data` do the decoding, so an image or a
sequence is read exactly as `medray predict` reads it from a file.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np
import orjson

from medray.data.genomic import parse_fasta_text, validate_sequence
from medray.data.ultrasound import decode_image
from medray.errors import DataError


@dataclass(frozen=True)
class Limits:
    """Request limits; settings in serve/config.yaml (`args.limits`)."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_instances: int = 1024
    max_sequence_length: int = 10_000
    max_image_pixels: int = 40_000_000
    body_timeout_s: int = 30  # a body that trickles in slower than this gets 408 and frees its slot

    @classmethod
    def from_dict(cls, d: dict | None) -> "Limits":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown limit(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        out = cls(**{k: int(v) for k, v in d.items()})
        for k, v in vars(out).items():
            if v <= 0:
                raise ValueError(f"limit {k} must be positive, got {v}")
        return out


MAX_DETAIL_CHARS = 1000  # an error detail never echoes a request back at length


class RequestError(Exception):
    """A request that cannot be answered: `{"error": code, "detail": detail}` with `status` (and
    `headers`, e.g. Retry-After on a 503), on every route and protocol (serve/gateway.py)."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[: MAX_DETAIL_CHARS - 1] + "…"
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def show(value: object, limit: int = 40) -> str:
    """A short, safe rendering of a client's value for an error detail: containers by their size
    (a deeply nested one would exhaust the recursion limit in repr), the rest repr'd and cut."""
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'JSON object'} of {len(value)} item(s)"
    text = repr(value if not isinstance(value, str) else value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _names(keys, n: int = 5) -> list[str]:
    """The first `n` of a client's (sorted) keys, each cut short, for an error detail."""
    return [k if len(k) <= 40 else k[:39] + "…" for k in sorted(keys)[:n]]


def invalid(detail: str) -> RequestError:
    return RequestError(422, "invalid_input", detail)


def parse_json(body: bytes) -> object:
    if not body:
        raise RequestError(400, "empty_body", "request body is empty (JSON expected)")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        error = e
    try:  # NaN / Infinity are not JSON, but Python's json writes them: parse, then refuse by position
        return json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError(400, "invalid_json", f"request body is not valid JSON: {error}") from None


def instance_list(doc: object, key: str, limits: Limits) -> list:
    """`doc[key]` of a parsed JSON body: a non-empty list within `max_instances`, else the 4xx
    naming what is wrong. The first step of every JSON body's parsing (features, sequences, images)."""
    if not isinstance(doc, dict):
        raise invalid(f"expected a JSON object with {key!r}, got {type(doc).__name__}")
    if key not in doc:
        raise invalid(f"missing {key!r} (a list, one entry per instance); keys given: {_names(doc, 8)}")
    items = doc[key]
    if not isinstance(items, list):
        raise invalid(f"{key!r} must be a list, got {type(items).__name__}")
    check_count(len(items), key, limits)
    return items


def check_count(n: int, what: str, limits: Limits) -> None:
    if n == 0:
        raise invalid(f"{what!r} is empty: send at least one instance")
    if n > limits.max_instances:
        raise RequestError(413, "too_many_instances",
                           f"{n} {what} in one request; the limit is {limits.max_instances} (split the request)")


# --------------------------------------------------------------------------- exercise


def parse_features(body: bytes, feature_names: list[str], limits: Limits) -> np.ndarray:
    """`{"instances": [[f1, f2, …], …]}` or `[{name: value, …}, …]` → float32 (n, features)."""
    rows = instance_list(parse_json(body), "instances", limits)
    if all(isinstance(r, dict) for r in rows):
        rows = [_row_from_object(r, i, feature_names) for i, r in enumerate(rows)]
    return feature_rows(rows, feature_names, may_have_bools=b"true" in body or b"false" in body)


def feature_rows(rows: list, feature_names: list[str], may_have_bools: bool = True) -> np.ndarray:
    """Rows of JSON values (already counted against the limits) → float32 (n, features): each row a
    list of `len(feature_names)` numbers. `may_have_bools=False` skips the search for booleans
    (which numpy would take as numbers) when the body holds no `true`/`false`."""
    n_features = len(feature_names)
    for i, r in enumerate(rows):
        if not isinstance(r, list):
            raise invalid(f"instance {i}: expected a list of {n_features} numbers or an object keyed by feature "
                          f"name, got {type(r).__name__}")
        if len(r) != n_features:
            raise invalid(f"instance {i}: has {len(r)} features, the model expects {n_features}")
    try:
        x = np.array(rows)
    except (TypeError, ValueError, RecursionError):
        x = None
    # numbers only: numpy's own dtype says so, except for booleans mixed into numbers (promoted)
    numeric = x is not None and x.ndim == 2 and x.dtype.kind in "iuf"
    if not numeric or (may_have_bools and _has_non_number(rows)):
        i, j, v = _first_non_number(rows)
        raise invalid(f"instance {i}, feature {j} ({feature_names[j]!r}): {show(v)} is not a number")
    if x.dtype.kind != "f":  # integers: exact in float64 up to 2^53, and JSON integers beyond int64 never get here
        x = x.astype(np.float64)
    return feature_array(x, feature_names)


def feature_array(x: np.ndarray, feature_names: list[str]) -> np.ndarray:
    """A float (n, features) array → the model's float32 input, every value finite (and within
    float32's range): the last step of every feature input, whatever its encoding."""
    n_features = len(feature_names)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise invalid(f"instance 0: has {x.shape[-1] if x.ndim else 0} features, the model expects {n_features}")
    finite = np.isfinite(x)
    if not finite.all():
        i, j = map(int, np.argwhere(~finite)[0])
        raise invalid(f"instance {i}, feature {j} ({feature_names[j]!r}): {x[i, j]} is not a finite number")
    if x.dtype == np.float32:
        return x if x.flags.writeable else x.copy()
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    finite = np.isfinite(x32)
    if not finite.all():  # finite as a double, infinite as the model's float32
        i, j = map(int, np.argwhere(~finite)[0])
        raise invalid(f"instance {i}, feature {j} ({feature_names[j]!r}): {x[i, j]:g} is out of range "
                      f"(|value| must be below {float(np.finfo(np.float32).max):g})")
    return x32


def _row_from_object(obj: dict, i: int, feature_names: list[str]) -> list:
    missing = [f for f in feature_names if f not in obj]
    if missing:
        raise invalid(f"instance {i}: missing feature(s) {missing[:5]}" + (" …" if len(missing) > 5 else ""))
    extra = set(obj) - set(feature_names)
    if extra:
        raise invalid(f"instance {i}: unknown feature(s) {_names(extra)}" + (" …" if len(extra) > 5 else ""))
    return [obj[f] for f in feature_names]


def _has_non_number(rows: list) -> bool:
    for r in rows:
        for v in r:
            if type(v) not in (int, float):
                return True
    return False


def _first_non_number(rows: list):
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            if type(v) not in (int, float) or (type(v) is int and not -(2**63) <= v < 2**64):
                return i, j, v  # (integers beyond 64 bits make numpy fall back to objects)
    return 0, 0, "?"  # pragma: no cover - only called when one exists


# --------------------------------------------------------------------------- genomic


def parse_sequences(body: bytes, content_type: str, limits: Limits) -> tuple[list[str], list[str]]:
    """JSON `{"sequences": […]}` or a FASTA body → (ids, upper-cased sequences)."""
    if content_type in ("text/x-fasta", "text/plain", "application/x-fasta"):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise invalid(f"FASTA body is not UTF-8 text (byte {e.start})") from None
        try:
            ids, seqs, _ = parse_fasta_text(text, "FASTA body")
        except DataError as e:
            raise invalid(str(e)) from None
        except ValueError as e:  # anything else Biopython raises: still the client's input
            raise invalid(f"FASTA body: unreadable ({type(e).__name__})") from None
        check_count(len(seqs), "sequences", limits)
        _check_lengths(ids, seqs, limits)
        return ids, seqs
    seqs = sequence_list(instance_list(parse_json(body), "sequences", limits), limits)
    return [str(i) for i in range(len(seqs))], seqs


def sequence_list(items: list, limits: Limits) -> list[str]:
    """Sequences (str, or UTF-8 bytes from a binary tensor; already counted) → upper-cased, each
    checked letter by letter and against the length limit."""
    seqs = []
    for i, s in enumerate(items):
        if isinstance(s, bytes):
            try:
                s = s.decode("utf-8")
            except UnicodeDecodeError as e:
                raise invalid(f"sequence {i}: not UTF-8 text (byte {e.start})") from None
        if not isinstance(s, str):
            raise invalid(f"sequence {i}: expected a string of nucleotide letters, got {type(s).__name__}")
        try:
            seqs.append(validate_sequence(s, f"sequence {i}"))
        except DataError as e:
            raise invalid(str(e)) from None
    _check_lengths([str(i) for i in range(len(seqs))], seqs, limits)
    return seqs


def _check_lengths(ids: list[str], seqs: list[str], limits: Limits) -> None:
    for i, s in enumerate(seqs):
        if len(s) > limits.max_sequence_length:
            raise RequestError(413, "sequence_too_long",
                               f"sequence {i} ({show(ids[i])}) has {len(s)} bases; the limit is "
                               f"{limits.max_sequence_length}")


# --------------------------------------------------------------------------- ultrasound


def images_from_json(body: bytes, limits: Limits) -> list[tuple[str, bytes]]:
    """`{"images": ["<base64>", …]}` → [(name, bytes)]."""
    return image_list(instance_list(parse_json(body), "images", limits))


def image_list(items: list) -> list[tuple[str, bytes]]:
    """Base64 strings (or data URLs) → [(name, bytes)] for `decode_images`."""
    out = []
    for i, b64 in enumerate(items):
        if not isinstance(b64, str):
            raise invalid(f"image {i}: expected a base64 string, got {type(b64).__name__}")
        if b64.startswith("data:") and "," in b64:  # data URL
            b64 = b64.split(",", 1)[1]
        try:
            out.append((f"image {i}", base64.b64decode(b64, validate=True)))
        except (binascii.Error, ValueError):
            raise invalid(f"image {i}: not valid base64") from None
    return out


def decode_images(files: list[tuple[str, bytes]], size: int, limits: Limits) -> np.ndarray:
    """[(name, bytes)] → uint8 (n, size, size), decoded exactly as `medray predict` reads files."""
    check_count(len(files), "images", limits)
    out = np.empty((len(files), size, size), dtype=np.uint8)
    for i, (name, data) in enumerate(files):
        name = name if len(name) <= 80 else name[:79] + "…"  # a client's file name
        try:
            out[i] = decode_image(data, size, name=name, max_pixels=limits.max_image_pixels)
        except DataError as e:
            status = 413 if "limit" in str(e) else 422
            raise RequestError(status, "image_too_large" if status == 413 else "invalid_image", str(e)) from None
        except Exception as e:  # a decoder's own failure on hostile bytes is still the image's fault
            raise RequestError(422, "invalid_image", f"{name}: cannot decode the image ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
    return out


# --------------------------------------------------------------------------- genomic GAN


def parse_generate(body: bytes, labels: list[str], conditional: bool, limits: Limits) -> tuple[int, str | None, int]:
    """`{"n": …, "label": …, "seed": …}` → (n, label, seed), each checked."""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise invalid(f"expected a JSON object {{\"n\": …}}, got {type(doc).__name__}")
    unknown = set(doc) - {"n", "label", "seed"}
    if unknown:
        raise invalid(f"unknown field(s) {_names(unknown)} (known: n, label, seed)")
    n, label, seed = doc.get("n"), doc.get("label"), doc.get("seed", 0)
    if type(n) is not int:
        raise invalid(f"'n' must be an integer, got {show(n)}")
    if n < 1:
        raise invalid(f"'n' must be at least 1, got {n}")
    if n > limits.max_instances:
        raise RequestError(413, "too_many_instances", f"n={n} is over the limit of {limits.max_instances} per request")
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise invalid(f"'seed' must be an integer from 0 to 2^63-1, got {show(seed)}")
    if label is not None:
        if not conditional:
            raise invalid("this generator is unconditional: send no 'label'")
        if not isinstance(label, str) or label not in labels:
            raise invalid(f"unknown label {show(label)} (known: {', '.join(labels)})")
    return n, label, seed


# --------------------------------------------------------------------------- responses


def prediction_objects(probs: np.ndarray, labels: list[str]) -> list[dict]:
    """One `{"label", "probabilities"}` per row, in order."""
    best = probs.argmax(axis=1)
    rows = probs.tolist()
    return [{"label": labels[int(k)], "probabilities": dict(zip(labels, p))} for k, p in zip(best, rows)]

