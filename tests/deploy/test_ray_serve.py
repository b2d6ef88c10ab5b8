"""aeserve on Ray Serve (deploy/ray_serve.py) and its KubeRay manifest.

Fast: the deployment options derived from a store (max_ongoing_requests never below a batch, autoscaling on
ongoing requests, resources), the health check tied to the app's readiness. Slow: the RayService manifest
(validated by Ray Serve's own schema); a local Ray cluster with 2 replicas over the tiny store answers
concurrent load exactly like one in-process app, from both replicas; a replica being deleted finishes the
request it holds.
"""

from __future__ import annotations

import importlib
import io
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from app.schemas.manifest import Manifest
from app.settings import Settings
from deploy.ray_serve import (
    REPLICA_HEADER,
    AeserveReplica,
    ServeArgs,
    build_app,
    build_replica_app,
    deployment_options,
    largest_batch,
    replica_settings,
)
from tests.app.service_process import free_port

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kuberay-rayservice.yaml"
# Largest |Ray answer - in-process answer| allowed. Measured: 0.0 (the same ONNX sessions, threads and inputs
# give bit-identical results whatever the batch they share).
FLOAT_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------ options (fast)
def write_model(store: Path, name: str, op_batches: dict[str, int]) -> None:
    """A manifest-only model (no artifacts needed to size the deployment): encode/decode ops with batch limits."""
    version = store / name / "1"
    version.mkdir(parents=True)
    spec = {"name": "x", "dtype": "float32", "shape": [-1, 4]}
    ops = {op: {"inputs": [spec], "outputs": [spec], "artifacts": {"onnx": f"{op}.onnx"}, "max_batch_size": batch}
           for op, batch in op_batches.items()}
    manifest = Manifest.model_validate({
        "name": name, "version": "1", "family": "toy", "config": {}, "capabilities": list(op_batches),
        "preprocessing": {"channels": 1, "input_size": None}, "ops": ops,
        "artifacts": [{"path": f"{op}.onnx", "sha256": "0" * 64, "bytes": 1, "format": "onnx", "op": op}
                      for op in op_batches],
    })
    (version / "manifest.json").write_text(manifest.model_dump_json())


def test_max_ongoing_requests_never_caps_a_batch(tmp_path: Path) -> None:
    write_model(tmp_path, "small", {"encode": 16, "decode": 4})
    write_model(tmp_path, "large", {"encode": 48})
    assert largest_batch(Settings(store=tmp_path, max_batch_size=32)) == 32  # the setting caps the op's 48
    assert largest_batch(Settings(store=tmp_path, max_batch_size=64)) == 48
    assert largest_batch(Settings(store=tmp_path / "missing", max_batch_size=24)) == 24

    args = ServeArgs(store=tmp_path, settings={"max_inflight_requests": 8, "max_batch_size": 40})
    options = deployment_options(args, Settings(**replica_settings(args)))
    assert options["max_ongoing_requests"] == 40  # raised from max_inflight_requests=8 to a full batch
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    default = deployment_options(ServeArgs(store=tmp_path), Settings(store=tmp_path))
    assert default["max_ongoing_requests"] == 64 > 5  # the app's admission limit, not Ray's default of 5
    with pytest.raises(ValueError, match="cap batches below the store's largest batch"):
        deployment_options(ServeArgs(store=tmp_path, max_ongoing_requests=5), Settings(store=tmp_path))


def test_autoscaling_resources_and_replica_settings(tmp_path: Path) -> None:
    write_model(tmp_path, "m", {"encode": 16})
    args = ServeArgs(store=tmp_path, replicas=2, max_replicas=6, num_cpus=3.5, num_gpus=0.5,
                     settings={"shutdown_grace_s": 12})
    overrides = replica_settings(args)
    assert overrides["store"] == str(tmp_path.resolve()) and overrides["load_in_background"] is False
    assert overrides["engine_instances"] == 0 and overrides["intra_op_threads"] == 1  # GPU: one instance
    assert overrides["device"] == "cuda"
    cpu_only = replica_settings(ServeArgs(store=tmp_path, num_cpus=3.5))
    assert cpu_only["engine_instances"] == 3 and cpu_only["intra_op_threads"] == 1
    options = deployment_options(args, Settings(**overrides))
    assert options["autoscaling_config"] == {
        "min_replicas": 2, "initial_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 16,
    }
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 3.5, "num_gpus": 0.5}
    assert options["graceful_shutdown_timeout_s"] == 12
    assert ServeArgs.model_validate({"store": "s", "replicas": "3"}).replicas == 3  # `serve run` passes strings
    with pytest.raises(ValueError, match="replica"):
        ServeArgs.model_validate({"replica": 2})


