"""Shared fixtures: the real datasets in ../shared/data, one local Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDRAY_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(*parts) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real dataset {p} not present (CI has ../shared/data beside the checkout)")
    return p


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (8 logical CPUs: see medray.ray_runtime)."""
    from medray.ray_runtime import ensure_ray

    ray = ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-storage")
