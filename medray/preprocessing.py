"""Preprocessing fitted on the training split only, stored in the bundle, replayed at inference.

Each preprocessor turns a task's raw inputs (see `medray.data`) into the float32 array the model
takes, and round-trips through `to_dict` / `preprocessor_from_dict` (plain JSON).
"""

from __future__ import annotations

import re

import numpy as np

from medray.data.genomic import BASES, IUPAC

_TIME_COLUMN = re.compile(r"^(.+?)_?(\d+)$")


def detect_layout(feature_names: list[str]) -> dict | None:
    """Channel-major time-series layout of flat features (`ax_000..ax_099, ay_000, …`), or None."""
    channels: list[str] = []
    steps: dict[str, list[int]] = {}
    for name in feature_names:
        m = _TIME_COLUMN.match(name)
        if not m:
            return None
        ch, t = m.group(1), int(m.group(2))
        if ch not in steps:
            if channels and channels[-1] != ch and ch in channels:
                return None
            channels.append(ch)
            steps[ch] = []
        elif channels[-1] != ch:
            return None
        steps[ch].append(t)
    lengths = {len(v) for v in steps.values()}
    if len(channels) < 1 or len(lengths) != 1 or lengths.pop() < 8:
        return None
    if any(v != sorted(v) for v in steps.values()):
        return None
    return {"channels": channels, "steps": len(steps[channels[0]])}


class Moments:
    """Count, mean and sum of squared deviations (M2) per column, mergeable across blocks (Chan et
    al.'s parallel update), so statistics fitted on the cluster, a block at a time, are the ones a
    single pass over all rows would give."""

    def __init__(self, n, mean, m2):
        self.n = float(n)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.m2 = np.asarray(m2, dtype=np.float64)

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        """Moments of the columns of a 2-D array."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        return cls(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    @classmethod
    def merge(cls, n, mean, m2) -> "Moments":
        """One Moments from many: arrays of counts (k,), means (k, d) and M2s (k, d)."""
        n = np.asarray(n, dtype=np.float64)
        mean = np.asarray(mean, dtype=np.float64).reshape(len(n), -1)
        m2 = np.asarray(m2, dtype=np.float64).reshape(len(n), -1)
        total = n.sum()
        if total == 0:
            return cls(0, np.zeros(mean.shape[1]), np.zeros(mean.shape[1]))
        mu = (n[:, None] * mean).sum(axis=0) / total
        return cls(total, mu, m2.sum(axis=0) + (n[:, None] * (mean - mu) ** 2).sum(axis=0))

    def to_row(self) -> dict:
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1.0))


class StandardScaler:
    """Feature standardisation (exercise). With `per_channel` and a time-series layout, one
    mean/std per sensor channel (shared over time steps); otherwise one per feature. With
    `center_windows` (time series only), each window's own mean over time is first subtracted from
    each of its channels (a sensor's offset: gravity's share on each accelerometer axis, which
    depends on how the watch sits on the arm), then the per-channel scaling applies. Like
    `per_channel`, a fit on features without a time-series layout leaves it off (and records it off),
    so one preset serves sensor windows and plain feature tables."""

    kind = "standard_scaler"

    def __init__(self, feature_names, mean, std, layout=None, per_channel=False, center_windows=False):
        self.feature_names = list(feature_names)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.layout = layout
        self.per_channel = bool(per_channel)
        self.center_windows = bool(center_windows)
        if self.center_windows and not layout:  # fits leave it off; only a hand-edited bundle gets here
            raise ValueError("center_windows needs channel-major time-series features (e.g. ax_000 … wz_099)")

    @staticmethod
    def centred(x: np.ndarray, layout: dict) -> np.ndarray:
        """Rows (n, channels × steps) with each window's per-channel mean over time subtracted."""
        c, t = len(layout["channels"]), layout["steps"]
        w = x.reshape(len(x), c, t)
        return (w - w.mean(axis=2, keepdims=True)).reshape(len(x), c * t)

    @staticmethod
    def moment_columns(x: np.ndarray, feature_names, per_channel=False, center_windows=False) -> np.ndarray:
        """The columns whose moments the scaler is fitted from: the features, or with
        `per_channel` and a time-series layout, one column per channel (all its time steps);
        with `center_windows`, of the centred windows."""
        layout = detect_layout(list(feature_names))
        x = np.asarray(x, dtype=np.float64)
        if center_windows and layout:
            x = StandardScaler.centred(x, layout)
        if per_channel and layout:
            c, t = len(layout["channels"]), layout["steps"]
            return x.reshape(len(x), c, t).transpose(0, 2, 1).reshape(-1, c)
        return x

    @classmethod
    def from_moments(cls, moments: Moments, feature_names, per_channel=False, center_windows=False):
        """The scaler fitted on rows whose `moment_columns` have `moments` (merged on the cluster)."""
        layout = detect_layout(list(feature_names))
        per_channel, center_windows = bool(per_channel and layout), bool(center_windows and layout)
        mean, std = moments.mean, moments.std
        if per_channel:
            mean, std = np.repeat(mean, layout["steps"]), np.repeat(std, layout["steps"])
        std = np.where(std < 1e-8, 1.0, std)
        return cls(feature_names, mean, std, layout, per_channel, center_windows)

    @classmethod
    def fit(cls, x: np.ndarray, feature_names, per_channel=False, center_windows=False):
        columns = cls.moment_columns(x, feature_names, per_channel, center_windows)
        return cls.from_moments(Moments.of(columns), feature_names, per_channel, center_windows)

    @property
    def input_shape(self) -> list[int]:
        if self.layout:
            return [len(self.layout["channels"]), self.layout["steps"]]
        return [len(self.feature_names)]

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"expected {len(self.feature_names)} features per row, got shape {x.shape}")
        if self.center_windows:
            x = self.centred(x, self.layout)
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "feature_names": self.feature_names,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "layout": self.layout,
            "per_channel": self.per_channel,
            "center_windows": self.center_windows,
        }


