"""DNA sequences from FASTA (read with Biopython) or CSV `sequence,label` (optional `id`).

In FASTA the label is the `label=` token of the header: `>BABAPOE-DONOR-30 label=EI`.
Letters are the IUPAC nucleotide codes (case-insensitive, U read as T); anything else is an
error naming the record, the position and the letter.
"""

from __future__ import annotations

import io
import re

import numpy as np
from Bio import SeqIO

from medray.data.dataset import Dataset
from medray.data.tables import is_table, label_values, read_table, row_name
from medray.errors import DataError

# IUPAC nucleotide code -> the bases it stands for (one-hot mixes them equally).
IUPAC = {
    "A": "A", "C": "C", "G": "G", "T": "T", "U": "T",
    "R": "AG", "Y": "CT", "S": "CG", "W": "AT", "K": "GT", "M": "AC",
    "B": "CGT", "D": "AGT", "H": "ACT", "V": "ACG", "N": "ACGT",
}
BASES = "ACGT"
_VALID = re.compile(r"[ACGTURYSWKMBDHVN]*")
_LABEL = re.compile(r"(?:^|\s)label=(\S+)")


def validate_sequence(seq: str, name: str) -> str:
    """Upper-cased sequence, or DataError naming the first letter that is no nucleotide code."""
    s = seq.strip().upper()
    if not s:
        raise DataError(f"{name}: empty sequence")
    m = _VALID.match(s)
    if m.end() != len(s):
        bad = s[m.end()]
        shown = repr(bad) if bad.isprintable() else f"byte 0x{ord(bad):02x}"
        raise DataError(f"{name}: invalid letter {shown} at position {m.end() + 1} (IUPAC nucleotide codes expected)")
    return s


def parse_fasta_text(text: str, source: str = "FASTA", require_labels: bool = False):
    """(ids, sequences, labels or None) from FASTA text; shared by the file reader and serving."""
    if not text.lstrip().startswith(">"):
        raise DataError(f"{source}: not FASTA (the first record must start with '>')")
    ids, seqs, labels = [], [], []
    try:
        records = list(SeqIO.parse(io.StringIO(text), "fasta"))
    except ValueError as e:
        raise DataError(f"{source}: malformed FASTA: {e}") from None
    for k, rec in enumerate(records):
        name = f"{source}: record {k + 1} ({rec.id})"
        seqs.append(validate_sequence(str(rec.seq), name))
        ids.append(rec.id)
        m = _LABEL.search(rec.description)
        labels.append(m.group(1) if m else None)
    if not records:
        raise DataError(f"{source}: no FASTA records")
    missing = [i for i, lab in enumerate(labels) if lab is None]
    if missing and (require_labels or len(missing) < len(labels)):
        i = missing[0]
        raise DataError(f"{source}: record {i + 1} ({ids[i]}) has no 'label=' token in its header")
    return ids, seqs, (None if missing else np.array(labels, dtype=object))


def read_genomic(path: str, *, require_labels: bool = True) -> Dataset:
    path = str(path)
    if is_table(path):
        df = read_table(path)
        if "sequence" not in df.columns:
            raise DataError(f"{path}: CSV needs a 'sequence' column (columns: {list(df.columns)[:8]})")
        if require_labels and "label" not in df.columns:
            raise DataError(f"{path}: CSV needs a 'label' column")
        seqs = []
        for i, s in enumerate(df["sequence"]):
            if not isinstance(s, str):
                raise DataError(f"{path}: {row_name(path, i)}: missing sequence")
            seqs.append(validate_sequence(s, f"{path}: {row_name(path, i)}"))
        ids = df["id"].astype(str).tolist() if "id" in df.columns else [str(i) for i in range(len(df))]
        labels = label_values(df, "label", path) if "label" in df.columns else None
        return Dataset(source=path, inputs=seqs, ids=ids, labels=labels, table=df.drop(columns=["sequence"]))
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    ids, seqs, labels = parse_fasta_text(text, path, require_labels=require_labels)
    import pandas as pd

    return Dataset(source=path, inputs=seqs, ids=ids, labels=labels, table=pd.DataFrame({"id": ids}))
