"""Issue 8 (speed): a capability request without a query string skips FastAPI's dependency resolution
(`app.api.v1.CapabilityRoute`); it answers exactly as the resolved path does, errors included."""

from __future__ import annotations

import fastapi.routing
import numpy as np
import pytest

from tests.app.conftest import assert_error, npy_bytes

X = np.random.default_rng(3).random((2, 1, 16, 16), dtype=np.float32)
NPY = {"Accept": "application/x-npy"}


@pytest.fixture
def resolutions(monkeypatch) -> list[str]:
    """The paths of the requests FastAPI resolved dependencies for."""
    seen: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):
        seen.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return seen


@pytest.mark.parametrize("path", ["/v1/models/tiny-ae/encode", "/v1/models/tiny-ae/versions/10/encode"])
def test_a_request_without_a_query_skips_resolution_and_answers_the_same(client, resolutions, path) -> None:
    direct = client.post(path, content=npy_bytes(X), headers=NPY)
    resolved = client.post(f"{path}?format=npy", content=npy_bytes(X))
    assert resolutions == [path]  # only the request with a query went through FastAPI's resolution
    assert direct.status_code == resolved.status_code == 200
    assert direct.content == resolved.content
    for header in ("content-type", "x-model-version", "vary"):
        assert direct.headers[header] == resolved.headers[header]


def test_errors_are_the_same_on_both_paths(client, resolutions) -> None:
    for query in ("", "?format=npy"):
        assert_error(client.post(f"/v1/models/nope/encode{query}", content=npy_bytes(X)), 404)
        assert_error(client.post(f"/v1/models/tiny-ae/versions/99/encode{query}", content=npy_bytes(X)), 404)
        assert_error(client.post(f"/v1/models/tiny-ae/encode{query}", content=b"not an array"), 422)
    # a bad query value is refused by FastAPI's validation, naming the field
    bad = client.post("/v1/models/tiny-ae/decode?bit_depth=twelve", content=npy_bytes(np.zeros((1, 8), np.float32)))
    assert bad.status_code == 422 and "bit_depth" in bad.text
    assert len(resolutions) == 4  # the three queried requests and the bad one
