"""The three model families: how each reads data, fits preprocessing and picks its preset.

A task ties a reader (`medray.data`) to its preprocessor (`medray.preprocessing`); training,
evaluation, prediction and serving all go through these, so the same input is read and
transformed the same way everywhere.
"""

from __future__ import annotations

import copy
from importlib import resources

import numpy as np
import yaml

from medray.data.dataset import BadItemsError, Dataset
from medray.data.exercise import read_exercise
from medray.data.genomic import read_genomic
from medray.data.ultrasound import read_ultrasound
from medray.errors import MedrayError
from medray.preprocessing import ImageNormalizer, Moments, SequenceEncoder, StandardScaler

TASKS = ("exercise", "ultrasound", "genomic")  # classifiers
SERVED_TASKS = (*TASKS, "genomic-gan")  # what a bundle can be, and what serving deploys


def load_preset(task: str, model: str | None = None, overrides: dict | None = None) -> dict:
    """The preset of `model` (default: the task's best measured model) from presets/<task>.yaml, with
    `overrides` ({"params": {...}, "preprocessing": {...}, "train": {...}, "ensemble": N}) merged into its
    sections (model selection, `medray tune`)."""
    if task not in TASKS:
        raise MedrayError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    spec = yaml.safe_load(resources.files("medray.presets").joinpath(f"{task}.yaml").read_text())
    name = model or spec["default"]
    if name not in spec["models"]:
        raise MedrayError(f"model {name!r} is not available for {task} (choose from: {', '.join(spec['models'])})")
    preset = copy.deepcopy(spec["models"][name])
    preset["name"] = name
    for section, values in (overrides or {}).items():
        if section == "ensemble":
            preset["ensemble"] = int(values)
        elif section in ("params", "preprocessing", "train"):
            preset[section] = {**preset.get(section, {}), **values}
        else:
            raise MedrayError(f"overrides: unknown section {section!r} (params, preprocessing, train, ensemble)")
    return preset


def read_training_data(task: str, path: str, *, preset: dict, label_column=None, exclude=(),
                       skip_bad: bool = False) -> Dataset:
    """Training data. Unreadable items (images, rows, records) fail naming them, with a hint
    about `--skip-bad`; with `skip_bad` they are dropped and listed in `meta["skipped"]`."""
    try:
        if task == "exercise":
            return read_exercise(path, label_column=label_column, exclude=tuple(exclude), skip_bad=skip_bad)
        if task == "ultrasound":
            return read_ultrasound(path, size=preset["preprocessing"].get("size", 128), skip_bad=skip_bad)
        return read_genomic(path, skip_bad=skip_bad)
    except BadItemsError as e:
        raise e.with_skip_hint() from None


def fit_preprocessor(task: str, source, keys, train_idx: np.ndarray, preset: dict):
    """The task's preprocessor fitted on the training rows `train_idx` of a scanned key table
    (`medray.data.pipeline`): image moments and sequence lengths come with the scan; feature
    moments are aggregated on the cluster, one partial per block."""
    from medray.data.pipeline import fit_table_moments

    rows = keys.rows.iloc[train_idx]
    if task == "exercise":
        per_channel = preset["preprocessing"].get("per_channel", False)
        center = preset["preprocessing"].get("center_windows", False)
        moments = fit_table_moments(source, keys.keys[train_idx], per_channel, center)
        return StandardScaler.from_moments(moments, source.feature_names, per_channel, center)
    if task == "ultrasound":
        moments = Moments.merge(rows["_n"].to_numpy(), rows["_mean"].to_numpy(), rows["_m2"].to_numpy())
        return ImageNormalizer.from_moments(moments, size=preset["preprocessing"].get("size", 128))
    return SequenceEncoder(min(int(rows["_len"].max()), SequenceEncoder.MAX_LENGTH))


def read_for_model(task: str, path: str, preprocessor, *, label_column=None, require_labels=False,
                   skip_bad: bool = False) -> Dataset:
    """Read inference/evaluation data the way the bundle's preprocessor expects it (in this
    process: `medray.batch_inference` reads large or remote data on the cluster instead)."""
    if task == "exercise":
        return read_exercise(path, feature_names=preprocessor.feature_names, label_column=label_column,
                             require_labels=require_labels, skip_bad=skip_bad)
    if task == "ultrasound":
        return read_ultrasound(path, size=preprocessor.size, require_labels=require_labels, skip_bad=skip_bad)
    return read_genomic(path, require_labels=require_labels, skip_bad=skip_bad)


def encode_labels(labels: np.ndarray, names: list[str], source: str) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise MedrayError(f"{source}: labels {unknown[:5]} are not among the model's labels {names}")
    return np.array([index[v] for v in labels], dtype=np.int64)
