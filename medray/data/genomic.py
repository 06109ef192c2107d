"""DNA sequences from FASTA (read with Biopython) or CSV `sequence,label` (optional `id`).

In FASTA the label is the `label=` token of the header: `>BABAPOE-DONOR-30 label=EI`.
Letters are the IUPAC nucleotide codes (case-insensitive, U read as T); anything else is an
error naming the record, the position and the letter.
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pandas as pd
from Bio import SeqIO

from medray.data.dataset import BadItems, Dataset
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


def sequence_problem(s: str) -> str | None:
    """What is wrong with an upper-cased, stripped sequence (None when it is valid)."""
    if not s:
        return "empty sequence"
    m = _VALID.match(s)
    if m.end() != len(s):
        bad = s[m.end()]
        shown = repr(bad) if bad.isprintable() else f"byte 0x{ord(bad):02x}"
        return f"invalid letter {shown} at position {m.end() + 1} (IUPAC nucleotide codes expected)"
    return None


def validate_sequence(seq: str, name: str) -> str:
    """Upper-cased sequence, or DataError naming the first letter that is no nucleotide code."""
    s = seq.strip().upper()
    problem = sequence_problem(s)
    if problem:
        raise DataError(f"{name}: {problem}")
    return s


def sequence_hash(seq: str) -> str:
    """A short content hash of a sequence (memorisation checks, data fingerprints)."""
    return hashlib.sha256(seq.encode()).hexdigest()[:20]


def record_sequence(rec) -> tuple[str, str | None]:
    """(upper-cased sequence, problem or None) of a Biopython FASTA record."""
    try:
        seq = str(rec.seq)
    except UnicodeDecodeError as e:  # Biopython keeps sequences as ASCII bytes
        chars = bytes(e.object).decode("utf-8", "replace")
        pos = next(i for i, c in enumerate(chars) if ord(c) > 127)
        return "", f"invalid letter {chars[pos]!r} at position {pos + 1} (IUPAC nucleotide codes expected)"
    s = seq.strip().upper()
    return s, sequence_problem(s)


def record_label(rec) -> str | None:
    """The `label=` token of a FASTA record's header, or None."""
    m = _LABEL.search(rec.description)
    return m.group(1) if m else None


def parse_fasta_text(text: str, source: str = "FASTA", require_labels: bool = False):
    """(ids, sequences, labels or None) from FASTA text; shared by the file reader and serving.
    Every bad record (a letter that is no nucleotide code, an empty sequence, a missing `label=`
    when other records have one) is named in one DataError."""
    ids, seqs, labels, _ = _parse_fasta(text, BadItems(source, "record"), require_labels)
    return ids, seqs, labels


def _parse_fasta(text: str, bad: BadItems, require_labels: bool):
    """(ids, sequences, labels or None, indices of the records kept); bad records go to `bad`."""
    source = bad.source
    if not text.lstrip().startswith(">"):
        raise DataError(f"{source}: not FASTA (the first record must start with '>')")
    try:
        records = list(SeqIO.parse(io.StringIO(text), "fasta"))
    except ValueError as e:
        raise DataError(f"{source}: malformed FASTA: {e}") from None
    if not records:
        raise DataError(f"{source}: no FASTA records")
    ids, seqs, labels = [], [], []
    for k, rec in enumerate(records):
        seq, problem = record_sequence(rec)
        if problem:
            bad.add(k, f"record {k + 1} ({rec.id}): {problem}")
            seq = ""
        seqs.append(seq)
        ids.append(rec.id)
        labels.append(record_label(rec))
    missing = [i for i, lab in enumerate(labels) if lab is None]
    if missing and (require_labels or len(missing) < len(labels)):
        for i in missing:
            bad.add(i, f"record {i + 1} ({ids[i]}) has no 'label=' token in its header")
    keep = bad.keep(len(records))
    labels = None if any(labels[i] is None for i in keep) else np.array([labels[i] for i in keep], dtype=object)
    return [ids[i] for i in keep], [seqs[i] for i in keep], labels, keep


def read_genomic(path: str, *, require_labels: bool = True, skip_bad: bool = False) -> Dataset:
    """Sequences from FASTA or CSV. Every bad record/row (invalid letters, an empty or missing
    sequence, a missing label) is named in one error; with `skip_bad` those are dropped instead
    and listed in `meta["skipped"]`."""
    path = str(path)
    if is_table(path):
        df = read_table(path)
        if "sequence" not in df.columns:
            raise DataError(f"{path}: CSV needs a 'sequence' column (columns: {list(df.columns)[:8]})")
        if require_labels and "label" not in df.columns:
            raise DataError(f"{path}: CSV needs a 'label' column")
        bad = BadItems(path, "row", skip=skip_bad)
        seqs = []
        for i, s in enumerate(df["sequence"]):
            try:
                if not isinstance(s, str):
                    raise DataError(f"{row_name(path, i)}: missing sequence")
                seqs.append(validate_sequence(s, row_name(path, i)))
            except DataError as e:
                bad.add(i, str(e))
                seqs.append("")
        ids = df["id"].astype(str).tolist() if "id" in df.columns else [str(i) for i in range(len(df))]
        labels = label_values(df, "label", path, bad) if "label" in df.columns else None
        keep = bad.keep(len(df))
        return Dataset(source=path, inputs=[seqs[i] for i in keep], ids=[ids[i] for i in keep],
                       labels=None if labels is None else labels[keep],
                       table=df.iloc[keep].drop(columns=["sequence"]).reset_index(drop=True),
                       meta=bad.record({}, keep))
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    bad = BadItems(path, "record", skip=skip_bad)
    ids, seqs, labels, keep = _parse_fasta(text, bad, require_labels)
    return Dataset(source=path, inputs=seqs, ids=ids, labels=labels, table=pd.DataFrame({"id": ids}),
                   meta=bad.record({}, keep))
