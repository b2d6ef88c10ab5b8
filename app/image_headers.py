"""What an uploaded image declares, read from its header alone: PNG IHDR/acTL, TIFF IFDs, NPY header.

Nothing here decodes pixel data, so a request can be sized (frames, pixels, bands, bytes per value and
what the decoder will allocate) and refused before any of it becomes an array. The TIFF page chain is
walked here, by hand, and the walk stops as soon as the frame limit is passed; tifffile then only
ever sees files with few pages and none of its vendor flavours (LSM, ScanImage, NDPI, ImageJ...),
whose openers read every page or trust counts the file declares. Every problem is an `InvalidInput`.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tifffile

from app.errors import InvalidInput

# tifffile logs every oddity of a file at ERROR: for client uploads those are the client's mistakes (a 422)
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

ACCEPTED_FORMATS = "PNG, TIFF or NPY"
VALUE_KINDS = "bool, unsigned/signed integer or real float"
_KINDS = frozenset("biuf")  # numpy dtype kinds an image or latent may hold
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAX_CHUNKS_BEFORE_IDAT = 1024
_PNG_BITS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_BANDS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}  # channels of a decoded frame (alpha dropped, palette -> RGB)
_PNG_STORED_BANDS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Decoder buffers, checked against peak RSS (tests/app/test_memory_budget.py): Pillow holds a frame in 4
# bytes/pixel at most; palette frames are converted to RGB(A) (+4), the numpy copy (up to 4) is joined from
# chunks (x2); an APNG keeps the previous canvas, a disposal copy and the frame being pasted (+12).
# tifffile reads the declared array and the file's bytes of it. Every upload: 1 MiB of bookkeeping.
_PILLOW_BYTES_PER_PIXEL = 4 + 4 + 2 * 4
_APNG_EXTRA_BYTES_PER_PIXEL = 3 * 4
_DECODER_OVERHEAD = 1 << 20
# TIFF compressions decoded here: none, and deflate (zlib inflates at most ~1032x its input)
TIFF_COMPRESSIONS = {1: "none", 8: "deflate", 32946: "deflate"}
_INFLATE_MAX_RATIO = 1032
# TIFF flavours read as plain page sequences: their openers read every page or trust the counts they declare
_TIFF_VENDOR_FLAVOURS = (
    "shaped", "lsm", "mmstack", "ome", "imagej", "ndtiff", "fluoview", "stk", "sis", "svs", "scn", "qpi",
    "ndpi", "bif", "avs", "eer", "philips", "scanimage", "nih", "mdgel", "uniform", "micromanager",
)
PLAIN_TIFF = {f"is_{name}": False for name in _TIFF_VENDOR_FLAVOURS if name in tifffile.TIFF.FILE_FLAGS}


@dataclass(frozen=True)
class ImageHeader:
    """The declared size of one upload: `frames` of (`bands`, `height`, `width`) values."""

    kind: Literal["png", "tiff", "npy"]
    frames: int
    height: int
    width: int
    bands: int  # channels of each decoded frame, before the model's conversion
    data_bytes: int  # the declared data: frames x pixels x stored bands x bytes per value
    decoder_bytes: int  # what the decoder allocates on top while it runs (buffers, copies, inflating)
    describe: str = ""  # e.g. "APNG 3x4096x4096 RGB 8-bit", for error messages

    @property
    def values(self) -> int:
        """Values of the decoded upload: frames x bands x height x width."""
        return self.frames * self.bands * self.height * self.width


def sniff_format(data: bytes) -> str:
    """'png' | 'tiff' | 'npy' | 'other' from the first bytes."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_NPY_MAGIC):
        return "npy"
    if data[:4] in _TIFF_MAGICS:
        return "tiff"
    return "other"


def read_header(data: bytes, field: str, max_frames: int, frames_before: int = 0) -> ImageHeader:
    """The header of a PNG / TIFF / NPY upload; 422 for anything else, or when its frames and the
    request's `frames_before` pass `max_frames`."""
    if not data:
        raise InvalidInput("empty image body", field=field, limit=f"{ACCEPTED_FORMATS} bytes")
    kind = sniff_format(data)
    if kind == "png":
        header = png_header(data, field)
    elif kind == "tiff":
        header = tiff_header(data, field, max_frames, frames_before)
    elif kind == "npy":
        header = npy_image_header(data, field)
    else:
        raise InvalidInput("cannot decode image: not PNG, TIFF or NPY", field=field, limit=ACCEPTED_FORMATS)
    if min(header.frames, header.height, header.width, header.bands) <= 0:
        raise InvalidInput(f"image has an empty axis: {header.describe}", field=field, limit="non-empty")
    check_frames(frames_before + header.frames, max_frames, field)
    return header


def check_frames(frames: int, max_frames: int, field: str) -> None:
    """422 (too_many_frames) past `max_frames`."""
    if frames > max_frames:
        raise InvalidInput(
            f"{frames} frames in one request", field=field, limit=max_frames, code="too_many_frames"
        )


