"""Shared test setup: tiny CPU configs, one torch thread, fixture lookup, the `gpu` marker."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("AESERVE_FIXTURES", REPO.parent / "shared" / "fixtures" / "originals"))


def _cuda_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_usable():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is usable here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def fixture_dir(family: str) -> Path:
    """The original-code fixtures of one family; skips (naming the path) where they are absent."""
    path = FIXTURES / family
    if not path.is_dir():
        pytest.skip(f"conformance fixtures missing: {path} (expected ../shared/fixtures/originals beside the repo)")
    return path


def fixture_cases(family: str) -> list:
    """Case names of a family, for parametrize; where the fixtures are absent, one case that skips
    with a message naming the missing folder."""
    path = FIXTURES / family
    if not path.is_dir():
        reason = f"conformance fixtures missing: {path} (expected ../shared/fixtures/originals beside the repo)"
        return [pytest.param("fixtures-missing", marks=pytest.mark.skip(reason=reason))]
    return sorted(p.name[: -len(".json")] for p in path.glob("*.json"))


def wait_until_loaded(client: TestClient, timeout_s: float = 300.0) -> None:
    """Until /readyz answers 200 or no model is still loading (the service loads in the background)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        if response.status_code == 200 or "loading" not in response.json().get("models", {}).values():
            return
        time.sleep(0.1)
