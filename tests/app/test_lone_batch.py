"""Issue 8 (speed): a batch that is its model's only work runs on a runtime with every core (`run_alone`);
under load the instances keep their one-core runtimes. (On a machine of two or more cores every sequential
API test goes through the lone sessions, and checks their answers against the eager modules.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from app.batcher import Engine
from app.runtime.base import RunFn
from app.runtime.onnx import OnnxRuntime
from tests.app.test_batcher import frames


class Tagged:
    """y = 2x + 1 after `hold_s`, counting the calls of each runtime (`narrow`: `run`, `lone`: `run_alone`)."""

    def __init__(self, hold_s: float = 0.02) -> None:
        self.hold_s = hold_s
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def runner(self, tag: str) -> RunFn:
        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with self.lock:
                self.calls[tag] += 1
            time.sleep(self.hold_s)
            return {"y": inputs["x"] * 2 + 1}

        return run


def engine_of(tagged: Tagged, *, lone: bool = True, max_batch: int = 1, instances: int = 2) -> Engine:
    engine = Engine("lone", "1", max_batch_size=max_batch, max_delay_s=0.002, max_queue_items=64,
                    instances=instances)
    engine.register("op", tagged.runner("narrow"), run_alone=tagged.runner("lone") if lone else None)
    return engine


def answers(results: list) -> list[float]:
    return [float(r["y"][0, 0]) for r in results]


def test_requests_one_after_another_run_alone_with_every_core() -> None:
    async def scenario(tagged: Tagged) -> list:
        engine = engine_of(tagged)
        await engine.start()
        try:
            return [await engine.submit("op", frames(1, v)) for v in range(4)]
        finally:
            await engine.stop()

    tagged = Tagged()
    assert answers(asyncio.run(scenario(tagged))) == [1.0, 3.0, 5.0, 7.0]
    assert tagged.calls == {"lone": 4}


def test_under_load_every_batch_runs_on_its_instance_runtime() -> None:
    """Eight requests at once, batches of one on two instances: each batch starts with others queued or
    running, so none takes the lone runtime (it would double the threads on the cores)."""

    async def scenario(tagged: Tagged) -> list:
        engine = engine_of(tagged)
        await engine.start()
        try:
            return await asyncio.gather(*(engine.submit("op", frames(1, v)) for v in range(8)))
        finally:
            await engine.stop()

    tagged = Tagged()
    assert answers(asyncio.run(scenario(tagged))) == [2.0 * v + 1 for v in range(8)]
    assert tagged.calls == {"narrow": 8}


def test_a_request_still_being_read_keeps_the_batch_on_its_instance_runtime() -> None:
    async def scenario(tagged: Tagged) -> list:
        engine = engine_of(tagged)
        await engine.start()
        try:
            with engine.expecting("op"):  # another request of the op is on its way
                first = await engine.submit("op", frames(1, 1.0))
            second = await engine.submit("op", frames(1, 2.0))  # nothing else now
            return [first, second]
        finally:
            await engine.stop()

    tagged = Tagged()
    assert answers(asyncio.run(scenario(tagged))) == [3.0, 5.0]
    assert tagged.calls == {"narrow": 1, "lone": 1}


def test_an_op_without_a_lone_runtime_always_runs_on_its_own() -> None:
    async def scenario(tagged: Tagged) -> list:
        engine = engine_of(tagged, lone=False)
        await engine.start()
        try:
            return [await engine.submit("op", frames(1, v)) for v in range(2)]
        finally:
            await engine.stop()

    tagged = Tagged()
    assert answers(asyncio.run(scenario(tagged))) == [1.0, 3.0]
    assert tagged.calls == {"narrow": 2}


class Threads:
    """y = 2x + 1, recording the thread of each call."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        time.sleep(0.01)
        return {"y": inputs["x"] * 2 + 1}


def test_a_small_lone_batch_of_a_light_op_runs_on_the_event_loop() -> None:
    async def scenario(run: Threads) -> tuple[list, int]:
        engine = Engine("light", "1", max_batch_size=8, max_delay_s=0.002, max_queue_items=64, instances=2)
        engine.register("op", run, inline_items=2)
        await engine.start()
        try:
            alone = [await engine.submit("op", frames(n, 10.0)) for n in (1, 2, 3)]  # 3 > inline_items
            crowd = await asyncio.gather(*(engine.submit("op", frames(1, v)) for v in range(6)))
            return alone + crowd, threading.get_ident()
        finally:
            await engine.stop()

    run = Threads()
    results, loop_thread = asyncio.run(scenario(run))
    assert [r["y"][:, 0].tolist() for r in results[:3]] == [[21.0], [21.0, 23.0], [21.0, 23.0, 25.0]]
    assert answers(results[3:]) == [2.0 * v + 1 for v in range(6)]
    assert run.threads[:2] == [loop_thread, loop_thread]  # one and two items alone: on the loop
    assert loop_thread not in run.threads[2:]  # three items alone, and every batch under load: a worker


