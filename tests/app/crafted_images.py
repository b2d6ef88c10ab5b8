"""Small uploads that declare large images: PNG/APNG built chunk by chunk, TIFFs built IFD by IFD.

Each is a few KB (or, for tens of thousands of TIFF pages, a few MB) but declares what a decoder
would allocate: the hostile-input and memory-budget tests send them.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import tifffile
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_scanlines(width: int, height: int, bytes_per_pixel: int = 1) -> bytes:
    """zlib stream of `height` unfiltered rows of zeros (compresses ~1000:1)."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + width * bytes_per_pixel)
    parts = [compressor.compress(row) for _ in range(height)]
    return b"".join(parts) + compressor.flush()


def png(width: int, height: int, colour: int = 0, bits: int = 8, frames: int | None = None,
        frame_data: bool = False) -> bytes:
    """A PNG of zeros; `frames` adds an acTL chunk declaring that many APNG frames (with `frame_data`,
    each frame really present as fcTL + fdAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    body = [PNG_MAGIC, chunk(b"IHDR", ihdr)]
    if colour == 3:
        body.append(chunk(b"PLTE", bytes(range(48))))
    if frames is not None:
        body.append(chunk(b"acTL", struct.pack(">II", frames, 0)))
    per_pixel = max(1, {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] * bits // 8)
    pixels = zero_scanlines(width, height, per_pixel)
    sequence = 0
    if frames is not None:
        body.append(chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 1, 10, 0, 0)))
        sequence += 1
    body.append(chunk(b"IDAT", pixels))
    for _ in range(1, frames or 1):
        if not frame_data:
            break
        body.append(chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 1, 10, 0, 0)))
        body.append(chunk(b"fdAT", struct.pack(">I", sequence + 1) + pixels))
        sequence += 2
    body.append(chunk(b"IEND", b""))
    return b"".join(body)


def _ifd(tags: list[tuple[int, int, int, int]], next_offset: int) -> bytes:
    """A classic little-endian IFD of (tag, type, count, value) entries with inline values."""
    entries = b"".join(struct.pack("<HHII", *tag) for tag in sorted(tags))
    return struct.pack("<H", len(tags)) + entries + struct.pack("<I", next_offset)


def _gray_tags(width: int, height: int, strip_offset: int, strip_bytes: int, bits: int = 8) -> list:
    short, long_ = 3, 4
    return [
        (256, long_, 1, width), (257, long_, 1, height), (258, short, 1, bits), (259, short, 1, 1),
        (262, short, 1, 1), (273, long_, 1, strip_offset), (278, long_, 1, height), (279, long_, 1, strip_bytes),
    ]


def tiff_pages(pages: int) -> bytes:
    """A valid TIFF of `pages` 1x1 pages that all share one byte of pixel data."""
    ifd_size = 2 + 8 * 12 + 4
    pixel_at = 8
    first = 9
    ifds = [
        _ifd(_gray_tags(1, 1, pixel_at, 1), first + (i + 1) * ifd_size if i + 1 < pages else 0)
        for i in range(pages)
    ]
    return b"II*\x00" + struct.pack("<I", first) + b"\x00" + b"".join(ifds)


def tiff_looping() -> bytes:
    """Two IFDs pointing at each other."""
    ifd_size = 2 + 8 * 12 + 4
    first, second = 9, 9 + ifd_size
    return (b"II*\x00" + struct.pack("<I", first) + b"\x00" + _ifd(_gray_tags(1, 1, 8, 1), second)
            + _ifd(_gray_tags(1, 1, 8, 1), first))


def tiff_empty_strips(width: int, height: int, bits: int = 8) -> bytes:
    """One page of `height` x `width` whose single strip holds no bytes (a reader fills zeros)."""
    return b"II*\x00" + struct.pack("<I", 8) + _ifd(_gray_tags(width, height, 8, 0, bits), 0)


def tiff(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def png_of(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def npy_header_only(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    """An NPY header declaring `shape` with no data after it."""
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()
