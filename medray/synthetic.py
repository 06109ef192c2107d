"""Synthetic data for the demo and quick start, written in the formats users bring.

- exercise: 6-axis IMU windows (50 Hz, 2 s) of periodic movements, one pattern per exercise, with
  per-subject tempo, amplitude, orientation and noise; CSV `ax_000..wz_099, subject, label`.
- ultrasound: speckled B-mode-like images (Rayleigh speckle, depth attenuation) with no lesion
  (normal), a smooth oval hypoechoic lesion (benign) or an irregular, spiculated one with
  posterior shadowing (malignant); PNG files in one folder per class.
- genomic: 60-bp DNA with class-specific motifs at the centre (EI: exon|GTAAGT donor, IE:
  pyrimidine tract + AG|exon acceptor, N: none), sampled around background composition; FASTA
  with `label=` headers and the same in CSV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CHANNELS = ("ax", "ay", "az", "wx", "wy", "wz")
EXERCISES = {  # name: (base frequency Hz, dominant accelerometer axis, dominant gyro axis, amplitude)
    "squat": (0.6, 2, 0, 0.8),
    "curl": (0.8, 0, 2, 0.6),
    "press": (0.7, 1, 1, 0.7),
    "lunge": (0.5, 2, 1, 0.9),
}


def exercise_table(n_subjects: int = 6, windows_per_class: int = 12, seed: int = 0, steps: int = 100, hz: float = 50.0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    t = np.arange(steps) / hz
    rows, subjects, labels = [], [], []
    for s in range(n_subjects):
        tempo = rng.uniform(0.8, 1.25)
        gain = rng.uniform(0.7, 1.3, size=6)
        tilt = rng.normal(0, 0.2, size=3)
        for name, (f, acc_axis, gyro_axis, amp) in EXERCISES.items():
            for _ in range(windows_per_class):
                phase = rng.uniform(0, 2 * np.pi)
                freq = f * tempo * rng.uniform(0.9, 1.1)
                x = rng.normal(0, 0.05, size=(6, steps))
                x[:3] += np.array([0.0, 0.0, -1.0])[:, None] + tilt[:, None]  # gravity, subject-specific wrist tilt
                wave = np.sin(2 * np.pi * freq * t + phase)
                x[acc_axis] += amp * wave
                x[(acc_axis + 1) % 3] += 0.3 * amp * np.sin(4 * np.pi * freq * t + phase)
                x[3 + gyro_axis] += 2.0 * amp * np.cos(2 * np.pi * freq * t + phase)
                x *= gain[:, None]
                rows.append(x.reshape(-1))
                subjects.append(f"S{s + 1:02d}")
                labels.append(name)
    cols = [f"{c}_{i:03d}" for c in CHANNELS for i in range(steps)]
    df = pd.DataFrame(np.round(np.array(rows), 5), columns=cols)
    df["subject"] = subjects
    df["label"] = labels
    return df


def ultrasound_image(kind: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    tissue = 0.55 + 0.15 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy + rng.uniform(0, 6))
    tissue *= np.exp(-1.2 * yy)  # depth attenuation
    tissue += 0.25 * (np.abs(yy - rng.uniform(0.15, 0.3)) < 0.02)  # a bright fascia line
    if kind != "normal":
        cy, cx = rng.uniform(0.4, 0.65), rng.uniform(0.35, 0.65)
        ry, rx = rng.uniform(0.08, 0.14), rng.uniform(0.12, 0.2)
        ang = np.arctan2(yy - cy, xx - cx)
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        if kind == "malignant":  # irregular, spiculated margin; taller than wide; posterior shadow
            ry, rx = rx, ry
            r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
            edge = 1 + 0.25 * np.sin(rng.integers(5, 9) * ang + rng.uniform(0, 6)) + 0.12 * np.sin(17 * ang)
            inside = r < edge
            tissue = np.where(inside, 0.12, tissue)
            shadow = (yy > cy) & (np.abs(xx - cx) < rx * 0.8) & ~inside
            tissue = np.where(shadow, tissue * 0.45, tissue)
        else:  # benign: smooth oval, wider than tall, posterior enhancement
            inside = r < 1
            tissue = np.where(inside, 0.18, tissue)
            enh = (yy > cy + ry) & (np.abs(xx - cx) < rx * 0.7)
            tissue = np.where(enh, np.minimum(tissue * 1.4, 1.0), tissue)
    speckle = rng.rayleigh(scale=0.8, size=(size, size))
    img = np.clip(tissue * speckle * 255, 0, 255)
    return img.astype(np.uint8)


def dna_sequence(kind: str, rng: np.random.Generator, length: int = 60) -> str:
    seq = rng.choice(list("ACGT"), size=length, p=[0.27, 0.23, 0.23, 0.27])
    mid = length // 2
    if kind == "EI":  # exon | GTRAGT donor
        donor = list("CAG") + ["G", "T", rng.choice(["A", "G"]), "A", "G", "T"]
        seq[mid - 3 : mid + 6] = donor
    elif kind == "IE":  # polypyrimidine tract, NCAG | exon acceptor
        seq[mid - 14 : mid - 4] = rng.choice(["C", "T"], size=10)
        seq[mid - 4 : mid + 1] = list(rng.choice(["C", "T"]) + "CAGG")
    return "".join(seq)


def write_demo_data(root: str | Path, seed: int = 0, scale: float = 1.0) -> dict:
    """Write train and held-out test sets for all three tasks under `root`; returns their paths."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    paths = {}
    # exercise: held-out subjects for the test file
    n_subj = 6
    df = exercise_table(n_subjects=n_subj + 2, windows_per_class=max(4, int(12 * scale)), seed=seed)
    test_subjects = {f"S{n_subj + 1:02d}", f"S{n_subj + 2:02d}"}
    (root / "exercise").mkdir(parents=True, exist_ok=True)
    df[~df.subject.isin(test_subjects)].to_csv(root / "exercise" / "train.csv", index=False)
    df[df.subject.isin(test_subjects)].to_csv(root / "exercise" / "test.csv", index=False)
    paths["exercise"] = (root / "exercise" / "train.csv", root / "exercise" / "test.csv")
    # ultrasound: class folders
    per_class = max(10, int(50 * scale))
    for split, n in (("train", per_class), ("test", max(6, per_class // 3))):
        for kind in ("normal", "benign", "malignant"):
            d = root / "ultrasound" / split / kind
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(ultrasound_image(kind, rng)).save(d / f"{kind}_{i:04d}.png")
    paths["ultrasound"] = (root / "ultrasound" / "train", root / "ultrasound" / "test")
    # genomic: FASTA
    per_class = max(30, int(300 * scale))
    (root / "genomic").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class), ("test", max(15, per_class // 3))):
        with open(root / "genomic" / f"{split}.fasta", "w") as f:
            for kind in ("EI", "IE", "N"):
                for i in range(n):
                    f.write(f">{split}-{kind}-{i} label={kind}\n{dna_sequence(kind, rng)}\n")
    paths["genomic"] = (root / "genomic" / "train.fasta", root / "genomic" / "test.fasta")
    return paths
