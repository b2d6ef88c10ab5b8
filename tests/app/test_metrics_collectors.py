"""The metrics a latency dashboard needs: GPU (fake NVML), execution providers, codec timings, per-request
items and in-progress requests, process collectors."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace

import anyio
import numpy as np
import pytest

from app import codecs
from app.api.deps import track
from app.errors import InvalidInput
from app.image_headers import read_header
from app.metrics import (
    CODEC_DECODE,
    CODEC_ENCODE,
    REGISTRY,
    ExecutionProviderCollector,
    GpuCollector,
    provider_label,
    request_metrics,
)


def _families(collector) -> dict[str, dict[tuple, float]]:
    return {f.name: {tuple(s.labels.values()): s.value for s in f.samples} for f in collector.collect()}


def _value(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class FakeNvml:
    """The part of `pynvml` the collector calls; `broken` device indices raise like an unsupported MIG slice."""

    def __init__(self, count: int = 2, *, init_error: bool = False, broken: frozenset[int] = frozenset()) -> None:
        self.count, self.init_error, self.broken, self.inits = count, init_error, broken, 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        if handle in self.broken:
            raise RuntimeError("Not Supported")
        return SimpleNamespace(total=141 * 2**30, used=(handle + 3) * 2**30, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=25 * (handle + 1), memory=5)


def test_gpu_collector_reports_each_gpu_from_nvml() -> None:
    nvml = FakeNvml(2)
    families = _families(GpuCollector(nvml))  # type: ignore[arg-type]
    assert families == {
        "aeserve_gpu_utilization_ratio": {("0",): 0.25, ("1",): 0.5},
        "aeserve_gpu_memory_used_bytes": {("0",): 3 * 2**30, ("1",): 4 * 2**30},
        "aeserve_gpu_memory_total_bytes": {("0",): 141 * 2**30, ("1",): 141 * 2**30},
    }


def test_gpu_collector_yields_nothing_without_nvml_and_tries_once() -> None:
    nvml = FakeNvml(init_error=True)
    collector = GpuCollector(nvml)  # type: ignore[arg-type]
    assert list(collector.collect()) == [] and list(collector.collect()) == []
    assert nvml.inits == 1
    assert list(collector.describe()) == []  # registering it never starts NVML
    assert list(GpuCollector(FakeNvml(0)).collect()) == []  # a driver but no device: no series either


def test_gpu_collector_skips_a_device_it_cannot_read() -> None:
    families = _families(GpuCollector(FakeNvml(3, broken=frozenset({1}))))  # type: ignore[arg-type]
    assert families["aeserve_gpu_memory_used_bytes"] == {("0",): 3 * 2**30, ("2",): 5 * 2**30}
    assert families["aeserve_gpu_utilization_ratio"] == {("0",): 0.25, ("2",): 0.75}


def test_provider_label_is_bounded() -> None:
    assert provider_label("CUDAExecutionProvider") == "CUDAExecutionProvider"
    assert provider_label("CPUExecutionProvider") == "CPUExecutionProvider"
    assert provider_label("torch:cuda:1") == "torch:cuda" and provider_label("aoti:cpu") == "aoti:cpu"
    assert provider_label("torch (loads at first use)") == "other"
    assert provider_label("SomeNewExecutionProvider") == "other"


class FakeRuntime:
    def __init__(self, provider: str) -> None:
        self.provider = provider


def test_execution_provider_follows_the_live_runtimes() -> None:
    collector = ExecutionProviderCollector()
    cuda, fallback = FakeRuntime("CUDAExecutionProvider"), FakeRuntime("CPUExecutionProvider")
    collector.add(cuda, "m", "1")
    collector.add(fallback, "m", "1")
    collector.add(FakeRuntime("CUDAExecutionProvider"), "gone", "2")  # dropped at once
    gc.collect()
    assert _families(collector) == {"aeserve_model_execution_provider": {
        ("m", "1", "CPUExecutionProvider"): 1, ("m", "1", "CUDAExecutionProvider"): 1}}
    del fallback
    gc.collect()
    assert _families(collector)["aeserve_model_execution_provider"] == {("m", "1", "CUDAExecutionProvider"): 1}


def _tiff_upload(frames: int) -> tuple[bytes, object]:
    import io

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((frames, 8, 8), np.uint8), photometric="minisblack")
    data = buffer.getvalue()
    return data, read_header(data, "file", max_frames=16)


def test_codec_calls_report_time_and_items_to_their_request() -> None:
    labels = {"model": "m-codec", "version": "1", "op": "encode"}
    data, header = _tiff_upload(3)
    with request_metrics("m-codec", "1", "encode") as context:
        assert len(list(codecs.iter_frames(data, header))) == 3
        codecs.encode_latents_json(np.zeros((3, 4), np.float32))
        codecs.encode_npy(np.zeros((3, 4), np.float32))
    assert (context.items_in, context.items_out, context.items) == (3, 6, 3)
    assert _value("aeserve_codec_decode_seconds_count", {**labels, "format": "tiff"}) == 1
    assert _value("aeserve_codec_encode_seconds_count", {**labels, "format": "json"}) == 1
    assert _value("aeserve_codec_encode_seconds_count", {**labels, "format": "npy"}) == 1
    # outside a request: timed with empty labels; a failed decode is not timed
    empty = {"model": "", "version": "", "op": ""}
    before = _value("aeserve_codec_decode_seconds_count", {**empty, "format": "json"})
    codecs.decode_latents_json(b'{"latents": [[1, 2]]}', 2, max_frames=4)
    with pytest.raises(InvalidInput):
        codecs.decode_latents_json(b"[1, 2]", 2, max_frames=4)
    assert _value("aeserve_codec_decode_seconds_count", {**empty, "format": "json"}) == before + 1
    assert CODEC_DECODE._labelnames == CODEC_ENCODE._labelnames == ("model", "version", "op", "format")


def test_a_frame_stream_closed_early_is_still_timed() -> None:
    data, header = _tiff_upload(4)
    labels = {"model": "m-early", "version": "1", "op": "encode", "format": "tiff"}
    with request_metrics("m-early", "1", "encode") as context:
        frames = codecs.iter_frames(data, header)
        next(frames)
        frames.close()
    assert context.items_in == 1 and _value("aeserve_codec_decode_seconds_count", labels) == 1


def test_request_context_reaches_codecs_in_worker_threads() -> None:
    async def run() -> int:
        with request_metrics("m-thread", "1", "decode") as context:
            await anyio.to_thread.run_sync(lambda: codecs.decode_latents_npy(
                _npy(np.ones((5, 2), np.float32)), 2, max_frames=8))
        return context.items_in

    assert asyncio.run(run()) == 5
    labels = {"model": "m-thread", "version": "1", "op": "decode", "format": "npy"}
    assert _value("aeserve_codec_decode_seconds_count", labels) == 1


def _npy(array: np.ndarray) -> bytes:
    return codecs.encode_npy.__wrapped__(array)  # untimed: only the decode is under test


def test_track_counts_in_progress_and_items_of_successful_requests() -> None:
    record = SimpleNamespace(name="m-track", label_version="3")
    labels = {"model": "m-track", "version": "3", "op": "encode"}

    async def run() -> None:
        async with track(record, "encode") as context:  # type: ignore[arg-type]
            assert _value("aeserve_requests_in_progress", labels) == 1
            context.items_in = 4
        with pytest.raises(InvalidInput):
            async with track(record, "encode") as context:  # type: ignore[arg-type]
                context.items_in = 9
                raise InvalidInput("bad", field="file")

    asyncio.run(run())
    assert _value("aeserve_requests_in_progress", labels) == 0
    assert _value("aeserve_request_items_count", labels) == 1  # the failed request is not counted
    assert _value("aeserve_request_items_sum", labels) == 4
    assert _value("aeserve_requests_total", {**labels, "status": "422"}) == 1


def test_process_collectors_are_on_the_service_registry() -> None:
    names = {family.name for family in REGISTRY.collect()}
    expected = {"process_resident_memory_bytes", "process_cpu_seconds", "python_info", "python_gc_objects_collected"}
    assert expected <= names


def test_an_answer_no_codec_counts_still_counts_its_rows(client) -> None:
    """Images answered as JSON pass no codec: `aeserve_request_items` takes the answer's rows instead."""
    from prometheus_client.parser import text_string_to_metric_families

    def items_sum() -> float:
        for family in text_string_to_metric_families(client.get("/metrics").text):
            for sample in family.samples:
                if (sample.name == "aeserve_request_items_sum" and sample.labels.get("model") == "tiny-ae"
                        and sample.labels.get("op") == "sample"):
                    return sample.value
        return 0.0

    before = items_sum()
    answer = client.post("/v1/models/tiny-ae/sample?format=json", json={"num_samples": 3, "seed": 1})
    assert answer.status_code == 200, answer.text
    assert items_sum() - before == 3
