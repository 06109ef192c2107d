"""Bundles: round trip, atomic replacement, and refusal of corrupt or mismatched bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medray.bundle import load_bundle, write_bundle
from medray.errors import BundleError
from medray.models import build_model
from medray.preprocessing import StandardScaler


def _bundle(tmp_path, name="b", seed=0):
    torch.manual_seed(seed)
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    prep = StandardScaler.fit(x, [f"f{i}" for i in range(5)])
    arch = {"name": "mlp", "params": {"hidden": [8], "dropout": 0.0}}
    model = build_model(arch, prep.input_shape, 3)
    meta = {"task": "exercise", "model": arch, "preprocessing": prep.to_dict(), "labels": ["a", "b", "c"],
            "input_shape": prep.input_shape, "metrics": {}}
    return write_bundle(tmp_path / name, model.state_dict(), meta), model, prep, x


def test_round_trip_same_predictions_without_ray(tmp_path):
    path, model, prep, x = _bundle(tmp_path)
    b = load_bundle(path)
    model.eval()
    expected = torch.softmax(model(torch.from_numpy(prep.transform(x))), 1).detach().numpy()
    assert np.allclose(b.predict(x), expected, atol=1e-6)
    assert b.meta["versions"]["torch"] == torch.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directory left behind


def test_predictions_run_in_passes_of_chunk_rows_with_the_same_answers(tmp_path, monkeypatch):
    """`predict` runs INFERENCE_CHUNK_ELEMENTS input values per forward pass; the answers do not
    depend on how the rows are split."""
    import medray.bundle

    path, *_, x = _bundle(tmp_path)  # 20 rows of 5 features
    b = load_bundle(path)
    whole = b.predict_arrays(b.preprocessor.transform(x), batch_size=len(x))
    monkeypatch.setattr(medray.bundle, "INFERENCE_CHUNK_ELEMENTS", 5 * 7)
    assert b.chunk_rows == 7
    passes = []
    hook = b.model.register_forward_hook(lambda m, args, out: passes.append(len(args[0])))
    got = b.predict(x)
    hook.remove()
    assert passes == [7, 7, 6]
    assert np.allclose(got, whole, atol=1e-6)


def test_rewrite_replaces_atomically(tmp_path):
    path, *_ = _bundle(tmp_path)
    first = json.loads((path / "bundle.json").read_text())["weights"]["sha256"]
    path2, *_ = _bundle(tmp_path, seed=1)  # other weights, same target: replaced whole
    assert path2 == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert load_bundle(path).meta["weights"]["sha256"] != first  # the new weights, loadable


def test_refuses_to_overwrite_a_non_bundle_directory(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a medray bundle"):
        _bundle(tmp_path)
    assert (tmp_path / "b" / "precious.txt").read_text() == "keep me"


def test_corrupt_weights_are_refused(tmp_path):
    path, *_ = _bundle(tmp_path)
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256 mismatch"):
        load_bundle(path)


def test_mismatched_bundle_json_is_refused(tmp_path):
    path, *_ = _bundle(tmp_path)
    meta = json.loads((path / "bundle.json").read_text())
    meta["labels"] = ["a", "b"]  # the weights have 3 outputs
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not fit the model"):
        load_bundle(path)
    (path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt JSON"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nowhere")


def test_a_writer_killed_mid_write_leaves_the_previous_bundle_whole(tmp_path):
    """A process that dies while writing (os._exit between the weights and bundle.json: no
    cleanup runs) leaves the old bundle loadable at the same path; the next write succeeds."""
    import subprocess
    import sys
    import textwrap

    path, *_ = _bundle(tmp_path)
    before = load_bundle(path).meta["weights"]["sha256"]
    script = textwrap.dedent(f"""
        import os, sys
        sys.path[:0] = {sys.path!r}
        import medray.bundle as mb
        from test_bundle import _bundle
        from pathlib import Path
        calls = []
        real = os.fsync
        def dying_fsync(fd):
            calls.append(fd)
            real(fd)
            if len(calls) == 1:  # model.pt is on disk, bundle.json is not
                os._exit(9)
        mb.os.fsync = dying_fsync
        _bundle(Path({str(tmp_path)!r}), seed=1)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path))
    assert r.returncode == 9
    assert load_bundle(path).meta["weights"]["sha256"] == before  # the old bundle, whole
    assert any(p.name.startswith(".b.tmp-") for p in tmp_path.iterdir())  # the dead writer's temp dir
    path2, *_ = _bundle(tmp_path, seed=1)
    assert load_bundle(path2).meta["weights"]["sha256"] != before


