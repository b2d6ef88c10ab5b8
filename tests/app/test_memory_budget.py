"""Memory: one budget per request, checked from the headers before the bytes become arrays.

Unit tests of the accounting, then each memory case as a tiny crafted upload against a real uvicorn
process over the tiny store, asserting the status, the time (< 10 s) and that the server's peak RSS
(VmHWM, reset before each case through /proc/<pid>/clear_refs) grew by less than a stated bound.
Run with `-s` to see the measured figures.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from app import budget as budget_module
from app import codecs, preprocess
from app.api import io as api_io
from app.budget import MemoryBudget, check_answer
from app.errors import InvalidInput, NotAcceptable, PayloadTooLarge
from app.schemas.manifest import Preprocessing
from app.settings import Settings
from tests.app import crafted_images as crafted
from tests.app.service_process import Service, running_service

MiB = 2**20
TINY = Preprocessing(channels=1, input_size=(16, 16), resize="bilinear")
DYNAMIC = Preprocessing(channels=1, input_size=(16, 16), resize="none", dynamic_hw=True, min_hw=(8, 8))


# ----------------------------------------------------------------------------------------------- accounting
def test_budget_is_a_running_total_naming_the_part_that_passes_it():
    budget = MemoryBudget(100)
    budget.charge(60, field="files[0]", what="a")
    budget.transient(40, field="files[0]", what="b")
    assert budget.used == 60
    with pytest.raises(PayloadTooLarge) as info:
        budget.charge(41, field="files[1]", what="c")
    assert (info.value.field, info.value.limit, info.value.code) == ("files[1]", 100, "memory_budget_exceeded")


def test_a_request_is_refused_before_any_part_is_decoded(monkeypatch):
    decoded = []
    monkeypatch.setattr(codecs, "iter_frames", lambda *args: decoded.append(args) or iter(()))
    small = crafted.png_of(np.zeros((16, 16), np.uint8))
    blobs = [("files[0]", small), ("files[1]", crafted.png(4096, 4096, colour=6))]
    with pytest.raises(PayloadTooLarge) as info:
        api_io.decode_and_prepare(blobs, TINY, [-1, 1, 16, 16], Settings())
    assert info.value.field == "files[1]" and decoded == []


def test_parts_and_frames_share_one_budget():
    part = crafted.png(1024, 1024, colour=2)  # 3 MiB of declared RGB data each
    settings = Settings(max_request_memory_bytes=64 * MiB)
    blobs = [(f"files[{i}]", part) for i in range(30)]
    with pytest.raises(PayloadTooLarge) as info:
        api_io.decode_and_prepare(blobs, TINY, [-1, 1, 16, 16], settings)
    assert 5 < int(info.value.field[6:-1]) < 25  # each part alone fits: the running total does not


def test_frame_limit_counts_across_parts_and_stops_the_tiff_walk(monkeypatch):
    import tifffile

    monkeypatch.setattr(tifffile, "TiffFile", None)  # never reached: the page walk refuses first
    blobs = [("files[0]", crafted.png_of(np.zeros((3, 16, 16), np.uint8)[0])), ("files[1]", crafted.tiff_pages(50_000))]
    started = time.perf_counter()
    with pytest.raises(InvalidInput) as info:
        api_io.decode_and_prepare(blobs, TINY, [-1, 1, 16, 16], Settings(max_frames=16))
    assert time.perf_counter() - started < 1.0
    assert (info.value.field, info.value.limit, info.value.code) == ("files[1]", 16, "too_many_frames")
    assert info.value.message.startswith("17 frames")


def test_dynamic_sizes_are_bounded_by_manifest_or_settings():
    image = crafted.png(600, 500)
    with pytest.raises(InvalidInput) as info:
        api_io.decode_and_prepare([("file", image)], DYNAMIC, [-1, 1, -1, -1], Settings())
    assert (info.value.code, info.value.limit) == ("image_too_large", "<= 4096x4096 and <= 262144 pixels")
    roomy = DYNAMIC.model_copy(update={"max_pixels": 400_000})
    assert api_io.decode_and_prepare([("file", image)], roomy, [-1, 1, -1, -1], Settings()).shape == (1, 1, 500, 600)
    narrow = DYNAMIC.model_copy(update={"max_hw": (512, 512), "max_pixels": 10**6})
    with pytest.raises(InvalidInput) as info:
        api_io.decode_and_prepare([("file", image)], narrow, [-1, 1, -1, -1], Settings())
    assert info.value.limit == "<= 512x512 and <= 1000000 pixels"


def test_resizing_any_aspect_ratio_stays_cheap_and_matches_torch():
    torch = pytest.importorskip("torch")
    for shape in [(1, 1, 3, 5000), (1, 1, 5000, 3), (2, 3, 40, 9)]:
        images = np.random.default_rng(0).random(shape, dtype=np.float32)
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(images), size=(16, 24), mode="bilinear", align_corners=False
        ).numpy()
        # torch places the source pixels in float32: at a 5000:24 ratio that moves the weights by ~1e-4
        np.testing.assert_allclose(preprocess.resize_bilinear(images, (16, 24)), expected, atol=5e-4)
    strip = crafted.png(1_000_000, 1)
    header = codecs.read_header(strip, "file", 1)
    assert preprocess.frame_work_bytes(header, 1, (152, 1280)) < 40 * MiB


def test_answers_are_sized_before_encoding(monkeypatch):
    monkeypatch.setattr(budget_module, "_answer_limit", budget_module.ContextVar("limit", default=10 * MiB))
    check_answer(100_000, "json", ("png", "npy", "json"))
    with pytest.raises(NotAcceptable) as info:
        check_answer(200_000, "json", ("png", "npy", "json"))
    assert (info.value.field, info.value.limit, info.value.code) == ("format", 10 * MiB, "answer_too_large")
    assert "format=png" in info.value.message
    with pytest.raises(PayloadTooLarge):
        check_answer(10_000_000, "npy", ("png", "npy", "json"))


# ----------------------------------------------------------------------------------------------- a real process
@dataclass
class Case:
    name: str
    path: str
    payload: Callable[[], dict]
    status: int
    rss_bound_mib: float  # measured growth, rounded up with margin


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def body(data: bytes, content_type: str = "application/octet-stream") -> dict:
    return {"content": data, "headers": {"Content-Type": content_type}}


def parts(blobs: list[bytes]) -> dict:
    return {"files": [("files", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]}


CASES = [
    Case("4096x4096 PNG (16 KB) to a dynamic-size encoder", "tiny-dyn/encode",
         lambda: body(crafted.png(4096, 4096)), 422, 8),
    Case("4096x4096 PNG (16 KB) to a resizing encoder", "tiny-ae/encode",
         lambda: body(crafted.png(4096, 4096)), 413, 8),
    Case("APNG declaring 1,000,000 frames", "tiny-ae/encode",
         lambda: body(crafted.png(64, 64, frames=1_000_000)), 422, 8),
    Case("APNG of 64 frames of 2048x2048 RGBA", "tiny-ae/encode",
         lambda: body(crafted.png(2048, 2048, colour=6, frames=64, frame_data=True)), 413, 16),
    Case("palette PNG 8000x8000 (to RGB)", "tiny-ae/encode",
         lambda: body(crafted.png(8000, 8000, colour=3)), 413, 8),
    Case("TIFF of 50,000 pages", "tiny-ae/encode", lambda: body(crafted.tiff_pages(50_000)), 422, 24),
    Case("TIFF 30000x30000 whose strip holds no data", "tiny-ae/encode",
         lambda: body(crafted.tiff_empty_strips(30_000, 30_000)), 413, 8),
    Case("complex TIFF", "tiny-ae/encode", lambda: body(crafted.tiff(np.zeros((64, 64), np.complex64))), 422, 8),
    Case("NPY header declaring 256x4096x4096 float64", "tiny-ae/encode",
         lambda: body(crafted.npy_header_only((256, 1, 4096, 4096))), 422, 8),
    Case("100 parts of 1024x1024 RGB PNG (running total)", "tiny-ae/encode",
         lambda: parts([crafted.png(1024, 1024, colour=2)] * 100), 413, 16),
    Case("JSON nested 1,000,000 deep", "tiny-ae/decode",
         lambda: body(b"[" * 1_000_000 + b"]" * 1_000_000, "application/json"), 422, 24),
    Case("admitted: palette PNG 2000x2000 (costs what its header says)", "tiny-ae/encode",
         lambda: body(crafted.png(2000, 2000, colour=3)), 200, 160),
    Case("admitted: 16-bit deflate TIFF 8x1024x1024", "tiny-ae/encode",
         lambda: body(crafted.tiff(np.zeros((8, 1024, 1024), np.uint16), photometric="minisblack",
                                   compression="zlib")), 200, 64),
    Case("admitted: 1x1,000,000 PNG strip resized to 16x16", "tiny-ae/encode",
         lambda: body(crafted.png(1_000_000, 1)), 200, 48),
]
FIGURES: list[str] = []


def status_file(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def measured(service: Service, send: Callable[[], list[httpx.Response]]) -> tuple[list[httpx.Response], float, float]:
    """Responses, seconds and peak RSS growth (MiB) of `send` against the service."""
    pid = service.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_file(pid)["VmRSS"]
    started = time.perf_counter()
    responses = send()
    elapsed = time.perf_counter() - started
    return responses, elapsed, (status_file(pid)["VmHWM"] - before) / MiB


def start(store: Path, tmp_path: Path, **env: str) -> Iterator[Service]:
    environment = {"AESERVE_MODELS": "tiny-ae,tiny-dyn", "AESERVE_LOG_LEVEL": "WARNING", **env}
    with running_service(store, tmp_path, env=environment) as service:
        service.wait_until(lambda: httpx.get(f"{service.base_url}/readyz", timeout=2).status_code == 200,
                           what="/readyz")
        with service.client() as client:  # first requests pay for lazy imports: not a request's cost
            client.post("/v1/models/tiny-ae/encode", **body(crafted.png_of(np.zeros((20, 20), np.uint8))))
            client.post("/v1/models/tiny-ae/decode", json={"latents": [[0.0] * 8]})
        yield service


@pytest.fixture(scope="module")
def service(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/<pid>/status")
    yield from start(store, tmp_path_factory.mktemp("memory"))
    print("\n" + "\n".join(FIGURES))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_memory_case_against_a_real_process(service: Service, case: Case):
    payload = case.payload()
    with service.client() as client:
        (response,), elapsed, growth = measured(service, lambda: [client.post(f"/v1/models/{case.path}", **payload)])
    FIGURES.append(f"{case.name}: {response.status_code} in {elapsed:.2f} s, peak RSS +{growth:.1f} MiB")
    assert response.status_code == case.status, response.text[:500]
    if case.status >= 400:
        error = response.json()["error"]
        assert error["field"] and error["limit"] is not None
    assert elapsed < 10
    assert growth < case.rss_bound_mib


def test_forty_maximal_requests_at_once_decode_two_at_a_time(service: Service):
    payload = body(crafted.png(1000, 1000, colour=3))  # ~48 MiB of decoding each, by its header

    def send() -> list[httpx.Response]:
        with service.client() as client, ThreadPoolExecutor(40) as pool:
            return list(pool.map(lambda _: client.post("/v1/models/tiny-ae/encode", **payload), range(40)))

    responses, elapsed, growth = measured(service, send)
    FIGURES.append(f"40 concurrent 1000x1000 palette PNGs: {elapsed:.2f} s, peak RSS +{growth:.1f} MiB")
    assert [r.status_code for r in responses] == [200] * 40
    assert elapsed < 10
    assert growth < 200  # 2 decoding slots x ~48 MiB, not 40 x


@pytest.fixture(scope="module")
def small_budget(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/<pid>/status")
    yield from start(store, tmp_path_factory.mktemp("answers"), AESERVE_MAX_REQUEST_MEMORY_BYTES=str(4 * MiB))


def test_an_answer_too_big_in_its_format_is_refused_before_encoding(small_budget: Service):
    images = npy(np.zeros((256, 1, 16, 16), np.float32))
    with small_budget.client() as client:
        (response,), elapsed, growth = measured(
            small_budget, lambda: [client.post("/v1/models/tiny-ae/reconstruct?format=json", **body(images))]
        )
        FIGURES.append(f"reconstruct 256 frames as JSON, 4 MiB budget: {response.status_code} in {elapsed:.2f} s,"
                       f" peak RSS +{growth:.1f} MiB")
        assert response.status_code == 406, response.text[:500]
        error = response.json()["error"]
        assert (error["field"], error["limit"], error["code"]) == ("format", 4 * MiB, "answer_too_large")
        assert elapsed < 10 and growth < 16
        assert client.post("/v1/models/tiny-ae/reconstruct?format=npy", **body(images)).status_code == 200
