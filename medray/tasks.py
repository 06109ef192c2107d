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
from medray.preprocessing import ImageNormalizer, SequenceEncoder, StandardScaler

TASKS = ("exercise", "ultrasound", "genomic")  # classifiers
SERVED_TASKS = (*TASKS, "genomic-gan")  # what a bundle can be, and what serving deploys


def load_preset(task: str, model: str | None = None) -> dict:
    """The preset of `model` (default: the task's best measured model) from presets/<task>.yaml."""
    if task not in TASKS:
        raise MedrayError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    spec = yaml.safe_load(resources.files("medray.presets").joinpath(f"{task}.yaml").read_text())
    name = model or spec["default"]
    if name not in spec["models"]:
        raise MedrayError(f"model {name!r} is not available for {task} (choose from: {', '.join(spec['models'])})")
    preset = copy.deepcopy(spec["models"][name])
    preset["name"] = name
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


def fit_preprocessor(task: str, train: Dataset, preset: dict):
    if task == "exercise":
        return StandardScaler.fit(train.inputs, train.meta["feature_names"], **preset["preprocessing"])
    if task == "ultrasound":
        return ImageNormalizer.fit(train.inputs, size=preset["preprocessing"].get("size", 128))
    return SequenceEncoder.fit(train.inputs)


def read_for_model(task: str, path: str, preprocessor, *, label_column=None, require_labels=False) -> Dataset:
    """Read inference/evaluation data the way the bundle's preprocessor expects it."""
    if task == "exercise":
        return read_exercise(path, feature_names=preprocessor.feature_names, label_column=label_column,
                             require_labels=require_labels)
    if task == "ultrasound":
        return read_ultrasound(path, size=preprocessor.size, require_labels=require_labels)
    return read_genomic(path, require_labels=require_labels)


def encode_labels(labels: np.ndarray, names: list[str], source: str) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise MedrayError(f"{source}: labels {unknown[:5]} are not among the model's labels {names}")
    return np.array([index[v] for v in labels], dtype=np.int64)
