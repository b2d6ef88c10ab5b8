"""Issue 8 (speed): engine instances - several batches of one model in flight, sized from the machine."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.batcher import Engine
from app.errors import EngineError
from app.main import create_app
from app.runtime.threads import EnginePlan, machine_cores, plan_engine
from tests.app.conftest import make_settings
from tests.app.test_batcher import frames


class Overlap:
    """A fake runtime: y = 2x + 1 after `hold_s`; records how many calls ran at once, at most, and each batch;
    raises on a batch holding `poison`."""

    def __init__(self, hold_s: float = 0.05, poison: float | None = None) -> None:
        self.hold_s, self.poison = hold_s, poison
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.batches: list[list[float]] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.batches.append(x[:, 0].tolist())
        try:
            time.sleep(self.hold_s)
            if self.poison is not None and self.poison in x:
                raise RuntimeError("poisoned")
            return {"y": x * 2 + 1}
        finally:
            with self.lock:
                self.now -= 1


def engine_of(run: Overlap, instances: int, max_batch: int = 2) -> Engine:
    engine = Engine("inst", "1", max_batch_size=max_batch, max_delay_s=0.001, max_queue_items=256,
                    instances=instances)
    engine.register("op", run)
    return engine


async def run_requests(engine: Engine, values: list[float]) -> list:
    await engine.start()
    try:
        return await asyncio.gather(*(engine.submit("op", frames(1, v)) for v in values), return_exceptions=True)
    finally:
        await engine.stop()


# ----------------------------------------------------------------------------------------------- the plan
def test_the_plan_gives_each_core_an_instance_of_one_thread_by_default() -> None:
    # the third figure: a lone batch's threads (every core the instances share; 0: no lone-batch runtime)
    assert plan_engine(0, 0, cores=2) == EnginePlan(2, 1, 2)
    assert plan_engine(0, 0, cores=16) == EnginePlan(16, 1, 16)
    assert plan_engine(0, 0, cores=1) == EnginePlan(1, 1, 0)
    assert plan_engine(0, 4, cores=16) == EnginePlan(4, 4, 16)  # threads given: instances fill the cores
    assert plan_engine(0, 32, cores=16) == EnginePlan(1, 32, 0)
    assert plan_engine(3, 0, cores=16) == EnginePlan(3, 5, 15)  # instances given: the cores split among them
    assert plan_engine(4, 2, cores=2) == EnginePlan(4, 2, 0)  # both given: as asked; no more cores for one
    assert plan_engine(1, 0, cores=8) == EnginePlan(1, 8, 0)
    assert plan_engine(0, 0, cores=8, single_slot=True) == EnginePlan(1, 8, 0)  # the DDIM sampler
    assert plan_engine(0, 0, cores=8, lone_threads=4) == EnginePlan(8, 1, 4)  # the setting
    assert plan_engine(0, 0, cores=8, lone_threads=1) == EnginePlan(8, 1, 0)  # 1: off
    with pytest.raises(ValueError, match="concurrency"):
        Engine("x", "1", max_batch_size=1, max_delay_s=0, max_queue_items=1, instances=0)


# ----------------------------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("instances", [1, 2, 3])
def test_at_most_instances_batches_run_at_once_and_every_request_gets_its_own_rows(instances: int) -> None:
    run = Overlap()
    values = [float(v) for v in range(12)]
    results = asyncio.run(run_requests(engine_of(run, instances), values))
    assert [float(r["y"][0, 0]) for r in results] == [2 * v + 1 for v in values]
    assert run.most == instances  # 12 requests in batches of 2 keep every instance busy, never more
    assert sorted(v for batch in run.batches for v in batch) == values  # each ran exactly once


def test_a_failing_batch_fails_alone_while_another_instance_answers() -> None:
    run = Overlap(poison=5.0)
    results = asyncio.run(run_requests(engine_of(run, 2), [float(v) for v in range(8)]))
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [5] and isinstance(results[5], EngineError)
    assert [float(results[i]["y"][0, 0]) for i in range(8) if i != 5] == [2 * v + 1 for v in range(8) if v != 5]


def test_stop_drains_the_batches_in_flight_on_every_instance() -> None:
    async def scenario() -> tuple[list, int]:
        run = Overlap(hold_s=0.1)
        engine = engine_of(run, 2, max_batch=1)
        await engine.start()
        pending = [asyncio.ensure_future(engine.submit("op", frames(1, v))) for v in range(4)]
        while run.most < 2:
            await asyncio.sleep(0.005)
        await engine.stop()  # drains: both running batches and the two queued ones finish
        return await asyncio.gather(*pending, return_exceptions=True), engine.budget.held

    results, held = asyncio.run(scenario())
    assert [float(r["y"][0, 0]) for r in results] == [1.0, 3.0, 5.0, 7.0] and held == 0


# ----------------------------------------------------------------------------------------------- the service
def test_models_list_shows_instances_and_the_sampler_keeps_one(store: Path, tmp_path: Path) -> None:
    for name in ("tiny-ae", "tiny-ddim"):  # own copies (version 78): the readiness gauges of the shared
        source = max((store / name).iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
        shutil.copytree(source, tmp_path / name / "78")  # client's versions stay untouched
    store, cores = tmp_path, machine_cores()
    settings = make_settings(store, models="tiny-ae,tiny-ddim", lone_batch_min_ms=0)  # keep even a tiny op's
    with TestClient(create_app(settings)) as client:
        models = {m["name"]: m["engine"] for m in client.get("/v1/models").json()["models"]}
    assert models["tiny-ae"]["instances"] == cores and models["tiny-ae"]["ops"]["encode"]["threads"] == 1
    assert models["tiny-ae"]["ops"]["encode"]["lone_batch_threads"] == (cores if cores > 1 else None)
    assert models["tiny-ddim"]["instances"] == 1 and models["tiny-ddim"]["ops"]["denoise"]["threads"] == cores
    assert models["tiny-ddim"]["ops"]["denoise"]["lone_batch_threads"] is None
    with TestClient(create_app(make_settings(store, models="tiny-ae", engine_instances=1))) as client:
        one = client.get("/v1/models/tiny-ae").json()["engine"]
    assert one["instances"] == 1 and one["ops"]["encode"]["threads"] == cores
    assert one["ops"]["encode"]["lone_batch_threads"] is None