def test_health_check_follows_readiness(tmp_path: Path) -> None:
    """check_health raises before the app is built, while it starts, serves no model, and once it drains."""
    from fastapi.testclient import TestClient

    replica = AeserveReplica()
    with pytest.raises(RuntimeError, match="not built"):
        replica.check_health()
    replica.app = build_replica_app(Settings(store=tmp_path, load_in_background=False))  # what Ray's wrapper sets
    with pytest.raises(RuntimeError, match="starting"):
        replica.check_health()
    with TestClient(replica.app) as client:
        answer = client.get("/readyz")
        assert answer.status_code == 503 and answer.headers[REPLICA_HEADER] == f"local/{os.getpid()}"
        with pytest.raises(RuntimeError, match="holds no models"):
            replica.check_health()
    with pytest.raises(RuntimeError, match="shutting down"):
        replica.check_health()


# ------------------------------------------------------------------------------------------ KubeRay
@pytest.mark.slow  # importing Ray Serve's schema takes ~5 s here
def test_kuberay_rayservice_manifest() -> None:
    pytest.importorskip("ray", reason="Ray Serve validates its own config (the ray extra)")
    from ray.serve.schema import ServeDeploySchema

    resource = yaml.safe_load(MANIFEST.read_text())
    assert (resource["apiVersion"], resource["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(resource["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what Ray Serve itself accepts
    (application,) = serve_config["applications"]
    module_name, attribute = application["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    assert builder is build_app
    args = ServeArgs.model_validate(application["args"])
    options = deployment_options(args, Settings(**replica_settings(args)))  # the store is not here: defaults
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 8 and options["max_ongoing_requests"] >= 32
    cluster = resource["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas run on the workers
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == args.num_gpus and float(limits["cpu"]) > args.num_cpus
    assert workers["maxReplicas"] * limits["nvidia.com/gpu"] >= args.max_replicas  # room for every replica
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.store) in mounts


# ------------------------------------------------------------------------------------------ a real cluster (slow)
def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def request_mix(variants: int) -> list[tuple[str, dict[str, Any]]]:
    """Calls over every model kind of the tiny store: (path, httpx keyword arguments)."""
    rng = np.random.default_rng(0)
    npy_in = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    calls = []
    for i in range(variants):
        frames = 1 + i % 3
        images = rng.random((frames, 1, 16, 16), dtype=np.float32)
        calls += [
            ("/v1/models/tiny-ae/encode", {"content": npy(images), "headers": npy_in}),
            ("/v1/models/tiny-ae/encode", {"content": npy(images), "headers": {"Accept": "application/json"}}),
            ("/v1/models/tiny-ae/reconstruct", {"content": npy(images), "headers": npy_in}),
            ("/v1/models/tiny-ae/decode?format=npy", {"json": {"latents": rng.standard_normal((frames, 8)).tolist()}}),
            ("/v1/models/tiny-ae/attention-map?saliency=false", {"content": npy(images)}),
            ("/v1/models/tiny-dyn/encode", {"content": npy(rng.random((frames, 1, 12, 20), dtype=np.float32)),
                                            "headers": npy_in}),
            ("/v1/models/tiny-ae/sample?format=npy", {"json": {"num_samples": frames, "seed": i}}),
            ("/v1/models/tiny-ddim/sample?format=npy",
             {"json": {"num_samples": frames, "seed": i, "steps": 4, "condition": {"a": "high", "b": "calm"}}}),
        ]
    return calls


def numbers(response: Any) -> np.ndarray:
    """Every number of an answer (NPY array or JSON body) as one flat float64 array."""
    if response.headers["content-type"].startswith("application/x-npy"):
        return np.load(io.BytesIO(response.content)).astype(np.float64).ravel()
    flat: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                walk(value[key])
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat.append(float(value))

    walk(response.json())
    return np.array(flat)


def reference_answers(store: Path, calls: list[tuple[str, dict[str, Any]]], models: str = "") -> list[np.ndarray]:
    """The same calls answered one at a time by one in-process app (create_app) over the same store."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = Settings(store=store, warmup=False, load_in_background=False, intra_op_threads=1, models=models)
    with TestClient(create_app(settings)) as client:
        answers = [client.post(path, **kwargs) for path, kwargs in calls]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return [numbers(a) for a in answers]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="the tiny store is exported from torch modules")
    from tests.app.tiny_store import build_store

    root = tmp_path_factory.mktemp("ray_store")
    build_store(root)
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs with Serve's HTTP proxy on a free port; everything is shut down after."""
    ray = pytest.importorskip("ray")
    from ray import serve

    started = time.monotonic()
    for attempt in (1, 2):  # on a loaded 2-core runner Ray's controller can die starting up: one fresh retry
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            break
        except ray.exceptions.RayError:
            serve.shutdown()
            ray.shutdown()
            if attempt == 2:
                raise
    print(f"ray + serve up in {time.monotonic() - started:.1f} s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.xdist_group("ray-cluster")  # one local cluster per test session, not one per xdist worker
def test_two_replicas_answer_like_one_process(tiny_store: Path, ray_cluster: str) -> None:
    import httpx
    from ray import serve

    calls = request_mix(variants=6)
    expected = reference_answers(tiny_store, calls)
    started = time.monotonic()
    args = {"store": str(tiny_store), "replicas": 2, "num_cpus": 0.5, "health_check_period_s": 1,
            "settings": {"warmup": False}}
    serve.run(build_app(args), name="aeserve", route_prefix="/")
    print(f"2 replicas ready in {time.monotonic() - started:.1f} s")
    with httpx.Client(base_url=ray_cluster, timeout=60) as client:
        assert client.get("/readyz").status_code == 200
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda call: client.post(call[0], **call[1]), calls * 3))
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers if a.status_code != 200]
    worst = 0.0
    for answer, reference in zip(answers, expected * 3, strict=True):
        got = numbers(answer)
        assert got.shape == reference.shape
        worst = max(worst, float(np.abs(got - reference).max(initial=0.0)))
    print(f"{len(answers)} answers, largest difference from one process: {worst:.3g}")
    assert worst <= FLOAT_TOLERANCE
    served = Counter(a.headers[REPLICA_HEADER] for a in answers)
    print(f"answers per replica: {dict(served)}")
    assert len(served) == 2 and len({name.split("/")[1] for name in served}) == 2  # two replicas, two processes
    status = serve.status().applications["aeserve"].deployments["aeserve"]
    assert status.status == "HEALTHY"  # check_health (every second) has passed on both replicas
    serve.delete("aeserve")


@pytest.mark.slow
@pytest.mark.xdist_group("ray-cluster")
def test_deleting_a_replica_finishes_its_request(tiny_store: Path, ray_cluster: str) -> None:
    """A request waits 2 s in a partial batch (classic batching); deleting the app meanwhile lets it finish,
    then the replica runs the app's lifespan shutdown (every engine drained and stopped)."""
    import httpx
    from ray import serve

    settings = {"warmup": False, "idle_start": False, "max_delay_ms": 2000, "models": "tiny-ae"}
    serve.run(build_app({"store": str(tiny_store), "num_cpus": 0.5, "settings": settings}), name="drain",
              route_prefix="/drain")
    images = np.random.default_rng(1).random((2, 1, 16, 16), dtype=np.float32)
    call = ("/v1/models/tiny-ae/encode", {"content": npy(images), "headers": {"Accept": "application/x-npy"}})
    (expected,) = reference_answers(tiny_store, [call], models="tiny-ae")
    result: dict[str, Any] = {}

    def post() -> None:
        with httpx.Client(base_url=ray_cluster + "/drain", timeout=60) as client:
            sent = time.monotonic()
            result["answer"] = client.post(call[0], **call[1])
            result["seconds"] = time.monotonic() - sent

    sender = threading.Thread(target=post)
    sender.start()
    time.sleep(0.7)  # the request is in the replica, waiting for its batch
    deleting = time.monotonic()
    serve.delete("drain")  # blocks until the replica is gone
    deleted_after = time.monotonic() - deleting
    sender.join(timeout=30)
    answer = result["answer"]
    assert answer.status_code == 200, answer.text
    assert np.abs(numbers(answer) - expected).max() <= FLOAT_TOLERANCE
    print(f"request answered after {result['seconds']:.2f} s; delete took {deleted_after:.2f} s")
    assert result["seconds"] >= 1.9 and deleted_after >= 1.0  # the replica waited for it before stopping
    assert "drain" not in serve.status().applications
    assert replica_log_lines("drain", "stopped; engines still running: none")  # the lifespan shutdown ran


def replica_log_lines(app_name: str, text: str) -> list[str]:
    """Lines holding `text` in the Serve log files of `app_name`'s replicas (this cluster's session only)."""
    from ray._private import worker

    logs = Path(worker._global_node.get_logs_dir_path()) / "serve"
    return [line for path in logs.glob(f"replica_{app_name}_*.log") for line in path.read_text().splitlines()
            if text in line]
