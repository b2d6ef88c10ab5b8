"""app.api.negotiation: `?format=` wins over Accept; q-values order the ranges; refusals name the offer."""

from __future__ import annotations

import io

import pytest

from app.api.negotiation import negotiate
from app.errors import NotAcceptable


@pytest.mark.parametrize(
    ("accept", "fmt", "expected"),
    [
        (None, None, "png"),
        ("*/*", None, "png"),
        ("application/x-npy", None, "npy"),
        ("application/json;q=0.5, application/x-npy;q=0.9", None, "npy"),
        ("image/*", None, "png"),
        ("application/x-npy", "json", "json"),
        ("application/octet-stream", None, "npy"),
        ("image/png;q=0, application/json", None, "json"),
    ],
)
def test_negotiate(accept, fmt, expected):
    assert negotiate(accept, fmt, ("png", "npy", "json")) == expected


def test_negotiate_refuses_with_the_offer():
    with pytest.raises(NotAcceptable) as info:
        negotiate("text/html", None, ("png", "npy"))
    assert info.value.field == "Accept" and info.value.limit == ["image/png", "application/x-npy"]
    with pytest.raises(NotAcceptable) as info:
        negotiate(None, "gif", ("png",))
    assert info.value.field == "format"


# ----------------------------------------------------------------------------------------------- Vary, dtype
def test_vary_on_accept_is_added_once_after_the_names_already_there():
    from starlette.responses import Response

    from app.api.negotiation import vary_on_accept

    response = vary_on_accept(vary_on_accept(Response(b"", headers={"Vary": "Origin"})))
    assert response.headers.getlist("vary") == ["Origin, Accept"]
    assert vary_on_accept(Response(b"", headers={"Vary": "accept"})).headers.getlist("vary") == ["accept"]


def test_latent_dtype_defaults_to_float32_and_refuses_others_naming_the_allowed():
    from app.api.io import check_latent_dtype
    from app.errors import InvalidInput

    assert check_latent_dtype(None) == "float32" and check_latent_dtype("float16") == "float16"
    with pytest.raises(InvalidInput) as info:
        check_latent_dtype("int8")
    assert info.value.field == "dtype" and info.value.limit == ["float32", "float16"]


def frames(count: int):
    import numpy as np

    return np.random.default_rng(3).random((count, 1, 16, 16), dtype=np.float32)


def test_encode_answers_float16_latents_on_request_as_npy_and_json(client):
    import numpy as np

    from tests.app.conftest import npy_bytes

    body = npy_bytes(frames(5))
    url = "/v1/models/tiny-ae/encode"
    exact = np.load(io.BytesIO(client.post(f"{url}?format=npy", content=body).content))
    half = client.post(f"{url}?format=npy&dtype=float16", content=body)
    as_json = client.post(f"{url}?dtype=float16", content=body).json()
    default_json = client.post(url, content=body).json()
    assert exact.dtype == np.float32 and exact.shape == (5, 8)
    assert np.load(io.BytesIO(half.content)).dtype == np.float16
    np.testing.assert_array_equal(np.load(io.BytesIO(half.content)), exact.astype(np.float16))
    assert as_json["dtype"] == "float16" and as_json["shape"] == [5, 8] and default_json["dtype"] == "float32"
    np.testing.assert_array_equal(np.asarray(as_json["latents"], np.float16), exact.astype(np.float16))
    np.testing.assert_array_equal(np.asarray(default_json["latents"], np.float32), exact)
    assert len(npy_bytes(exact)) - len(half.content) == 2 * exact.size  # 2 bytes a value, not 4 (same header)


def test_a_bad_dtype_is_a_422_naming_it_before_the_body_is_read(client):
    from tests.app.conftest import assert_error, npy_bytes

    response = client.post("/v1/models/tiny-ae/encode?dtype=float64", content=npy_bytes(frames(1)))
    assert_error(response, 422, field="dtype", limit=["float32", "float16"])


@pytest.mark.parametrize(
    ("route", "accept"),
    [
        ("encode", "application/json"),
        ("encode", "application/x-npy"),
        ("reconstruct", "image/png"),
        ("reconstruct", "application/x-npy"),
        ("reconstruct", "application/json"),
    ],
)
def test_negotiated_answers_carry_vary_accept(client, route, accept):
    from tests.app.conftest import npy_bytes

    response = client.post(f"/v1/models/tiny-ae/{route}", content=npy_bytes(frames(2)), headers={"Accept": accept})
    assert response.status_code == 200 and response.headers["content-type"].startswith(accept)
    assert "Accept" in [v.strip() for v in response.headers["vary"].split(",")]


def test_decode_and_sample_answers_carry_vary_accept(client):
    decoded = client.post("/v1/models/tiny-ae/decode", json={"latents": [[0.1] * 8]})
    sampled = client.post("/v1/models/tiny-ae/sample?format=npy", json={"num_samples": 2, "seed": 0})
    assert decoded.status_code == sampled.status_code == 200
    assert decoded.headers["vary"] == sampled.headers["vary"] == "Accept"
