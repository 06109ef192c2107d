"""`medray demo` end to end (quick mode): synthetic data in users' formats → three bundles."""

from __future__ import annotations

import pytest

from medray.bundle import load_bundle
from medray.demo import run_demo

pytestmark = pytest.mark.ray


def test_demo_quick_trains_and_evaluates_all_three(ray_session, tmp_path):
    rows = run_demo(str(tmp_path), workers=2, quick=True)
    assert [r["task"] for r in rows] == ["exercise", "ultrasound", "genomic"]
    for r in rows:
        bundle = load_bundle(tmp_path / "bundles" / r["task"])
        assert bundle.meta["training"]["workers"] == 2
        assert r["test_n"] > 0
    # the exercise default is an ensemble of 3, trained as one Ray Train job; quick mode trains one ultrasound model
    assert load_bundle(tmp_path / "bundles" / "exercise").meta["model"]["params"]["members"] == 3
    assert load_bundle(tmp_path / "bundles" / "ultrasound").meta["model"]["name"] != "ensemble"
    gan = load_bundle(tmp_path / "bundles" / "genomic-gan")
    assert gan.task == "genomic-gan" and gan.labels == ["EI", "IE", "N"]
    # files written in the formats users bring
    assert (tmp_path / "data" / "exercise" / "train.csv").read_text().startswith("ax_000,")
    assert (tmp_path / "data" / "genomic" / "train.fasta").read_text().startswith(">train-EI-0 label=EI")
    assert sorted(p.name for p in (tmp_path / "data" / "ultrasound" / "train").iterdir()) == ["benign", "malignant", "normal"]
    # the planted structure is learnable: held-out accuracy well above chance
    by_task = {r["task"]: r for r in rows}
    assert by_task["exercise"]["test_accuracy"] > 0.5  # 4 classes, held-out subjects
    assert by_task["genomic"]["test_accuracy"] > 0.6  # 3 classes
    # serve/config.yaml's paths are the demo's (`make demo` then `serve run serve/config.yaml`), token included
    from serve.app import build_app, default_config

    args = default_config()["applications"][0]["args"]
    here = lambda p: str(tmp_path / p.removeprefix(".medray-demo/"))  # noqa: E731
    assert all(p.startswith(".medray-demo/") for p in [*args["bundles"].values(), args["auth"]["tokens_file"]])
    for p in args["bundles"].values():
        assert load_bundle(here(p)).task in args["bundles"]
    build_app(dict(args, bundles={t: here(p) for t, p in args["bundles"].items()},
                   auth={"tokens_file": here(args["auth"]["tokens_file"])}))
