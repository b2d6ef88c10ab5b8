"""Hot swap under load, on a real uvicorn process: a version published by `python -m training export` while
clients keep sending requests is verified, loaded and warmed, then takes the traffic; the old one drains and
its memory goes back.

A toy autoencoder (tests.training.toy_family, latent 4096: ~17 MB of weights per decoding op, so a version
is tens of MB in RSS) is trained for one epoch and exported as version 1; the service serves it with
warm-up on; CLIENTS threads send encode requests all along; version 2 is exported from the same checkpoint
and `POST /v1/admin/reload` swaps it in. Asserted: no request failed (every answer a 200, no transport
error), every request sent after the reload answered was served by version 2 (X-Model-Version), version 1
served before, and the RSS after the swap is back near the one-version RSS: within half of what the second
version added at the peak of the reload (measured on a 2-core machine shared with other runs: see
`RSS_SHARE`). Run with `-s` for the figures.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.app.conftest import npy_bytes
from tests.app.service_process import ROOT, Service, running_service

pytestmark = pytest.mark.slow

CLIENTS = 4
MiB = 2**20
RSS_SHARE = 0.5  # RSS after the swap - before <= this x (peak during the reload - before)
MIN_VERSION_MIB = 20  # the second version must show in the peak, or the RSS bound proves nothing
TOY = ["--import", "tests.training.toy_family"]
IMAGE = npy_bytes(np.random.default_rng(0).random((1, 16, 16)).astype(np.float32))


def training(*args: str, timeout: float = 300) -> None:
    """`python -m training ...` in a subprocess; fail with its output."""
    done = subprocess.run(
        [sys.executable, "-m", "training", *TOY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr


def export(run: Path, store: Path, version: str) -> None:
    training("export", "--checkpoint", str(run), "--store", str(store), "--name", "toy", "--version", version,
             "--formats", "onnx")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class Sent:
    started: float
    status: int | str  # the HTTP status, or the transport error's name
    version: str


class Load:
    """CLIENTS threads sending encode requests back to back until `stop`."""

    def __init__(self, service: Service) -> None:
        self.service, self.sent, self.running = service, [], True
        self.threads = [threading.Thread(target=self.client) for _ in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def client(self) -> None:
        headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
        with self.service.client() as client:
            while self.running:
                started = time.monotonic()
                try:
                    answer = client.post("/v1/models/toy/encode", content=IMAGE, headers=headers)
                    self.sent.append(Sent(started, answer.status_code, answer.headers.get("X-Model-Version", "")))
                except httpx.HTTPError as exc:
                    self.sent.append(Sent(started, type(exc).__name__, ""))

    def stop(self) -> list[Sent]:
        self.running = False
        for thread in self.threads:
            thread.join(timeout=60)
        return self.sent


class PeakRss:
    """The largest RSS of a process, sampled every 10 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.running = pid, rss_bytes(pid), True
        self.thread = threading.Thread(target=self.sample)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.01)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def test_a_version_published_under_load_swaps_in_without_a_failed_request(tmp_path: Path) -> None:
    run, store = tmp_path / "run", tmp_path / "store"
    training("train", "--model", "toy_ae", "--epochs", "1", "--set", "channels=64", "--set", "latent_dim=4096",
             "--set", "data.n=4", "--set", "data.val_n=4", "--batch-size", "4", "--out", str(run), "--no-progress")
    export(run, store, "1")
    env = {"AESERVE_WARMUP": "true", "AESERVE_MAX_BATCH_SIZE": "8"}
    with running_service(store, tmp_path, env=env) as service, service.client() as client:
        service.wait_until(lambda: client.get("/readyz").status_code == 200, what="/readyz")
        load = Load(service)
        time.sleep(2.0)
        export(run, store, "2")  # published while the load runs
        before = rss_bytes(service.process.pid)
        peak = PeakRss(service.process.pid)
        reloaded = client.post("/v1/admin/reload", timeout=120)
        swapped = time.monotonic()
        peak_bytes = peak.stop()
        time.sleep(2.0)
        sent = load.stop()
        after = rss_bytes(service.process.pid)
    assert reloaded.status_code == 200, reloaded.text
    report = reloaded.json()
    assert [(a["model"], a["version"]) for a in report["added"]] == [("toy", "2")], report
    assert [(r["model"], r["version"]) for r in report["removed"]] == [("toy", "1")], report
    assert report["failed"] == [] and report["removed"][0]["leases_left"] == 0
    failures = [s for s in sent if s.status != 200]
    assert not failures, f"{len(failures)} of {len(sent)} requests failed: {failures[:5]}"
    late = [s for s in sent if s.started > swapped]
    assert len(late) >= 10 and {s.version for s in late} == {"2"}
    assert {s.version for s in sent if s.started < swapped - 1.0} == {"1"}
    added_mib, left_mib = (peak_bytes - before) / MiB, (after - before) / MiB
    print(f"\n{len(sent)} requests, {len(late)} after the swap; reload {report['seconds']} s;"
          f" RSS before {before / MiB:.0f} MiB, peak +{added_mib:.0f} MiB, after {left_mib:+.0f} MiB")
    assert added_mib >= MIN_VERSION_MIB, "the second version did not show in the RSS"
    assert left_mib <= RSS_SHARE * added_mib
