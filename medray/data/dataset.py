from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class Dataset:
    """Rows read from one source, before preprocessing.

    `inputs` is task specific: a float matrix (exercise), a uint8 image stack (ultrasound) or a
    list of sequences (genomic). `labels` are strings, or None when the source has none.
    `table` holds the source's tabular columns row-aligned with `inputs` (used for groups).
    """

    source: str
    inputs: Any
    ids: list[str]
    labels: np.ndarray | None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> "Dataset":
        idx = np.asarray(idx, dtype=np.int64)
        inputs = self.inputs[idx] if isinstance(self.inputs, np.ndarray) else [self.inputs[i] for i in idx]
        return Dataset(
            source=self.source,
            inputs=inputs,
            ids=[self.ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            table=self.table.iloc[idx].reset_index(drop=True) if len(self.table) else self.table,
            meta=dict(self.meta),
        )
