"""Settings from AESERVE_* and the ONNX runtime's provider choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from app.runtime.base import Runtime, RuntimeLoadError
from app.runtime.onnx import OnnxRuntime
from app.settings import Settings


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("AESERVE_STORE", "/srv/store")
    monkeypatch.setenv("AESERVE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("AESERVE_DEVICE", "cpu")
    monkeypatch.setenv("AESERVE_WARMUP", "false")
    settings = Settings()
    assert settings.store == Path("/srv/store") and settings.max_batch_size == 16
    assert settings.device == "cpu" and settings.warmup is False
    assert settings.intra_op_threads == 0 and settings.prefer == "manifest" and settings.strict is False  # 0: cores


def test_settings_refuse_bad_values(monkeypatch):
    monkeypatch.setenv("AESERVE_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()


def test_onnx_runtime_runs_on_cpu_and_names_its_provider(store):
    runtime = OnnxRuntime(store / "tiny-ae" / "10" / "encode.onnx", device="auto", intra_op_threads=1)
    assert isinstance(runtime, Runtime)
    assert runtime.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert runtime.input_names == ["image"] and runtime.output_names == ["latent"]
    out = runtime.run({"image": np.zeros((3, 1, 16, 16), np.float32)})
    assert out["latent"].shape == (3, 8)
    cpu = OnnxRuntime(store / "tiny-ae" / "10" / "encode.onnx", device="cpu")
    assert cpu.provider == "CPUExecutionProvider"


def test_device_cuda_without_a_usable_gpu_is_a_load_error(store):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA; the refusal path needs a CPU-only build")
    with pytest.raises(RuntimeLoadError, match="device=cuda"):
        OnnxRuntime(store / "tiny-ae" / "10" / "encode.onnx", device="cuda")


def test_corrupt_onnx_is_a_load_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuntimeLoadError, match=r"bad\.onnx"):
        OnnxRuntime(bad, device="cpu")


def test_lifecycle_and_security_settings(monkeypatch):
    defaults = Settings()
    assert defaults.load_in_background is True and defaults.shutdown_grace_s == 30.0
    assert defaults.api_token is None and not defaults.auth_metrics and not defaults.auth_docs
    assert defaults.cors_origins == ""  # CORS off
    monkeypatch.setenv("AESERVE_API_TOKEN", "x" * 16)
    monkeypatch.setenv("AESERVE_AUTH_METRICS", "true")
    monkeypatch.setenv("AESERVE_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("AESERVE_SHUTDOWN_GRACE_S", "5")
    settings = Settings()
    assert settings.api_token == "x" * 16 and settings.auth_metrics and settings.shutdown_grace_s == 5.0
    assert settings.cors_origins == "https://a.example,https://b.example"
