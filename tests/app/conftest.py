"""Fixtures of the service tests: the tiny model store (tests.app.tiny_store), settings and a client.

Building the store exports torch modules, so only the tests that use `store` (or `client`) need torch;
the rest of tests/app runs without it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.settings import Settings

_MODULES: dict[str, Any] = {}


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="the tiny store is exported from torch modules")
    from tests.app.tiny_store import build_store

    root = tmp_path_factory.mktemp("model_store")
    _MODULES.update(build_store(root))
    return root


@pytest.fixture(scope="session")
def tiny_ae_modules(store: Path) -> dict[str, Any]:
    """The eager torch modules behind tiny-ae version 10 (for expected values)."""
    return _MODULES


def make_settings(store: Path, **overrides) -> Settings:
    values = {
        "store": store,
        "max_batch_size": 8,
        "max_delay_ms": 5.0,
        "max_frames": 16,
        "max_num_samples": 8,
        "max_upload_bytes": 200_000,
        "request_timeout_s": 20.0,
        "load_in_background": False,  # in-process tests start serving once every model is loaded
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="session")
def client(store: Path):
    """One running service over the tiny store for the whole session (lifespan via the context manager)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(store))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def bare_client(tmp_path_factory: pytest.TempPathFactory):
    """A running service over an empty store: routing, errors and OpenAPI, without torch."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("empty_store")))) as test_client:
        yield test_client


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def assert_error(response, status: int, field: str | None = None, limit=..., code: str | None = None) -> dict:
    """The answer is `status` with the one error shape; `field`, `limit` and `code` as given (... = any)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field", "limit"}
    if field is not None:
        assert error["field"] == field
    if limit is not ...:
        assert error["limit"] == limit
    if code is not None:
        assert error["code"] == code
    return error
