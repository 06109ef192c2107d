"""Data readers shared by training, evaluation, prediction and serving.

Each reader returns a `Dataset`: raw inputs (not yet preprocessed), string labels (or None),
per-row ids, and the table the rows came from (for group columns).
"""

from medray.data.dataset import Dataset

__all__ = ["Dataset"]
