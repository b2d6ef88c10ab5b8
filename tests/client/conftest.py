"""Fixtures of the client tests: the tiny model store (tests.app.tiny_store) and real service processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.service_process import Service, running_service


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="the tiny store is exported from torch modules")
    from tests.app.tiny_store import build_store

    root = tmp_path_factory.mktemp("client_store")
    build_store(root)
    return root


def ready_service(store: Path, tmp_path: Path, env: dict[str, str], prelude: str = "") -> Iterator[Service]:
    """A uvicorn process over `store` with `env`, yielded once /readyz answers 200."""
    with running_service(store, tmp_path, env={"AESERVE_LOG_LEVEL": "WARNING", **env}, prelude=prelude) as service:
        service.wait_until(lambda: httpx.get(f"{service.base_url}/readyz", timeout=2).status_code == 200,
                           what="/readyz")
        yield service


@pytest.fixture(scope="module")
def service(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """tiny-ae, tiny-render and tiny-dyn; at most 32 frames per request, engine batches of 8."""
    env = {"AESERVE_MODELS": "tiny-ae,tiny-render,tiny-dyn", "AESERVE_MAX_FRAMES": "32", "AESERVE_MAX_BATCH_SIZE": "8"}
    yield from ready_service(store, tmp_path_factory.mktemp("client_service"), env)