def test_replacing_a_bundle_is_one_atomic_exchange_on_linux(tmp_path, monkeypatch):
    import sys

    import medray.bundle as mb

    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux-only; elsewhere two renames are used")
    path, *_ = _bundle(tmp_path)
    swaps = []
    real = mb.exchange_paths
    monkeypatch.setattr(mb, "exchange_paths", lambda a, b: swaps.append(real(a, b)) or swaps[-1])
    monkeypatch.setattr(mb.os, "rename", lambda *a: pytest.fail("rename used: a window without a bundle"))
    _bundle(tmp_path, seed=1)
    assert swaps == [True] and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_an_ensemble_bundle_predicts_the_mean_of_its_members(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(1).normal(size=(12, 5)).astype(np.float32)
    prep = StandardScaler.fit(x, [f"f{i}" for i in range(5)])
    member = {"name": "mlp", "params": {"hidden": [8], "dropout": 0.0}}
    arch = {"name": "ensemble", "params": {"members": 3, "member": member}}
    model = build_model(arch, prep.input_shape, 3).eval()
    meta = {"task": "exercise", "model": arch, "preprocessing": prep.to_dict(), "labels": ["a", "b", "c"],
            "input_shape": prep.input_shape, "metrics": {}}
    b = load_bundle(write_bundle(tmp_path / "e", model.state_dict(), meta))
    xt = torch.from_numpy(prep.transform(x))
    members = [torch.softmax(m(xt), 1).detach().numpy() for m in model.members]
    assert not np.allclose(members[0], members[1])  # different initial weights
    assert np.allclose(b.predict(x), np.mean(members, axis=0), atol=1e-6)
    assert model(xt, members=True).shape == (3, 12, 3)


@pytest.mark.parametrize("arch", [{"name": "cnn1d", "params": {}}, {"name": "poscnn", "params": {}},
                                  {"name": "convnet", "params": {}}])
def test_a_loaded_bundle_folds_batch_norms_into_its_convolutions_with_the_same_outputs(tmp_path, arch):
    torch.manual_seed(0)
    shape = [1, 32, 32] if arch["name"] == "convnet" else [4, 60]
    model = build_model(arch, shape, 3)
    with torch.no_grad():  # batch-norm statistics far from the identity, so folding them changes weights
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
    model.eval()
    n_bn = sum(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in model.modules())
    prep = StandardScaler.fit(np.zeros((2, int(np.prod(shape))), np.float32), [f"f{i}" for i in range(int(np.prod(shape)))])
    meta = {"task": "exercise", "model": arch, "preprocessing": prep.to_dict(), "labels": ["a", "b", "c"],
            "input_shape": shape, "metrics": {}}
    b = load_bundle(write_bundle(tmp_path / "c", model.state_dict(), meta))
    left = sum(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in b.model.modules())
    x = torch.randn(16, *shape)
    with torch.no_grad():
        assert torch.allclose(b.model(x), model(x), atol=1e-5)
    assert n_bn > 0 and left < n_bn


def _convnet_as_written_before(widths, n_classes):
    """ConvNet2d as bundles before 2026-12-07 were trained: NCHW, conv-BN-ReLU then max-pool."""
    layers, c = [], 1
    for w in widths:
        layers += [torch.nn.Conv2d(c, w, 3, padding=1, bias=False), torch.nn.BatchNorm2d(w), torch.nn.ReLU(),
                   torch.nn.MaxPool2d(2)]
        c = w
    net = torch.nn.Module()
    net.features = torch.nn.Sequential(*layers)
    net.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.0), torch.nn.Linear(c, n_classes))
    return net


def test_convnet_layout_changes_speed_not_results():
    """ConvNet2d runs channels-last with ReLU after the max-pool: the same outputs and gradients as
    the NCHW conv-BN-ReLU-pool network its bundles were trained as, under the same parameter names."""
    torch.manual_seed(0)
    widths = [8, 16, 32]
    model = build_model({"name": "convnet", "params": {"widths": widths, "dropout": 0.0}}, [1, 32, 32], 3)
    with torch.no_grad():  # BN far from the identity, some scales negative: pooling must come after it
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-2, 2), m.bias.uniform_(-1, 1)
    ref = _convnet_as_written_before(widths, 3)
    ref.load_state_dict(model.state_dict())  # strict: same names, so old bundles load unchanged
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(6, 1, 32, 32)
    for train in (True, False):
        model.train(train), ref.train(train)
        out, expect = model(x), ref.head(ref.features(x).mean(dim=(2, 3)))
        assert torch.allclose(out, expect, atol=1e-5)
        if train:
            out.square().sum().backward()
            expect.square().sum().backward()
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                assert torch.allclose(p.grad, q.grad, atol=1e-4), name
