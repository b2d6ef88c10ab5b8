"""Content negotiation: the response format from `?format=` or the `Accept` header; the answers it
chose carry `Vary: Accept` (a cache must not serve a PNG to a client that asked for NPY)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from starlette.responses import Response

from app.codecs import JSON_MEDIA_TYPE, NPY_MEDIA_TYPE, PNG_MEDIA_TYPE
from app.errors import NotAcceptable

FORMAT_MEDIA_TYPES = {"png": PNG_MEDIA_TYPE, "npy": NPY_MEDIA_TYPE, "json": JSON_MEDIA_TYPE}
ResponseT = TypeVar("ResponseT", bound=Response)


def vary_on_accept(response: ResponseT) -> ResponseT:
    """`response` with `Accept` in its `Vary` header (once, after any names already there)."""
    present = {name.strip().lower() for value in response.headers.getlist("vary") for name in value.split(",")}
    if "accept" not in present:
        response.headers.add_vary_header("Accept")
    return response


def _media_ranges(accept: str) -> list[str]:
    """The media ranges of an Accept header, best first (q=0 dropped; ties keep their order)."""
    ranges = []
    for position, part in enumerate(accept.split(",")):
        pieces = [p.strip() for p in part.split(";")]
        media = pieces[0].lower()
        quality = 1.0
        for param in pieces[1:]:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        if media and quality > 0:
            ranges.append((-quality, position, media))
    return [media for _, _, media in sorted(ranges)]


def negotiate(accept: str | None, format_param: str | None, offered: Sequence[str]) -> str:
    """Pick a response format from `?format=` (wins) or the Accept header; `offered[0]` is the default.

    Returns one of `offered` ("png" | "npy" | "json"); raises NotAcceptable naming what is offered.
    """
    if format_param:
        if format_param not in offered:
            raise NotAcceptable(
                f"format {format_param!r} is not offered here", field="format", limit=list(offered)
            )
        return format_param
    if not accept or not accept.strip():
        return offered[0]
    for media in _media_ranges(accept):
        if media in ("*/*", "*"):
            return offered[0]
        for fmt in offered:
            media_type = FORMAT_MEDIA_TYPES[fmt]
            if media == media_type or (media.endswith("/*") and media_type.startswith(media[:-1])):
                return fmt
            if fmt == "npy" and media == "application/octet-stream":
                return fmt
    raise NotAcceptable(
        f"cannot answer with {accept!r}", field="Accept", limit=[FORMAT_MEDIA_TYPES[f] for f in offered]
    )
