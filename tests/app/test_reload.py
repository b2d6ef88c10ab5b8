"""POST /v1/admin/reload: new versions swap in without a restart, old ones drain and are freed, a failed load
leaves the old version serving, policy files apply at once, and the route honours the token."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import assert_error, make_settings
from tests.app.test_versions import DECODE, versioned_store

TOKEN = "reload-token-0123456789"


def served_version(client: TestClient) -> str:
    answer = client.post(DECODE)
    assert answer.status_code == 200, answer.text
    return answer.headers["X-Model-Version"]


def test_a_new_version_swaps_in_and_the_old_one_is_freed(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1",))
    with TestClient(create_app(make_settings(root))) as client:
        old = client.app.state.models.get("tiny-render")
        assert served_version(client) == "1" and old.engine is not None
        assert client.post("/v1/admin/reload").json()["added"] == []  # nothing changed: nothing moves
        assert client.app.state.models.get("tiny-render") is old
        versioned_store(store, tmp_path, ("2",))
        report = client.post("/v1/admin/reload").json()
        assert [(a["model"], a["version"]) for a in report["added"]] == [("tiny-render", "2")]
        assert [(r["model"], r["version"], r["leases_left"]) for r in report["removed"]] == [("tiny-render", "1", 0)]
        assert report["failed"] == []
        expected = {"policy": "latest:1", "default_version": "2", "versions": {"2": "ready"}}
        assert report["models"]["tiny-render"] == expected
        assert served_version(client) == "2"
        assert old.retired and old.engine is None and old.runtimes == {} and old.sampler is None
        assert_error(client.post("/v1/models/tiny-render/versions/1/decode"), 404, field="version", limit=["2"])


def test_a_failed_load_leaves_the_old_version_serving(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1",))
    with TestClient(create_app(make_settings(root, warmup=False))) as client:
        versioned_store(store, tmp_path, ("2",), broken=("2",))
        report = client.post("/v1/admin/reload").json()
        assert report["added"] == [] and report["removed"] == []
        [failed] = report["failed"]
        assert (failed["model"], failed["version"]) == ("tiny-render", "2")
        assert failed["reason"].startswith("artifact decode.onnx sha256 mismatch")
        assert served_version(client) == "1" and client.get("/readyz").status_code == 200
        again = client.post("/v1/admin/reload").json()  # not loaded again while its manifest is unchanged
        assert again["failed"][0]["reason"].startswith("unchanged since it failed: artifact decode.onnx sha256")
        shutil.rmtree(root / "tiny-render" / "2")
        versioned_store(store, tmp_path, ("2",))  # republished, intact
        assert [a["version"] for a in client.post("/v1/admin/reload").json()["added"]] == ["2"]
        assert served_version(client) == "2"


def test_a_policy_file_pins_a_version_without_a_restart(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1", "2"))
    with TestClient(create_app(make_settings(root, warmup=False))) as client:
        assert served_version(client) == "2"
        (root / "tiny-render" / "policy.json").write_text(json.dumps({"policy": "pinned:1"}))
        report = client.post("/v1/admin/reload").json()
        assert [a["version"] for a in report["added"]] == ["1"] and [r["version"] for r in report["removed"]] == ["2"]
        assert served_version(client) == "1"
        (root / "tiny-render" / "policy.json").write_text(json.dumps({"policy": "pinned:5"}))
        report = client.post("/v1/admin/reload").json()
        reason = "pinned version '5' is not in the store (it has ['1', '2'])"
        assert report["failed"] == [{"model": "tiny-render", "version": "5", "reason": reason}]
        assert served_version(client) == "1"  # a pin that cannot be served leaves what serves
        (root / "tiny-render" / "policy.json").write_text("{oops")
        assert "tiny-render/policy.json" in client.post("/v1/admin/reload").json()["failed"][0]["reason"]
        assert served_version(client) == "1"
        shutil.rmtree(root / "tiny-render")
        assert [r["version"] for r in client.post("/v1/admin/reload").json()["removed"]] == ["1"]
        assert_error(client.post(DECODE), 404, field="name", code="model_not_found")


def test_a_retired_version_is_freed_only_once_its_requests_finish(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1",))
    with TestClient(create_app(make_settings(root, warmup=False))) as client:
        old = client.app.state.models.get("tiny-render")
        old.leases += 1  # a request in flight on version 1
        versioned_store(store, tmp_path, ("2",))
        answers: list = []
        reload = threading.Thread(target=lambda: answers.append(client.post("/v1/admin/reload").json()))
        reload.start()
        deadline = time.monotonic() + 20
        while client.app.state.models.get("tiny-render") is old:  # swapped once version 2 is warm
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert served_version(client) == "2"
        time.sleep(0.3)
        assert reload.is_alive() and old.engine is not None  # still draining: its request holds it
        old.leases -= 1
        reload.join(timeout=20)
        [removed] = answers[0]["removed"]
        assert removed["drain_seconds"] >= 0.3 and removed["leases_left"] == 0
        assert old.engine is None and old.runtimes == {}


def test_reload_needs_the_token_when_one_is_set(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1",))
    with TestClient(create_app(make_settings(root, warmup=False, api_token=TOKEN))) as client:
        assert_error(client.post("/v1/admin/reload"), 401, field="Authorization")
        assert_error(client.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong-token-0123456"}), 401)
        answer = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200 and answer.json()["models"]["tiny-render"]["default_version"] == "1"


def test_the_store_watcher_reloads_on_its_own(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1",))
    with TestClient(create_app(make_settings(root, warmup=False, store_poll_s=0.1))) as client:
        assert served_version(client) == "1"
        versioned_store(store, tmp_path, ("2",))
        deadline = time.monotonic() + 20
        while client.app.state.models.get("tiny-render").version != "2":
            assert time.monotonic() < deadline, "the watcher did not pick up version 2"
            time.sleep(0.05)
        assert served_version(client) == "2"