def _corrupt(kind: str, what: str, field: str) -> InvalidInput:
    return InvalidInput(f"cannot decode {kind}: {what}", field=field, limit=ACCEPTED_FORMATS)


# ----------------------------------------------------------------------------------------------- PNG
def png_header(data: bytes, field: str) -> ImageHeader:
    """IHDR (size, bit depth, colour type) and acTL (APNG frame count), up to the first IDAT."""
    position, ihdr, frames, chunks = len(_PNG_MAGIC), None, 1, 0
    while True:
        if position + 8 > len(data):
            raise _corrupt("PNG", "truncated before its image data", field)
        length, chunk_type = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if length > 2**31 - 1 or len(body) < length:
            raise _corrupt("PNG", f"chunk {chunk_type!r} is truncated", field)
        if (chunks == 0) != (chunk_type == b"IHDR"):
            raise _corrupt("PNG", "IHDR is not the first chunk", field)
        if chunk_type == b"IHDR":
            ihdr = _ihdr(body, field)
        elif chunk_type == b"acTL" and length >= 4:
            frames = struct.unpack(">I", body[:4])[0]
        elif chunk_type in (b"IDAT", b"IEND"):
            break
        chunks += 1
        if chunks > _PNG_MAX_CHUNKS_BEFORE_IDAT:
            raise _corrupt("PNG", f"more than {_PNG_MAX_CHUNKS_BEFORE_IDAT} chunks before IDAT", field)
        position += 12 + length
    if chunk_type != b"IDAT" or ihdr is None:
        raise _corrupt("PNG", "no image data", field)
    width, height, bits, colour = ihdr
    per_pixel = _PILLOW_BYTES_PER_PIXEL + (_APNG_EXTRA_BYTES_PER_PIXEL if frames > 1 else 0)
    return ImageHeader(
        "png",
        frames,
        height,
        width,
        3 if (colour, bits) == (4, 16) else _PNG_BANDS[colour],  # Pillow reads 16-bit gray+alpha as RGBA
        frames * height * width * _PNG_STORED_BANDS[colour] * (2 if bits == 16 else 1),
        height * width * per_pixel + _DECODER_OVERHEAD,
        f"{'APNG' if frames > 1 else 'PNG'} {frames}x{height}x{width} colour type {colour}, {bits}-bit",
    )


def _ihdr(body: bytes, field: str) -> tuple[int, int, int, int]:
    if len(body) != 13:
        raise _corrupt("PNG", "IHDR is not 13 bytes", field)
    width, height, bits, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if bits not in _PNG_BITS.get(colour, ()) or compression or filtering or interlace > 1:
        raise _corrupt("PNG", f"invalid IHDR (colour type {colour}, {bits}-bit)", field)
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise _corrupt("PNG", f"invalid size {width}x{height}", field)
    return width, height, bits, colour


