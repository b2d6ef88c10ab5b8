"""app.api.negotiation: `?format=` wins over Accept; q-values order the ranges; refusals name the offer."""

from __future__ import annotations

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
