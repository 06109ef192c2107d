"""Readers, encoders and preprocessing on real files; every bad input names file and problem."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import shared
from medray.data.exercise import read_exercise
from medray.data.genomic import read_genomic
from medray.data.ultrasound import decode_image, read_ultrasound
from medray.errors import DataError
from medray.preprocessing import ImageNormalizer, SequenceEncoder, StandardScaler, detect_layout, preprocessor_from_dict
from medray.split import resolve_groups, split_indices


def test_exercise_reader_real_windows():
    ds = read_exercise(str(shared("exercise", "exercise_windows.csv")))
    assert ds.inputs.shape == (1578, 600)
    assert ds.meta["label_column"] == "label"
    assert set(ds.labels) == {"ABD", "ER", "FEL", "IR", "PEN", "ROW", "TRAP"}
    assert detect_layout(ds.meta["feature_names"]) == {"channels": ["ax", "ay", "az", "wx", "wy", "wz"], "steps": 100}


def test_exercise_parquet_and_text_columns_are_not_features(tmp_path):
    df = pd.DataFrame({"f1": [1.0, 2.0, 3.0], "f2": [4, 5, 6], "subject": ["a", "b", "c"], "y": ["x", "z", "x"]})
    df.to_parquet(tmp_path / "t.parquet")
    ds = read_exercise(str(tmp_path / "t.parquet"))
    assert ds.meta["feature_names"] == ["f1", "f2"]
    assert ds.inputs.tolist() == [[1, 4], [2, 5], [3, 6]]


def test_exercise_missing_label_column(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,x\n")
    with pytest.raises(DataError, match=r"t\.csv: label column 'target' not found"):
        read_exercise(str(tmp_path / "t.csv"), label_column="target")


def test_exercise_non_numeric_feature_names_row_and_column(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,x\n3,oops,y\n5,6,x\n7,8,y\n")
    with pytest.raises(DataError, match=r"t\.csv: line 3, column 'b': non-numeric value 'oops'"):
        read_exercise(str(tmp_path / "t.csv"))


def test_exercise_missing_feature_at_inference(tmp_path):
    (tmp_path / "t.csv").write_text("a,label\n1,x\n")
    with pytest.raises(DataError, match="missing feature column"):
        read_exercise(str(tmp_path / "t.csv"), feature_names=["a", "b"], require_labels=False)


def test_empty_table(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,label\n")
    with pytest.raises(DataError, match="no rows"):
        read_exercise(str(tmp_path / "t.csv"))


def test_ultrasound_folder_and_manifest_agree():
    root = shared("ultrasound")
    a = read_ultrasound(str(root), size=64)
    b = read_ultrasound(str(root / "labels.csv"), size=64)
    assert len(a) == len(b) == 552
    order = np.argsort(b.ids)
    assert a.ids == sorted(b.ids)
    assert np.array_equal(a.inputs, b.inputs[order])
    assert set(a.labels) == {"benign", "malignant", "normal"}


def test_ultrasound_colour_jpeg_becomes_gray(tmp_path):
    rgb = np.zeros((50, 80, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg")
    img = decode_image((tmp_path / "c.jpg").read_bytes(), 32, "c.jpg")
    assert img.shape == (32, 32) and img.dtype == np.uint8 and 50 < img.mean() < 70


@pytest.mark.parametrize("content, message", [
    (b"this is not an image", "not an image file"),
    (b"", "empty file"),
])
def test_ultrasound_bad_files(tmp_path, content, message):
    (tmp_path / "benign").mkdir()
    (tmp_path / "normal").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "normal" / "ok.png")
    (tmp_path / "benign" / "bad.png").write_bytes(content)
    with pytest.raises(DataError, match=rf"benign/bad\.png: {message}"):
        read_ultrasound(str(tmp_path), size=16)


def test_ultrasound_truncated_png(tmp_path):
    src = shared("ultrasound", "benign", "benign_0002.png").read_bytes()
    with pytest.raises(DataError, match=r"cut\.png: corrupt or truncated"):
        decode_image(src[: len(src) // 2], 128, "cut.png")


def test_ultrasound_decompression_bomb():
    import io

    buf = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buf, format="PNG")  # 48 MP of zeros: a tiny file
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(DataError, match="over the 40000000"):
        decode_image(buf.getvalue(), 128, "bomb.png")


def test_dicom_is_read(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # ultrasound image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ramp = np.tile(np.arange(64, dtype=np.uint16) * 100, (64, 1))
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 64, 64, 1, 16, 16, 15
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = ramp.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    img = decode_image((tmp_path / "x.dcm").read_bytes(), 64, "x.dcm")
    assert img[0, 0] == 0 and img[0, -1] == 255 and np.all(np.diff(img[0].astype(int)) >= 0)


def test_genomic_fasta_and_csv_agree():
    a = read_genomic(str(shared("genomic", "splice.fasta")))
    b = read_genomic(str(shared("genomic", "splice.csv")))
    assert len(a) == len(b) == 2231
    assert a.ids == b.ids and a.inputs == b.inputs and list(a.labels) == list(b.labels)


def test_fasta_invalid_letter_names_record_and_position(tmp_path):
    (tmp_path / "x.fa").write_text(">r1 label=EI\nACGT\n>r2 label=N\nACGXT\n")
    with pytest.raises(DataError, match=r"x\.fa: record 2 \(r2\): invalid letter 'X' at position 4"):
        read_genomic(str(tmp_path / "x.fa"))


def test_fasta_missing_label_and_not_fasta(tmp_path):
    (tmp_path / "x.fa").write_text(">r1 label=EI\nACGT\n>r2\nACGT\n")
    with pytest.raises(DataError, match=r"record 2 \(r2\) has no 'label=' token"):
        read_genomic(str(tmp_path / "x.fa"))
    (tmp_path / "y.fa").write_text("ACGT\n")
    with pytest.raises(DataError, match="not FASTA"):
        read_genomic(str(tmp_path / "y.fa"))


def test_one_hot_iupac_mixtures_pad_and_crop():
    enc = SequenceEncoder(6)
    x = enc.transform(["ACGTNR"])[0]  # (4, 6) channels A C G T
    assert x[:, 0].tolist() == [1, 0, 0, 0] and x[:, 3].tolist() == [0, 0, 0, 1]
    assert x[:, 4].tolist() == [0.25] * 4 and x[:, 5].tolist() == [0.5, 0, 0.5, 0]
    padded = enc.transform(["AC"])[0]
    assert padded.sum(axis=0).tolist() == [0, 0, 1, 1, 0, 0]  # centred, zero padding
    cropped = SequenceEncoder(2).transform(["AACCGG"])[0]
    assert cropped.argmax(axis=0).tolist() == [1, 1]  # centre crop keeps CC


def test_real_iupac_sequences_encode_as_mixtures():
    ds = read_genomic(str(shared("genomic", "splice.csv")))
    ambiguous = [s for s in ds.inputs if set(s) - set("ACGT")]
    assert len(ambiguous) >= 10
    x = SequenceEncoder.fit(ds.inputs).transform(ambiguous)
    assert np.allclose(x.sum(axis=1), 1.0)  # every position is a distribution over bases


def test_preprocessors_fit_on_train_and_round_trip():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(50, 4)).astype(np.float32)
    sc = StandardScaler.fit(x, ["a", "b", "c", "d"])
    z = sc.transform(x)
    assert np.allclose(z.mean(0), 0, atol=1e-5) and np.allclose(z.std(0), 1, atol=1e-4)
    for p in (sc, ImageNormalizer.fit(rng.integers(0, 255, (3, 8, 8)), 8), SequenceEncoder(12)):
        q = preprocessor_from_dict(p.to_dict())
        assert q.to_dict() == p.to_dict()


def test_centred_windows_lose_each_sensor_offset_and_round_trip():
    rng = np.random.default_rng(0)
    names = [f"{c}_{t:03d}" for c in ("ax", "ay", "az", "wx", "wy", "wz") for t in range(20)]
    x = rng.normal(0, 1, size=(40, 120)).astype(np.float32)
    offsets = rng.normal(0, 5, size=(40, 6)).astype(np.float32)  # each window its own offset per sensor
    shifted = x + np.repeat(offsets, 20, axis=1)
    sc = StandardScaler.fit(shifted, names, per_channel=True, center_windows=True)
    z = sc.transform(shifted)
    assert np.allclose(z, sc.transform(x), atol=1e-5)  # the offsets are gone
    assert np.allclose(z.reshape(40, 6, 20).mean(axis=2), 0, atol=1e-5)
    assert np.allclose(z.reshape(40, 6, 20).transpose(1, 0, 2).reshape(6, -1).std(axis=1), 1, atol=1e-3)
    plain = StandardScaler.fit(shifted, names, per_channel=True)
    assert not np.allclose(plain.transform(shifted), plain.transform(x), atol=1e-2)  # without it they stay
    q = preprocessor_from_dict(sc.to_dict())
    assert q.center_windows and np.array_equal(q.transform(shifted), z)
    old = {k: v for k, v in plain.to_dict().items() if k != "center_windows"}  # a bundle from before
    assert not preprocessor_from_dict(old).center_windows
    # a plain feature table under the same preset: the option is left off (as per_channel is) and recorded off
    flat = StandardScaler.fit(x[:, :4], ["a", "b", "c", "d"], per_channel=True, center_windows=True)
    assert not flat.center_windows and not preprocessor_from_dict(flat.to_dict()).center_windows
    assert np.array_equal(flat.transform(x[:, :4]), StandardScaler.fit(x[:, :4], ["a", "b", "c", "d"]).transform(x[:, :4]))
    with pytest.raises(ValueError, match="center_windows needs channel-major time-series features"):
        preprocessor_from_dict({**flat.to_dict(), "center_windows": True})  # a hand-edited bundle


def test_grouped_split_keeps_groups_apart():
    ds = read_genomic(str(shared("genomic", "splice.csv")))
    groups = resolve_groups("id-prefix", ds)
    tr, va = split_indices(ds.labels, groups, 0.2, seed=0)
    assert not set(groups[tr]) & set(groups[va])
    assert 0.12 < len(va) / len(ds) < 0.3
    assert set(ds.labels[va]) == {"EI", "IE", "N"}


def test_group_side_file(tmp_path):
    ds = read_exercise(str(shared("exercise", "exercise_windows.csv")))
    groups = resolve_groups(f"{shared('exercise', 'exercise_windows_meta.csv')}:subject", ds)
    tr, va = split_indices(ds.labels, groups, 0.2, seed=0)
    assert not set(groups[tr]) & set(groups[va])
    with pytest.raises(DataError, match="group column 'nope' not found"):
        resolve_groups("nope", ds)


def test_missing_label_names_the_row(tmp_path):
    (tmp_path / "s.csv").write_text("sequence,label\nACGT,EI\nACGT,\n")
    with pytest.raises(DataError, match=r"s\.csv: line 3: missing label in column 'label'"):
        read_genomic(str(tmp_path / "s.csv"))


def test_data_uris_are_copied_once_to_a_local_cache(tmp_path, monkeypatch):
    from medray.data import location
    from medray.errors import DataError

    monkeypatch.setattr(location, "CACHE", tmp_path / "cache")
    src = tmp_path / "remote"
    (src / "benign").mkdir(parents=True)
    (src / "benign" / "a.png").write_bytes(b"png bytes")
    (src / "seqs.fasta").write_text(">s1 label=EI\nACGT\n")
    local = location.localize(f"file://{src / 'seqs.fasta'}")
    assert local != str(src / "seqs.fasta") and open(local).read() == ">s1 label=EI\nACGT\n"
    assert location.localize(f"file://{src / 'seqs.fasta'}") == local  # cached, not copied again
    folder = location.localize(f"file://{src}")
    assert open(f"{folder}/benign/a.png", "rb").read() == b"png bytes"
    assert location.localize(str(src / "seqs.fasta")) == str(src / "seqs.fasta")  # plain paths pass through
    with pytest.raises(DataError, match="no such file"):
        location.localize(f"file://{tmp_path / 'missing.csv'}")
    assert not list((tmp_path / "cache").glob("*/.partial-*"))


# ----------------------------------------------------------------------------- bad items: name them all, or skip them
def _png_bytes(seed: int, size: int = 24) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _image_folder(root):
    for k, cls in enumerate(["benign", "normal"]):
        (root / cls).mkdir()
        for j in range(3):
            (root / cls / f"ok{j}.png").write_bytes(_png_bytes(10 * k + j))
    (root / "benign" / "notes.png").write_bytes(b"this is not an image")
    (root / "normal" / "cut.png").write_bytes(_png_bytes(99)[:80])
    return root


def test_ultrasound_bad_images_are_all_named_or_skipped(tmp_path):
    from medray.tasks import read_training_data

    root = _image_folder(tmp_path)
    with pytest.raises(DataError, match=r"2 unreadable images: benign/notes\.png: not an image file \(.*\); "
                                        r"normal/cut\.png: corrupt or truncated image") as e:
        read_ultrasound(str(root), size=16)
    assert "--skip-bad" not in str(e.value)  # the readers serve inference too: the hint is training's
    with pytest.raises(DataError, match=r"cut\.png: corrupt.*; pass --skip-bad to train on the rest$"):
        read_training_data("ultrasound", str(root), preset={"preprocessing": {"size": 16}})

    ds = read_ultrasound(str(root), size=16, skip_bad=True)
    assert len(ds) == 6 and ds.inputs.shape == (6, 16, 16) and "notes.png" not in " ".join(ds.ids)
    assert list(ds.labels) == ["benign"] * 3 + ["normal"] * 3 and len(ds.table) == 6
    assert len(ds.meta["skipped"]) == 2 and ds.meta["skipped"][0].startswith("benign/notes.png: not an image")
    from medray.data.dataset import skipped_summary, skipped_warning

    assert skipped_summary(ds) == {"count": 2, "examples": ds.meta["skipped"]}
    assert "skipped 2 unreadable images: benign/notes.png" in skipped_warning(ds)


def test_ultrasound_manifest_missing_file_and_label(tmp_path):
    root = _image_folder(tmp_path)
    (root / "m.csv").write_text("path,label\nbenign/ok0.png,benign\nbenign/gone.png,benign\n"
                                "normal/ok0.png,\nnormal/ok1.png,normal\n")
    with pytest.raises(DataError, match=r"m\.csv: 2 unreadable images: line 3: .*benign/gone\.png: no such image "
                                        r"file; line 4: missing label"):
        read_ultrasound(str(root / "m.csv"), size=16)
    ds = read_ultrasound(str(root / "m.csv"), size=16, skip_bad=True)
    assert ds.ids == ["benign/ok0.png", "normal/ok1.png"] and list(ds.labels) == ["benign", "normal"]
    assert ds.meta["source_rows"] == [0, 3] and ds.take(np.array([1])).meta["source_rows"] == [3]


def test_exercise_malformed_rows_are_all_named_or_skipped(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,x\n3,oops,y\n5,6,x\n7,8,\n9,10,y\n")
    with pytest.raises(DataError, match=r"t\.csv: 2 unreadable rows: line 3, column 'b': non-numeric value 'oops'; "
                                        r"line 5: missing label in column 'label'"):
        read_exercise(str(tmp_path / "t.csv"))
    ds = read_exercise(str(tmp_path / "t.csv"), skip_bad=True)
    assert ds.inputs.tolist() == [[1, 2], [5, 6], [9, 10]] and list(ds.labels) == ["x", "x", "y"]
    assert ds.ids == ["0", "2", "4"] and len(ds.table) == 3
    assert ds.meta["skipped"] == ["line 3, column 'b': non-numeric value 'oops'",
                                  "line 5: missing label in column 'label'"]


def test_many_bad_rows_are_counted_beyond_the_first_five(tmp_path):
    rows = "".join(f"{i},{'x' if i % 2 else i},y{i % 2}\n" for i in range(20))
    (tmp_path / "t.csv").write_text("a,b,label\n" + rows)
    with pytest.raises(DataError, match=r"10 unreadable rows: line 3, .*line 11, column 'b': non-numeric value "
                                        r"'x'; … \(5 more\)$"):
        read_exercise(str(tmp_path / "t.csv"))
    assert len(read_exercise(str(tmp_path / "t.csv"), skip_bad=True)) == 10


def test_everything_bad_fails_even_when_skipping(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,\n3,4,\n")
    with pytest.raises(DataError, match=r"t\.csv: all 2 rows are unreadable: line 2: missing label"):
        read_exercise(str(tmp_path / "t.csv"), skip_bad=True)
    (tmp_path / "x.fa").write_text(">r1 label=EI\nACGXT\n")
    with pytest.raises(DataError, match=r"x\.fa: the only record is unreadable: record 1 \(r1\): invalid letter"):
        read_genomic(str(tmp_path / "x.fa"), skip_bad=True)


def test_fasta_bad_records_are_all_named_or_skipped(tmp_path):
    (tmp_path / "x.fa").write_text(">r1 label=EI\nACGT\n>r2 label=N\nACGXT\n>r3 label=IE\nGGCC\n"
                                   ">r4 label=N\n\n>r5\nACGT\n")
    with pytest.raises(DataError, match=r"x\.fa: 3 unreadable records: record 2 \(r2\): invalid letter 'X' at "
                                        r"position 4.*; record 4 \(r4\): empty sequence; record 5 \(r5\) has no "
                                        r"'label=' token"):
        read_genomic(str(tmp_path / "x.fa"))
    ds = read_genomic(str(tmp_path / "x.fa"), skip_bad=True)
    assert ds.ids == ["r1", "r3"] and ds.inputs == ["ACGT", "GGCC"] and list(ds.labels) == ["EI", "IE"]
    assert ds.table["id"].tolist() == ["r1", "r3"] and len(ds.meta["skipped"]) == 3


def test_genomic_csv_bad_rows_are_skipped(tmp_path):
    (tmp_path / "s.csv").write_text("id,sequence,label\na,ACGT,EI\nb,,N\nc,AC-GT,IE\nd,GGCC,N\ne,ACGT,\n")
    with pytest.raises(DataError, match=r"s\.csv: 3 unreadable rows: line 3: missing sequence; line 4: invalid "
                                        r"letter '-' at position 3.*; line 6: missing label"):
        read_genomic(str(tmp_path / "s.csv"))
    ds = read_genomic(str(tmp_path / "s.csv"), skip_bad=True)
    assert ds.ids == ["a", "d"] and ds.inputs == ["ACGT", "GGCC"] and list(ds.labels) == ["EI", "N"]


def test_cli_train_names_bad_records_before_training_and_writes_no_bundle(tmp_path, capsys):
    """The scan runs on the cluster (Ray Data), before any TorchTrainer starts."""
    from medray.cli import main

    (tmp_path / "x.fa").write_text(">r1 label=EI\nACGT\n>r2 label=N\nACGXT\n>r3 label=IE\nAC GT!\n")
    assert main(["train", "genomic", "--data", str(tmp_path / "x.fa"), "--out", str(tmp_path / "b")]) == 2
    lines = capsys.readouterr().err.splitlines()
    err = [line for line in lines if line.startswith("medray: error")]
    assert len(err) == 1, lines
    assert lines[-1].startswith("medray: Ray's own output for this run is in "), lines  # and where it went
    err = err[0]
    assert err.startswith("medray: error: ") and "2 unreadable records: record 2 (r2)" in err
    assert "record 3 (r3)" in err and "pass --skip-bad" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
    assert main(["train", "genomic", "--data", str(tmp_path / "x.fa"), "--out", str(tmp_path / "b"),
                 "--skip-bad"]) == 2  # what is left is a single class: a clear error, still before Ray
    assert "only one class ('EI')" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_job_specs_accept_skip_bad():
    from medray.errors import MedrayError
    from medray.jobs import load_spec

    assert load_spec({"task": "genomic", "data": "x.fa", "out": "b", "skip_bad": True})["skip_bad"] is True
    with pytest.raises(MedrayError, match="'skip_bad' must be bool"):
        load_spec({"task": "genomic", "data": "x.fa", "out": "b", "skip_bad": "yes"})


def test_group_side_file_stays_aligned_when_rows_are_skipped(tmp_path):
    from medray.data.exercise import read_exercise
    from medray.split import resolve_groups

    pd.DataFrame({"a": [1, 2, "x", 4, 5, 6], "label": list("ababab")}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"subject": [f"s{i}" for i in range(6)]}).to_csv(tmp_path / "m.csv", index=False)
    ds = read_exercise(str(tmp_path / "t.csv"), skip_bad=True)
    assert resolve_groups(f"{tmp_path / 'm.csv'}:subject", ds).tolist() == ["s0", "s1", "s3", "s4", "s5"]
    pd.DataFrame({"subject": ["s0", "s1"]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataError, match="row-aligned"):
        resolve_groups(f"{tmp_path / 'short.csv'}:subject", ds)


def test_multi_frame_dicom_bomb_is_refused_from_its_header():
    """Frames × rows × columns counts against the pixel limit before any frame is decoded (an
    RLE cine loop of ~1 MB would otherwise inflate to 10^9 float pixels)."""
    from test_hostile_input import dicom_rle_bomb

    with pytest.raises(DataError, match=r"1000 frame\(s\) of 1000x1000 pixels"):
        decode_image(dicom_rle_bomb(1000, 1000, 1000), 128, name="cine.dcm", max_pixels=40_000_000)


def test_fasta_non_ascii_letter_is_named_not_a_crash(tmp_path):
    p = tmp_path / "s.fasta"
    p.write_text(">a label=EI\nACGT\u2026A\n>b label=N\nACGT\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"record 1 \(a\): invalid letter '…' at position 5"):
        read_genomic(str(p))
    ds = read_genomic(str(p), skip_bad=True)
    assert ds.inputs == ["ACGT"] and len(ds.meta["skipped"]) == 1
