from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medray.errors import DataError


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
            meta=_take_meta(self.meta, idx),
        )


def _take_meta(meta: dict, idx: np.ndarray) -> dict:
    meta = dict(meta)
    if "source_rows" in meta:  # positions in the source file, after skipped items were dropped
        meta["source_rows"] = [meta["source_rows"][i] for i in idx]
    return meta


SHOWN = 5  # bad items named in full in an error or warning


class BadItemsError(DataError):
    """Some items (rows, images, records) of a source are unreadable; `messages` names each one.

    Raised by the readers when they are not told to skip bad items; training adds a hint about
    `--skip-bad` (`medray.tasks.read_training_data`)."""

    def __init__(self, message: str, messages: list[str]):
        super().__init__(message)
        self.messages = messages

    def with_skip_hint(self, rest: str = "train on the rest") -> "BadItemsError":
        """The same error, telling the user how to go on without the bad items."""
        return BadItemsError(f"{self}; pass --skip-bad to {rest}", self.messages)


class BadItems:
    """Collects the per-item problems of one source, so a reader reports all of them at once
    (default) or drops those items (`skip=True`) instead of stopping at the first one.

    Readers call `add(index, message)` for each bad item (the message names the item and the
    problem, e.g. "line 3, column 'b': non-numeric value 'x'"; only the first problem of an item
    is kept), then `keep(total)`: the indices to keep, or BadItemsError naming the bad items.
    Everything bad is always an error, skip or not."""

    def __init__(self, source: str, unit: str, skip: bool = False):
        self.source, self.unit, self.skip = str(source), unit, skip
        self.items: dict[int, str] = {}

    def add(self, index: int, message: str) -> None:
        self.items.setdefault(int(index), message)

    def __contains__(self, index: int) -> bool:
        return int(index) in self.items

    def __len__(self) -> int:
        return len(self.items)

    @property
    def messages(self) -> list[str]:
        return [self.items[i] for i in sorted(self.items)]

    def _listing(self) -> str:
        msgs = self.messages
        more = f"; … ({len(msgs) - SHOWN} more)" if len(msgs) > SHOWN else ""
        return "; ".join(msgs[:SHOWN]) + more

    def keep(self, total: int) -> np.ndarray:
        """Indices (0..total-1) of the good items, in order; raises when an item is bad and not
        skipped, or when every item is bad."""
        n = len(self.items)
        if n == 0:
            return np.arange(total)
        if n == 1 and not self.skip:
            raise BadItemsError(f"{self.source}: {self.messages[0]}", self.messages)
        plural = f"{self.unit}s"
        if n >= total:
            every = f"all {total} {plural} are" if total > 1 else f"the only {self.unit} is"
            raise DataError(f"{self.source}: {every} unreadable: {self._listing()}")
        if not self.skip:
            raise BadItemsError(f"{self.source}: {n} unreadable {plural}: {self._listing()}", self.messages)
        return np.array([i for i in range(total) if i not in self.items], dtype=np.int64)

    def record(self, meta: dict, keep: np.ndarray) -> dict:
        """`meta` plus, when items were skipped, `skipped` (their messages), `skipped_unit` and
        `source_rows` (the position in the source of each item kept, for row-aligned side tables)."""
        if self.items:
            meta["skipped"] = self.messages
            meta["skipped_unit"] = self.unit
            meta["source_rows"] = [int(i) for i in keep]
        return meta


def skipped_summary(ds: Dataset) -> dict | None:
    """{"count", "examples"} of the items a reader skipped (for a bundle's meta), or None."""
    skipped = ds.meta.get("skipped") or []
    return {"count": len(skipped), "examples": skipped[:SHOWN]} if skipped else None


def skipped_warning(ds: Dataset) -> str | None:
    """One line saying how many items were skipped and naming the first few, or None."""
    skipped = ds.meta.get("skipped") or []
    if not skipped:
        return None
    unit = ds.meta.get("skipped_unit", "item")
    more = f"; … ({len(skipped) - SHOWN} more)" if len(skipped) > SHOWN else ""
    return (f"warning: {ds.source}: skipped {len(skipped)} unreadable {unit}{'s' if len(skipped) > 1 else ''}: "
            + "; ".join(skipped[:SHOWN]) + more)