class ImageNormalizer:
    """Grayscale images resized to `size`×`size`, scaled to [0, 1], then (x - mean) / std."""

    kind = "image_normalizer"

    def __init__(self, size: int, mean: float, std: float):
        self.size, self.mean, self.std = int(size), float(mean), float(std)

    @staticmethod
    def moments(images: np.ndarray) -> Moments:
        """Per-image moments of the [0, 1] pixel values: (n images) rows of n, mean, M2."""
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0
        mean = x.mean(axis=1)
        return Moments(x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(axis=1))

    @classmethod
    def from_moments(cls, moments: Moments, size: int):
        return cls(size, float(moments.mean[0]), max(float(moments.std[0]), 1e-6))

    @classmethod
    def fit(cls, images: np.ndarray, size: int):
        m = cls.moments(images)
        return cls.from_moments(Moments.merge(np.full(len(images), m.n), m.mean, m.m2), size)

    @property
    def input_shape(self) -> list[int]:
        return [1, self.size, self.size]

    def transform(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected images of {self.size}x{self.size}, got shape {images.shape}")
        x = images.astype(np.float32) / 255.0
        return ((x - self.mean) / self.std)[:, None, :, :].astype(np.float32)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": self.size, "mean": self.mean, "std": self.std}


_ONE_HOT = np.zeros((256, 4), dtype=np.float32)
for _code, _bases in IUPAC.items():
    for _b in _bases:
        _ONE_HOT[ord(_code), BASES.index(_b)] = 1.0 / len(_bases)
        _ONE_HOT[ord(_code.lower()), BASES.index(_b)] = 1.0 / len(_bases)


class SequenceEncoder:
    """One-hot DNA (A, C, G, T channels; IUPAC codes as the mix of their bases), centred and
    padded with zeros or centre-cropped to the `length` fixed at training time."""

    kind = "sequence_encoder"
    MAX_LENGTH = 10_000

    def __init__(self, length: int):
        self.length = int(length)

    @classmethod
    def fit(cls, sequences: list[str], max_length: int = MAX_LENGTH):
        return cls(min(max(len(s) for s in sequences), max_length))

    @property
    def input_shape(self) -> list[int]:
        return [4, self.length]

    def encode_one(self, seq: str) -> np.ndarray:
        codes = np.frombuffer(seq.encode("ascii"), dtype=np.uint8)
        n, L = len(codes), self.length
        if n > L:
            start = (n - L) // 2
            codes = codes[start : start + L]
            n = L
        out = np.zeros((L, 4), dtype=np.float32)
        offset = (L - n) // 2
        out[offset : offset + n] = _ONE_HOT[codes]
        return out.T

    def transform(self, sequences: list[str]) -> np.ndarray:
        if sequences and all(len(s) == self.length for s in sequences):  # the common case, vectorised
            try:
                codes = np.frombuffer("".join(sequences).encode("ascii"), dtype=np.uint8)
                return np.ascontiguousarray(_ONE_HOT[codes.reshape(len(sequences), self.length)].transpose(0, 2, 1))
            except UnicodeEncodeError:
                pass  # encode_one below gives the same result for any input it accepts
        out = np.empty((len(sequences), 4, self.length), dtype=np.float32)
        for i, s in enumerate(sequences):
            out[i] = self.encode_one(s)
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "length": self.length}


def preprocessor_from_dict(d: dict):
    kind = d.get("kind")
    if kind == StandardScaler.kind:
        return StandardScaler(d["feature_names"], d["mean"], d["std"], d.get("layout"), d.get("per_channel", False),
                              d.get("center_windows", False))
    if kind == ImageNormalizer.kind:
        return ImageNormalizer(d["size"], d["mean"], d["std"])
    if kind == SequenceEncoder.kind:
        return SequenceEncoder(d["length"])
    raise ValueError(f"unknown preprocessor kind {kind!r}")