# ----------------------------------------------------------------------------------------------- TIFF
def count_tiff_pages(data: bytes, field: str, max_frames: int, frames_before: int = 0) -> int:
    """Pages in the IFD chain, read by hand; 422 on a loop, or as soon as `frames_before` + pages pass
    `max_frames` (the walk stops there)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    count_fmt, offset_fmt, tag_size = ("Q", "Q", 20) if big else ("H", "I", 12)
    count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
    first = 8 if big else 4
    if len(data) < first + offset_size:
        raise _corrupt("TIFF", "truncated header", field)
    offset = struct.unpack(order + offset_fmt, data[first : first + offset_size])[0]
    seen: set[int] = set()
    while offset:
        if offset in seen:
            raise _corrupt("TIFF", "its IFD chain loops", field)
        if offset + count_size > len(data):
            raise _corrupt("TIFF", f"IFD {len(seen)} lies past the end of the file", field)
        seen.add(offset)
        check_frames(frames_before + len(seen), max_frames, field)
        tags = struct.unpack(order + count_fmt, data[offset : offset + count_size])[0]
        next_at = offset + count_size + tags * tag_size
        if next_at + offset_size > len(data):
            raise _corrupt("TIFF", f"IFD {len(seen) - 1} is truncated", field)
        offset = struct.unpack(order + offset_fmt, data[next_at : next_at + offset_size])[0]
    if not seen:
        raise _corrupt("TIFF", "no pages", field)
    return len(seen)


def tiff_header(data: bytes, field: str, max_frames: int, frames_before: int = 0) -> ImageHeader:
    """Series shape, dtype and compression of a plain TIFF (tifffile parses tags only, never data)."""
    count_tiff_pages(data, field, max_frames, frames_before)
    try:
        with tifffile.TiffFile(io.BytesIO(data), **PLAIN_TIFF) as tif:
            series = tif.series[0]
            shape, dtype, axes = tuple(series.shape), series.dtype, series.axes
            pages = [p for p in series.pages if p is not None]
            compressions = {int(p.compression) for p in pages}
            largest_segment = max((max(p.databytecounts, default=0) for p in pages), default=0)
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise _corrupt("TIFF", str(exc), field) from exc
    if dtype is None or dtype.kind not in _KINDS:
        raise InvalidInput(f"TIFF holds {dtype} values", field=field, limit=VALUE_KINDS, code="unsupported_dtype")
    unsupported = sorted(compressions - TIFF_COMPRESSIONS.keys())
    if unsupported:
        raise InvalidInput(
            f"TIFF compression {unsupported} is not supported",
            field=field,
            limit=sorted(set(TIFF_COMPRESSIONS.values())),
            code="unsupported_compression",
        )
    dims = list(shape)
    bands = dims.pop(axes.index("S")) if "S" in axes else 1
    if len(dims) < 2:
        raise InvalidInput(f"TIFF has shape {list(shape)}", field=field, limit="(H,W), (N,H,W) or RGB")
    inflate = largest_segment * _INFLATE_MAX_RATIO if compressions - {1} else 0
    return ImageHeader(
        "tiff",
        math.prod(dims[:-2]),
        dims[-2],
        dims[-1],
        bands,
        math.prod(shape) * dtype.itemsize,
        math.prod(shape) * dtype.itemsize + inflate + largest_segment + _DECODER_OVERHEAD,
        f"TIFF {list(shape)} ({axes}) {dtype}",
    )


# ----------------------------------------------------------------------------------------------- NPY
@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int


def npy_header(data: bytes, field: str, kinds: str = "biuf", kinds_limit: str = VALUE_KINDS) -> NpyHeader:
    """Shape, dtype (of numpy `kinds`) and data offset of an NPY file whose data are all present; never
    unpickles."""
    try:
        shape, fortran_order, dtype, offset = _parsed_npy_header(_npy_header_bytes(data))
    except Exception as exc:  # ValueError, SyntaxError, tokenize.TokenError, EOFError... from a client's bytes
        raise InvalidInput(f"cannot read NPY: {exc}", field=field, limit="NPY without pickles") from exc
    if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidInput(f"NPY holds {dtype} values", field=field, limit=kinds_limit, code="unsupported_dtype")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidInput(f"NPY has shape {shape}", field=field, limit="non-negative dimensions")
    needed = math.prod(shape) * dtype.itemsize
    if len(data) - offset < needed:
        raise InvalidInput(
            f"NPY declares {needed} bytes of data but holds {len(data) - offset}",
            field=field,
            limit="NPY with all its data",
            code="truncated",
        )
    return NpyHeader(tuple(shape), dtype, bool(fortran_order), offset)


def _npy_header_bytes(data: bytes) -> bytes:
    """The magic, length field and header dict of an NPY file (everything before its data)."""
    length_size = 2 if data[6:8] == b"\x01\x00" else 4  # format 1.0: 2 bytes; 2.0 and 3.0: 4 bytes
    start = 8 + length_size
    return data[: start + int.from_bytes(data[8:start], "little")]


@functools.lru_cache(maxsize=512)
def _parsed_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of an NPY header, parsed by numpy once per distinct header:
    a batch client sends the same header with every request, and numpy's parser (`ast.literal_eval`) is the
    costliest part of reading a small body (measured ~6 % of the event loop's time on 32-value latents)."""
    stream = io.BytesIO(header)
    major, minor = np.lib.format.read_magic(stream)
    if (major, minor) == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    else:  # 2.0 and 3.0 differ only in the length field and in non-ASCII field names
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    return tuple(shape), bool(fortran_order), dtype, stream.tell()


def npy_image_header(data: bytes, field: str) -> ImageHeader:
    """An NPY image (H,W) | (N,H,W) | (N,C,H,W) with C in 1, 3, 4; read in place (no decoder buffers)."""
    header = npy_header(data, field)
    shape = header.shape
    if len(shape) == 2:
        shape = (1, 1, *shape)
    elif len(shape) == 3:
        shape = (shape[0], 1, *shape[1:])
    elif not (len(shape) == 4 and shape[1] in (1, 3, 4)):
        raise InvalidInput(
            f"NPY image has shape {list(shape)}", field=field, limit="(H,W) | (N,H,W) | (N,C,H,W), C in 1,3,4"
        )
    frames, bands, height, width = shape
    return ImageHeader(
        "npy",
        frames,
        height,
        width,
        bands,
        math.prod(header.shape) * header.dtype.itemsize,
        _DECODER_OVERHEAD,
        f"NPY {list(header.shape)} {header.dtype}",
    )


def npy_array(data: bytes, header: NpyHeader) -> np.ndarray:
    """The NPY's values as a read-only view of `data` (no copy)."""
    flat = np.frombuffer(data, dtype=header.dtype, count=math.prod(header.shape), offset=header.data_offset)
    return flat.reshape(header.shape, order="F" if header.fortran_order else "C")

