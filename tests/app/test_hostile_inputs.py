"""Every parse failure is a 4xx naming the field and the limit, never a 500: every dtype numpy can write,
truncated and corrupted PNG/APNG/TIFF/NPY, formats the service does not document (EPS/PS never reach a
parser), hostile JSON and malformed multipart. Sizing comes from headers, before anything is decoded."""

from __future__ import annotations

import io
import json
import random
import time

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from app import codecs, image_headers
from app.api import io as api_io
from app.errors import InvalidInput, ServiceError, status_and_reason
from app.schemas.manifest import Preprocessing
from app.settings import Settings
from tests.app import crafted_images as crafted
from tests.app.conftest import assert_error

RNG = np.random.default_rng(3)
TINY = Preprocessing(channels=1, input_size=(16, 16), resize="bilinear")
SETTINGS = Settings(max_frames=16, max_request_memory_bytes=64 << 20)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.fixture
def client(client):
    """The session's service, once its models are warm (they may load in the background)."""
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.05)
    return client


def decode(data: bytes, settings: Settings = SETTINGS) -> np.ndarray:
    return api_io.decode_and_prepare([("file", data)], TINY, [-1, 1, 16, 16], settings)


# ----------------------------------------------------------------------------------------------- NPY dtypes
DTYPES = {
    "bool": np.bool_, "int8": np.int8, "uint16-big-endian": ">u2", "int64": np.int64, "uint64": np.uint64,
    "float16": np.float16, "float32-big-endian": ">f4", "float64": np.float64, "longdouble": np.longdouble,
    "complex64": np.complex64, "complex128": np.complex128, "clongdouble": np.clongdouble,
    "timedelta": "m8[s]", "datetime": "M8[D]", "unicode": "U3", "bytes": "S3", "void": "V4",
    "structured": [("a", "<f4"), ("b", "<i2")], "object": object,
}
REFUSED = {"complex64", "complex128", "clongdouble", "timedelta", "datetime", "unicode", "bytes", "void",
           "structured", "object"}


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_numpy_dtype_is_decoded_or_refused_from_its_header(client, name):
    data = npy(np.zeros((16, 16), dtype=DTYPES[name]))
    response = client.post("/v1/models/tiny-ae/encode", content=data)
    if name in REFUSED:
        error = assert_error(response, 422, field="file", limit=image_headers.VALUE_KINDS)
        assert error["code"] == "unsupported_dtype"
    else:
        assert response.status_code == 200, response.text
    latents = client.post("/v1/models/tiny-ae/decode", content=npy(np.zeros((1, 8), dtype=DTYPES[name])))
    if name in REFUSED or name == "bool":
        assert_error(latents, 422, field="latents", limit="float or int")
    else:
        assert latents.status_code == 200, latents.text


def test_npy_declaring_more_data_than_it_holds_is_refused_before_reading():
    with pytest.raises(InvalidInput) as info:
        decode(crafted.npy_header_only((256, 1, 4096, 4096)))
    assert (info.value.code, info.value.limit) == ("truncated", "NPY with all its data")


# ----------------------------------------------------------------------------------------------- corrupt images
def _samples() -> dict[str, bytes]:
    frames = [Image.fromarray(RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8)) for _ in range(3)]
    apng = io.BytesIO()
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])
    gray = RNG.integers(0, 256, (3, 20, 24), dtype=np.uint8)
    return {
        "png": crafted.png_of(gray[0]),
        "png16": crafted.png_of(RNG.integers(0, 65535, (20, 24), dtype=np.uint16)),
        "palette": crafted.png(30, 20, colour=3),
        "apng": apng.getvalue(),
        "tiff": crafted.tiff(gray, photometric="minisblack"),
        "tiff-deflate": crafted.tiff(gray, photometric="minisblack", compression="zlib"),
        "tiff-tiled": crafted.tiff(np.zeros((32, 32), np.uint16), tile=(16, 16)),
        "bigtiff": crafted.tiff(gray, photometric="minisblack", bigtiff=True),
        "npy": npy(RNG.random((2, 8, 8)).astype(np.float32)),
    }


@pytest.mark.parametrize(("name", "data"), sorted(_samples().items()))
def test_truncated_and_corrupted_uploads_are_4xx(name, data):
    assert decode(data).shape[1:] == (1, 16, 16)
    rng = random.Random(name)
    variants = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 120))]
    for _ in range(200):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        variants.append(bytes(flipped))
    for variant in variants:
        try:
            decode(variant)
        except ServiceError as exc:
            assert 400 <= status_and_reason(exc)[0] < 500 and exc.field == "file"


def test_truncated_png_through_the_api(client):
    data = crafted.png_of(np.zeros((16, 16), np.uint8))
    assert_error(client.post("/v1/models/tiny-ae/encode", content=data[:-20]), 422, field="file")