# ----------------------------------------------------------------------------------------------- the runtime
def test_onnx_runtime_opens_a_lone_session_only_with_more_threads(store: Path) -> None:
    path = store / "tiny-ae" / "10" / "encode.onnx"
    runtime = OnnxRuntime(path, device="cpu", intra_op_threads=1, lone_threads=2)
    assert runtime.run_alone is not None and runtime.describe()["lone_batch_threads"] == 2
    x = {"image": np.random.default_rng(0).random((3, 1, 16, 16), dtype=np.float32)}
    # the same graph on more threads: equal up to float summation order (measured: identical here)
    np.testing.assert_allclose(runtime.run_alone(x)["latent"], runtime.run(x)["latent"], rtol=1e-5, atol=1e-6)
    for lone_threads in (0, 1):
        same = OnnxRuntime(path, device="cpu", intra_op_threads=1, lone_threads=lone_threads)
        assert same.run_alone is None and same.describe()["lone_batch_threads"] is None


def test_warm_up_runs_each_lone_session_once_per_shape_at_batch_one(store: Path) -> None:
    from app.lifespan import shape_buckets, warm_up
    from app.store import ModelRecord, load_model
    from tests.app.conftest import make_settings

    runs = {}
    for lone in (1, 2):  # 1: no lone sessions
        settings = make_settings(store, engine_instances=2, intra_op_threads=1, lone_batch_threads=lone,
                                 warmup_max_run_s=0, lone_batch_min_ms=0)
        record = ModelRecord("tiny-ae", "10", store / "tiny-ae" / "10")
        load_model(record, settings)
        assert all((runtime.run_alone is not None) == (lone == 2) for runtime in record.runtimes.values())
        runs[lone] = warm_up(record, settings)
    buckets = sum(len(shape_buckets(record, record.op(op))) for op in record.runtimes if record.op(op).inputs)
    assert runs[2] - runs[1] == buckets > 0
    assert all(runtime.run_alone is not None for runtime in record.runtimes.values())  # min 0: all kept


def test_warm_up_drops_the_lone_session_of_an_op_lighter_than_the_minimum(store: Path) -> None:
    from app.lifespan import warm_up
    from app.store import ModelRecord, load_model
    from tests.app.conftest import make_settings

    # tiny-ae's ops take well under a millisecond; 10 s is more than any op of it takes on any machine
    settings = make_settings(store, engine_instances=2, intra_op_threads=1, lone_batch_threads=2,
                             lone_batch_min_ms=10_000)
    record = ModelRecord("tiny-ae", "10", store / "tiny-ae" / "10")
    load_model(record, settings)
    with_inputs = [name for name in record.runtimes if record.op(name).inputs]
    assert with_inputs and all(record.runtimes[name].run_alone is not None for name in with_inputs)
    warm_up(record, settings)
    for name in with_inputs:
        runtime = record.runtimes[name]
        assert runtime.run_alone is None and runtime.describe()["lone_batch_threads"] is None


def test_warm_up_times_one_item_and_light_ops_run_small_lone_batches_inline(store: Path) -> None:
    from app.lifespan import inline_items, warm_up
    from app.store import ModelRecord, load_model
    from tests.app.conftest import make_settings

    for min_ms, light in ((10_000.0, True), (0.0, False)):  # every tiny-ae op is under 10 s; 0: off
        settings = make_settings(store, lone_batch_min_ms=min_ms)
        record = ModelRecord("tiny-ae", "10", store / "tiny-ae" / "10")
        load_model(record, settings)
        warm_up(record, settings)
        with_inputs = [name for name in record.runtimes if record.op(name).inputs]
        assert (set(record.item_ms) == set(with_inputs)) is light
        for name in with_inputs:
            items = inline_items(record, name, settings)
            assert (items >= 1) is light
            if light:
                assert items == int(min_ms // record.item_ms[name])


def test_models_list_shows_each_ops_item_time_and_inline_batches(store: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.app.conftest import make_settings

    with TestClient(create_app(make_settings(store, models="tiny-ae", lone_batch_min_ms=10_000))) as client:
        ops = client.get("/v1/models/tiny-ae").json()["engine"]["ops"]
    encode = ops["encode"]
    shown = encode["item_ms"]  # rounded to the microsecond: the batch count agrees within that rounding
    assert shown > 0 and 10_000 / (shown + 0.0005) - 1 <= encode["inline_items"] <= 10_000 / max(shown - 0.0005, 1e-9)
    assert encode["lone_batch_threads"] is None  # a light op keeps one session

