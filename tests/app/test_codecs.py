"""app.codecs: every image format in, 8/16-bit, channels, resizing, latents, PNG grids, heat overlays."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from app import codecs, preprocess
from app.errors import InvalidInput
from app.schemas.manifest import Preprocessing


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


RNG = np.random.default_rng(0)


def test_png_8bit_gray_scaled_to_unit():
    array = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    out = codecs.decode_image_bytes(png_bytes(array))
    assert out.shape == (1, 1, 5, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], array / 255.0, atol=1e-7)


def test_png_16bit_gray_scaled_by_65535():
    array = RNG.integers(0, 65536, (6, 4), dtype=np.uint16)
    out = codecs.decode_image_bytes(png_bytes(array))
    np.testing.assert_allclose(out[0, 0], array / 65535.0, atol=1e-7)


def test_png_rgb_and_rgba_keep_three_channels():
    rgb = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    out = codecs.decode_image_bytes(png_bytes(rgb))
    assert out.shape == (1, 3, 4, 5)
    np.testing.assert_allclose(out[0], np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-7)
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 255, np.uint8)], axis=-1)
    assert codecs.decode_image_bytes(png_bytes(rgba)).shape == (1, 3, 4, 5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_stack_and_bit_depths(dtype):
    stack = RNG.integers(0, np.iinfo(dtype).max, (5, 6, 7), dtype=dtype)
    out = codecs.decode_image_bytes(tiff_bytes(stack, photometric="minisblack"))
    assert out.shape == (5, 1, 6, 7)
    np.testing.assert_allclose(out[:, 0], stack / np.iinfo(dtype).max, atol=1e-7)


def test_tiff_float_and_rgb():
    image = RNG.random((6, 7)).astype(np.float32)
    np.testing.assert_array_equal(codecs.decode_image_bytes(tiff_bytes(image))[0, 0], image)
    rgb = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    out = codecs.decode_image_bytes(tiff_bytes(rgb, photometric="rgb"))
    assert out.shape == (1, 3, 6, 7)
    np.testing.assert_allclose(out[0, 1], rgb[..., 1] / 255.0, atol=1e-7)


@pytest.mark.parametrize("shape", [(6, 7), (3, 6, 7), (3, 1, 6, 7)])
def test_npy_shapes_float(shape):
    array = RNG.random(shape).astype(np.float32)
    out = codecs.decode_image_bytes(npy_bytes(array))
    assert out.shape == (int(np.prod(shape[:-2])) if len(shape) > 2 else 1, 1, 6, 7)
    np.testing.assert_array_equal(out.reshape(-1), array.reshape(-1))


def test_npy_integer_divided_by_dtype_max_and_float64_cast():
    array = np.array([[0, 32767], [65535, 1]], dtype=np.uint16)
    np.testing.assert_allclose(codecs.decode_image_bytes(npy_bytes(array))[0, 0], array / 65535.0, atol=1e-7)
    out = codecs.decode_image_bytes(npy_bytes(np.ones((2, 2), np.float64)))
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "invalid_input"),
        (b"definitely not an image", "invalid_input"),
        (npy_bytes(np.zeros((2, 5, 6, 7, 8), np.float32)), "invalid_input"),
        (npy_bytes(np.array([[np.nan, 1.0]], np.float32)), "invalid_input"),
        (png_bytes(np.zeros((4, 4), np.uint8))[:30], "invalid_input"),
    ],
)
def test_bad_bytes_are_invalid_input_naming_the_field(data, code):
    with pytest.raises(InvalidInput) as info:
        codecs.decode_image_bytes(data, field="files[2]")
    assert info.value.code == code and info.value.field == "files[2]"


def test_rgb_to_gray_uses_luma_and_gray_to_rgb_repeats():
    rgb = np.zeros((1, 3, 2, 2), np.float32)
    rgb[:, 0] = 1.0
    gray = preprocess.convert_channels(rgb, 1)
    np.testing.assert_allclose(gray, np.full((1, 1, 2, 2), 0.299), atol=1e-6)
    assert preprocess.convert_channels(gray, 3).shape == (1, 3, 2, 2)


def test_resize_bilinear_matches_torch():
    torch = pytest.importorskip("torch")
    images = RNG.random((2, 1, 9, 13)).astype(np.float32)
    for size in [(16, 16), (5, 7)]:
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(images), size=size, mode="bilinear", align_corners=False
        ).numpy()
        np.testing.assert_allclose(preprocess.resize_bilinear(images, size), expected, atol=1e-5)


def test_prepare_images_resizes_refuses_and_limits():
    allow = Preprocessing(channels=1, input_size=(16, 16), resize="bilinear")
    deny = Preprocessing(channels=1, input_size=(16, 16), resize="none")
    images = RNG.random((2, 3, 10, 12)).astype(np.float32)
    assert preprocess.prepare_images(images, allow, [-1, 1, 16, 16], max_frames=4).shape == (2, 1, 16, 16)
    with pytest.raises(InvalidInput) as info:
        preprocess.prepare_images(images, deny, [-1, 1, 16, 16], max_frames=4)
    assert (info.value.field, info.value.limit, info.value.code) == ("file", "16x16", "wrong_image_size")
    with pytest.raises(InvalidInput) as info:
        preprocess.prepare_images(images, allow, [-1, 1, 16, 16], max_frames=1)
    assert (info.value.limit, info.value.code) == (1, "too_many_frames")
    not_dynamic = Preprocessing(channels=1, input_size=(8, 8), dynamic_hw=False)
    assert preprocess.prepare_images(images, not_dynamic, [-1, 1, -1, -1], max_frames=4).shape == (2, 1, 8, 8)
    dynamic = Preprocessing(channels=1, dynamic_hw=True, min_hw=(12, 12), resize="none")
    with pytest.raises(InvalidInput) as info:
        preprocess.prepare_images(images, dynamic, [-1, 1, -1, -1], max_frames=4)
    assert info.value.limit == ">= 12x12"


def test_latents_json_and_npy_round_trip():
    latents = RNG.standard_normal((3, 8)).astype(np.float32)
    body = json.dumps(codecs.encode_latents_json(latents)).encode()
    np.testing.assert_array_equal(codecs.decode_latents_json(body, 8, max_frames=4), latents)
    np.testing.assert_array_equal(
        codecs.decode_latents_npy(codecs.encode_npy(latents), 8, max_frames=4), latents
    )
    one = codecs.decode_latents_json(b'{"latents": [1, 2, 3, 4, 5, 6, 7, 8]}', 8, max_frames=4)
    assert one.shape == (1, 8)


@pytest.mark.parametrize(
    ("body", "limit", "code"),
    [
        (b'{"latents": [[1, 2, 3]]}', "(N, 8)", "wrong_latent_shape"),
        (b'{"latents": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', "finite values", "non_finite"),
        (b'{"z": []}', '{"latents": [[...]]}', "invalid_input"),
        (b"[[", '{"latents": [[...]]}', "invalid_input"),
        (json.dumps({"latents": [[0.0] * 8] * 5}).encode(), 4, "too_many_frames"),
    ],
)
def test_bad_latents(body, limit, code):
    with pytest.raises(InvalidInput) as info:
        codecs.decode_latents_json(body, 8, max_frames=4)
    assert (info.value.field, info.value.limit, info.value.code) == ("latents", limit, code)


def test_png_out_8_and_16_bit_round_trip():
    image = RNG.random((1, 5, 6)).astype(np.float32)
    back = codecs.decode_image_bytes(codecs.encode_png(image, 8))
    np.testing.assert_allclose(back[0], image, atol=0.5 / 255 + 1e-6)
    back16 = codecs.decode_image_bytes(codecs.encode_png(image, 16))
    np.testing.assert_allclose(back16[0], image, atol=0.5 / 65535 + 1e-6)


@pytest.mark.parametrize(("channels", "bit_depth", "mode"),
                         [(1, 8, "L"), (1, 16, "I;16"), (2, 8, "LA"), (3, 8, "RGB"), (4, 8, "RGBA"), (3, 16, "RGB")])
def test_png_writer_gives_pillow_the_exact_pixels(channels: int, bit_depth: int, mode: str):
    image = RNG.random((channels, 7, 13)).astype(np.float32)
    image[:, 0, 0], image[:, -1, -1] = 0.0, 1.0  # both ends of the range
    with Image.open(io.BytesIO(codecs.encode_png(image, bit_depth))) as decoded:
        decoded.load()
        assert decoded.mode == mode and decoded.size == (13, 7)
        pixels = np.asarray(decoded).astype(np.int64)
    scale = 65535 if mode == "I;16" else 255  # 16 bits only for one channel: colour answers stay 8-bit
    expected = np.round(image * scale).astype(np.int64)
    np.testing.assert_array_equal(pixels, expected[0] if channels == 1 else np.moveaxis(expected, 0, -1))


def test_png_grid_layout():
    images = np.stack([np.full((1, 4, 4), i / 10, np.float32) for i in range(5)])
    png, rows, cols = codecs.encode_png_grid(images)
    assert (rows, cols) == (2, 3)
    grid = codecs.decode_image_bytes(png)
    assert grid.shape == (1, 1, 2 * 4 + 2, 3 * 4 + 2 * 2)
    np.testing.assert_allclose(grid[0, 0, 6:10, 6:10], 4 / 10, atol=1 / 255)  # tile 4 = row 1, col 1


def test_to_unit_range_maps_tanh_outputs():
    np.testing.assert_allclose(
        codecs.to_unit_range(np.array([-1.0, 0.0, 1.0, 2.0]), (-1.0, 1.0)), [0.0, 0.5, 1.0, 1.0]
    )


def test_decompression_bombs_are_refused(monkeypatch):
    monkeypatch.setattr(codecs, "MAX_DECODED_PIXELS", 100)
    with pytest.raises(InvalidInput) as info:
        codecs.decode_image_bytes(png_bytes(np.zeros((20, 20), np.uint8)))
    assert (info.value.code, info.value.limit) == ("image_too_large", 100)
    with pytest.raises(InvalidInput) as info:
        codecs.decode_image_bytes(tiff_bytes(np.zeros((3, 20, 20), np.uint8), photometric="minisblack"))
    assert info.value.code == "image_too_large"


def test_heat_overlay_stretches_heavy_tailed_saliency_for_display():
    from app.codecs import heat_overlay

    images = np.full((1, 1, 10, 10), 0.5, np.float32)
    heat = np.zeros((1, 1, 10, 10), np.float32)
    heat[0, 0, :5] = 0.02          # half the image: weak but real saliency
    heat[0, 0, 9, 9] = 1.0         # one outlier pixel holds the maximum
    out = heat_overlay(images, heat)
    assert out.shape == (1, 3, 10, 10) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0, :, 7, 0], [0.5, 0.5, 0.5])   # no heat: the grey input
    assert out[0, 0, 0, 0] - out[0, 2, 0, 0] > 0.3                   # weak heat is still clearly red


# ----------------------------------------------------------------------------------------------- headers first
def test_png_header_declares_frames_bands_and_bytes_without_decoding(monkeypatch):
    from app.image_headers import read_header
    from tests.app import crafted_images as crafted

    monkeypatch.setattr(Image, "open", None)  # headers are read by hand, never by Pillow
    apng = read_header(crafted.png(64, 32, frames=5), "file", max_frames=8)
    assert (apng.frames, apng.height, apng.width, apng.bands, apng.data_bytes) == (5, 32, 64, 1, 5 * 32 * 64)
    palette = read_header(crafted.png(10, 10, colour=3), "file", max_frames=8)
    assert (palette.bands, palette.data_bytes) == (3, 100)  # decoded as RGB; stored as one byte a pixel
    assert read_header(crafted.png(10, 10, bits=16), "file", 8).data_bytes == 200
    assert read_header(crafted.png(10, 10, colour=4, bits=16), "file", 8).bands == 3  # Pillow: RGBA
    with pytest.raises(InvalidInput) as info:
        read_header(crafted.png(64, 64, frames=9), "file", max_frames=8)
    assert (info.value.code, info.value.limit) == ("too_many_frames", 8)


def test_tiff_header_declares_its_series_without_reading_data(monkeypatch):
    from app.image_headers import read_header
    from tests.app import crafted_images as crafted

    monkeypatch.setattr(tifffile.TiffPage, "asarray", None)
    stack = read_header(tiff_bytes(np.zeros((5, 6, 7), np.uint16), photometric="minisblack"), "file", 8)
    assert (stack.frames, stack.bands, stack.data_bytes) == (5, 1, 5 * 6 * 7 * 2)
    rgb = read_header(tiff_bytes(np.zeros((6, 7, 3), np.uint8), photometric="rgb"), "file", 8)
    assert (rgb.frames, rgb.bands, rgb.height, rgb.width) == (1, 3, 6, 7)
    empty = read_header(crafted.tiff_empty_strips(30_000, 20_000), "file", 8)
    assert empty.data_bytes == 30_000 * 20_000  # zero-filled on read: it costs what it declares
    deflate = read_header(tiff_bytes(np.zeros((64, 64), np.uint8), compression="zlib"), "file", 8)
    assert deflate.decoder_bytes > 64 * 64  # the inflate bound of its largest strip


def test_npy_headers_are_parsed_once_per_distinct_header() -> None:
    """A batch client repeats one header: numpy's literal_eval parser runs once for it, not per request."""
    import io as _io

    from app.image_headers import _parsed_npy_header, npy_header

    def npy(array: np.ndarray) -> bytes:
        buffer = _io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    first, second = npy(np.zeros((3, 7), np.float32)), npy(np.ones((3, 7), np.float32))
    npy_header(first, "latents")
    hits = _parsed_npy_header.cache_info().hits
    header = npy_header(second, "latents")
    assert _parsed_npy_header.cache_info().hits == hits + 1
    assert header.shape == (3, 7) and header.dtype == np.float32 and header.data_offset == len(second) - 84
    assert npy_header(npy(np.zeros((2, 5), np.uint16)), "x").shape == (2, 5)  # another header: parsed anew