def test_odd_tiffs(client):
    loop = client.post("/v1/models/tiny-ae/encode", content=crafted.tiff_looping())
    assert "loops" in assert_error(loop, 422, field="file")["message"]
    complex_tiff = crafted.tiff(np.zeros((16, 16), np.complex64))
    error = assert_error(client.post("/v1/models/tiny-ae/encode", content=complex_tiff), 422, field="file")
    assert error["code"] == "unsupported_dtype"
    lzma = crafted.tiff(np.zeros((16, 16), np.uint8), compression="lzma")
    error = assert_error(client.post("/v1/models/tiny-ae/encode", content=lzma), 422, field="file")
    assert (error["code"], error["limit"]) == ("unsupported_compression", ["deflate", "none"])


def test_imagej_frame_count_in_the_description_is_not_trusted():
    data = crafted.tiff(np.zeros((2, 8, 8), np.uint8), imagej=True)
    assert b"images=2" in data
    forged = data.replace(b"images=2", b"images=9")
    header = image_headers.read_header(forged, "file", max_frames=16)
    assert (header.frames, header.data_bytes) == (2, 2 * 8 * 8)
    assert codecs.decode_image_bytes(forged).shape == (2, 1, 8, 8)


# ----------------------------------------------------------------------------------------------- other formats
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n"


def _other_formats() -> dict[str, bytes]:
    out = {"eps": EPS}
    for fmt in ("JPEG", "GIF", "BMP", "WEBP"):
        buffer = io.BytesIO()
        Image.new("L", (16, 16)).save(buffer, format=fmt)
        out[fmt.lower()] = buffer.getvalue()
    return out


@pytest.mark.parametrize(("name", "data"), sorted(_other_formats().items()))
def test_only_png_tiff_and_npy_are_parsed(client, monkeypatch, name, data):
    def never(*args, **kwargs):
        raise AssertionError("Pillow must not parse EPS")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    response = client.post("/v1/models/tiny-ae/encode", content=data)
    assert_error(response, 422, field="file", limit=image_headers.ACCEPTED_FORMATS)


def test_pillow_is_asked_for_png_only(monkeypatch):
    seen = []
    real_open = Image.open

    def spy(fp, mode="r", formats=None):
        seen.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    codecs.decode_image_bytes(crafted.png_of(np.zeros((4, 4), np.uint8)))
    assert seen == [("PNG",)]


# ----------------------------------------------------------------------------------------------- JSON
HOSTILE_JSON = {
    "deep lists": b'{"latents": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "deep objects": b'{"a": ' * 5_000 + b"1" + b"}" * 5_000,
    "giant integer": b'{"latents": [[' + b"9" * 5_000 + b', 0, 0, 0, 0, 0, 0, 0]]}',
    "huge exponent": b'{"latents": [[1e999, 0, 0, 0, 0, 0, 0, 0]]}',
    "NaN": b'{"latents": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}',
    "Infinity": b'{"latents": [[-Infinity, 0, 0, 0, 0, 0, 0, 0]]}',
    "ragged": b'{"latents": [[0, 0, 0, 0, 0, 0, 0, 0], [0]]}',
    "strings": b'{"latents": [["a", 0, 0, 0, 0, 0, 0, 0]]}',
    "nulls": b'{"latents": [[null, 0, 0, 0, 0, 0, 0, 0]]}',
    "object": b'{"latents": {"a": 1}}',
    "too many numbers": json.dumps({"latents": [0] * 30_000}).encode(),
    "not UTF-8": b'{"latents": "\xff"}',
    "a list": b"[[0, 0, 0, 0, 0, 0, 0, 0]]",
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
def test_hostile_json_latents_are_422(client, name):
    response = client.post(
        "/v1/models/tiny-ae/decode", content=HOSTILE_JSON[name], headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, field="latents")


# ----------------------------------------------------------------------------------------------- multipart
MULTIPART = {
    "missing boundary": ("multipart/form-data", b"--x\r\n\r\n"),
    "garbage": ("multipart/form-data; boundary=x", b"garbage"),
    "unterminated": ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="files"'),
    "no name": ("multipart/form-data; boundary=x", b"--x\r\nNo-Disposition: y\r\n\r\nabc\r\n--x--\r\n"),
    "empty boundary": ("multipart/form-data; boundary=", b"--\r\n"),
}


@pytest.mark.parametrize("name", sorted(MULTIPART))
def test_malformed_multipart_is_422(client, name):
    content_type, body = MULTIPART[name]
    response = client.post("/v1/models/tiny-ae/encode", content=body, headers={"Content-Type": content_type})
    assert_error(response, 422, field="files")


def test_more_parts_than_frames_is_422(client):
    files = [("files", (f"{i}.png", crafted.png_of(np.zeros((16, 16), np.uint8)), "image/png")) for i in range(17)]
    assert_error(client.post("/v1/models/tiny-ae/encode", files=files), 422, field="files")
