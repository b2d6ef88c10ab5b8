"""Every client mistake is a 4xx naming the field and the limit, counted by its reason."""

from __future__ import annotations

import numpy as np
import pytest

from tests.app.conftest import assert_error, npy_bytes

RNG = np.random.default_rng(1)


def images(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    return RNG.random((n, 1, h, w)).astype(np.float32)


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "field", "limit", "code"),
    [
        ("tiny-ae/encode", {"content": b"garbage bytes"}, 422, "file", "PNG, TIFF or NPY", None),
        (
            "tiny-ae/encode",
            {"content": npy_bytes(np.zeros((2, 2, 2, 3, 3), np.float32))},
            422,
            "file",
            ...,
            None,
        ),
        ("tiny-ae/encode", {"content": npy_bytes(images(17))}, 422, "file", 16, "too_many_frames"),
        (
            "tiny-ae/encode",
            {"content": npy_bytes(np.full((16, 16), np.inf, np.float32))},
            422,
            "file",
            "finite values",
            None,
        ),
        ("tiny-ae/encode", {"content": b"x" * 200_001}, 413, "body", 200_000, "payload_too_large"),
        (
            "tiny-ae/encode",
            {"content": b"{}", "headers": {"Content-Type": "application/json"}},
            415,
            "content-type",
            ...,
            None,
        ),
        (
            "tiny-ae/encode",
            {"content": npy_bytes(images(1)), "headers": {"Accept": "text/html"}},
            406,
            "Accept",
            ["application/json", "application/x-npy"],
            "not_acceptable",
        ),
        ("tiny-ae/encode", {"files": [("other", ("a.png", b"x", "image/png"))]}, 422, "files", ..., None),
        (
            "tiny-dyn/encode",
            {
                "files": [
                    ("files", ("a.npy", npy_bytes(images(1, 8, 8)), "x")),
                    ("files", ("b.npy", npy_bytes(images(1, 9, 9)), "x")),
                ]
            },
            422,
            "files",
            ...,
            None,
        ),
        ("tiny-render/decode?bit_depth=16", {}, 422, "bit_depth", [8], None),
        (
            "tiny-dyn/reconstruct",
            {"content": npy_bytes(images(1, 12, 12))},
            422,
            "file",
            "16x16",
            "wrong_image_size",
        ),
        (
            "tiny-ae/decode",
            {"json": {"latents": [[1.0, 2.0]]}},
            422,
            "latents",
            "(N, 8)",
            "wrong_latent_shape",
        ),
        (
            "tiny-ae/decode",
            {
                "content": b'{"latents": [[NaN,0,0,0,0,0,0,0]]}',
                "headers": {"Content-Type": "application/json"},
            },
            422,
            "latents",
            "finite values",
            "non_finite",
        ),
        (
            "tiny-ae/decode",
            {"content": b"a,b", "headers": {"Content-Type": "text/csv"}},
            415,
            "content-type",
            ...,
            None,
        ),
        ("tiny-ae/reconstruct?format=gif", {"content": npy_bytes(images(1))}, 406, "format", ..., None),
        ("tiny-ae/reconstruct?bit_depth=12", {"content": npy_bytes(images(1))}, 422, "bit_depth", ..., None),
        (
            "tiny-dyn/decode",
            {"json": {"latents": [[0.0] * 4]}},
            404,
            "capability",
            ["encode", "reconstruct"],
            "capability_not_offered",
        ),
        ("tiny-dyn/sample", {"json": {}}, 404, "capability", ..., "capability_not_offered"),
        ("tiny-ae/sample", {"json": {"num_samples": 0}}, 422, "num_samples", 8, "num_samples_out_of_range"),
        ("tiny-ae/sample", {"json": {"num_samples": 9}}, 422, "num_samples", 8, "num_samples_out_of_range"),
        ("tiny-ae/sample", {"json": {"num_samples": 1, "steps": 5}}, 422, "steps", ..., None),
        ("tiny-ae/sample", {"json": {"num_samples": "many"}}, 422, "num_samples", ..., "invalid_request"),
        ("tiny-ae/sample", {"json": {"colour": 1}}, 422, "colour", ..., "invalid_request"),
        ("tiny-ae/sample", {"json": {"seed": -1}}, 422, "seed", 0, "invalid_request"),
        (
            "tiny-ddim/sample",
            {"json": {"steps": 101, "condition": [0, 0]}},
            422,
            "steps",
            100,
            "steps_out_of_range",
        ),
        ("tiny-ddim/sample", {"json": {"steps": 0, "condition": [0, 0]}}, 422, "steps", 100, None),
        ("tiny-ddim/sample", {"json": {"eta": 1.5, "condition": [0, 0]}}, 422, "eta", "[0, 1]", None),
        (
            "tiny-ddim/sample",
            {"json": {"condition": {"a": 1, "zzz": 2}}},
            422,
            "condition",
            ["a", "b"],
            "unknown_condition_keys",
        ),
        ("tiny-ddim/sample", {"json": {"condition": {"a": 1}}}, 422, "condition", ["a", "b"], None),
        (
            "tiny-ddim/sample",
            {"json": {"condition": [1, 2, 3]}},
            422,
            "condition",
            ...,
            "wrong_condition_shape",
        ),
        ("tiny-ddim/sample", {"json": {}}, 422, "condition", ["a", "b"], None),
    ],
)
def test_client_mistakes_are_4xx_with_field_and_limit(client, path, kwargs, status, field, limit, code):
    response = client.post(f"/v1/models/{path}", **kwargs)
    assert_error(response, status, field=field, limit=limit, code=code)


def test_failures_are_counted_by_reason(client):
    before = client.get("/metrics").text
    client.post("/v1/models/tiny-ae/decode", json={"latents": [[1.0]]})
    after = client.get("/metrics").text
    line = 'aeserve_failures_total{model="tiny-ae",op="decode",reason="invalid_input",version="10"}'

    def value(text: str) -> float:
        for row in text.splitlines():
            if row.startswith(line):
                return float(row.split()[-1])
        return 0.0

    assert value(after) == value(before) + 1
    assert 'aeserve_requests_total{model="tiny-ae",op="decode",status="422",version="10"}' in after


def test_unknown_route_and_method_use_the_error_shape(bare_client):
    assert_error(bare_client.get("/v2/nothing"), 404)
    assert_error(bare_client.get("/v1/models/tiny-ae/encode"), 405)
    assert_error(bare_client.post("/v1/models/tiny-ae/encode", content=b""), 404, field="name", limit=[])
