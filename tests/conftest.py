"""Shared data fixtures: the real Fashion-MNIST splits, prepared once per test session."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP (see training/__main__.py): spinning waiters collapse on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from training.data import DataError, FastFashionMNIST, ensure_fashion_mnist

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The Fashion-MNIST root ($FASHION_DATA or <repo>/data), filled from the Debian package if needed."""
    root = Path(os.environ.get("FASHION_DATA") or REPO_ROOT / "data")
    try:
        root, _ = ensure_fashion_mnist(root, download=False)
    except DataError as error:
        pytest.fail(f"the real data is needed for these tests: {error}")
    return root


@pytest.fixture(scope="session")
def train_set(data_root) -> FastFashionMNIST:
    return FastFashionMNIST(data_root, train=True)


@pytest.fixture(scope="session")
def test_set(data_root) -> FastFashionMNIST:
    return FastFashionMNIST(data_root, train=False)


# --------------------------------------------------------------------------- serving fixtures
# (testing/server.py starts the real gunicorn; these fixtures stop what they start.)

from testing.server import ServerHandle, start_server  # noqa: E402

BUNDLED_MODEL_DIR = REPO_ROOT / "models"


# Fixtures that start a real gunicorn; a test using one (directly or through another fixture) is
# marked "server", so `pytest -m "not server"` (make test-fast) runs the in-process tests only.
SERVER_FIXTURES = frozenset({"start_gunicorn", "bundled_server", "limited_server", "server"})


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The model shipped in models/ (fails, not skips: the repository must ship one)."""
    if not (BUNDLED_MODEL_DIR / "model.json").is_file():
        pytest.fail(f"no bundled model in {BUNDLED_MODEL_DIR}: run `make train` to create it")
    return BUNDLED_MODEL_DIR


@pytest.fixture
def start_gunicorn(tmp_path):
    """A function starting a real gunicorn (see testing.server.start_server); all are stopped afterwards."""
    started: list[ServerHandle] = []

    def start(model_dir, env=None, workers=1, **kwargs) -> ServerHandle:
        kwargs.setdefault("log_dir", tmp_path)
        handle = start_server(model_dir, env=env, workers=workers, **kwargs)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture(scope="session")
def bundled_server(bundled_model_dir, tmp_path_factory):
    """One gunicorn (2 workers) on the bundled model, shared by the tests that only read from it."""
    handle = start_server(bundled_model_dir, workers=2, log_dir=tmp_path_factory.mktemp("bundled-server"))
    yield handle
    handle.stop()
