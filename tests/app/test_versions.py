"""Model versions: policy parsing and selection, the default version, version routes and their errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.lifespan import StartupError
from app.main import create_app
from app.schemas.store_format import StoreError
from app.settings import Settings
from app.store import ModelRecord, ModelRegistry
from app.versions import PolicyTable, VersionPolicy, scan_versions
from tests.app.conftest import assert_error, make_settings

DECODE = "/v1/models/tiny-render/decode?format=npy"


def versioned_store(store: Path, root: Path, versions: tuple[str, ...], broken: tuple[str, ...] = ()) -> Path:
    """`root` holding tiny-render (a fixed render: no body to send) under each of `versions`; the
    `broken` ones with an artifact that no longer matches its sha256."""
    for version in versions:
        target = root / "tiny-render" / version
        shutil.copytree(store / "tiny-render" / "1", target)
        if version in broken:
            (target / "decode.onnx").write_bytes((target / "decode.onnx").read_bytes()[:-1] + b"\0")
    return root


def test_policies_parse_and_select() -> None:
    versions = ["1", "2", "9", "10"]
    assert VersionPolicy.parse("latest:1").select(versions) == ["10"]
    assert VersionPolicy.parse(" latest:3 ").select(versions) == ["2", "9", "10"]
    assert VersionPolicy.parse("all").select(versions) == versions
    assert VersionPolicy.parse("pinned:9").select(versions) == ["9"]
    assert VersionPolicy.parse("pinned:7").select(versions) == []
    texts = ["latest:2", "all", "pinned:v1.2"]
    assert [str(VersionPolicy.parse(t)) for t in texts] == texts
    for bad in ("latest:0", "latest", "newest:1", "pinned:", "pinned:a/b", "latest:-1"):
        with pytest.raises(ValueError, match=r"is not one of latest:N \| all \| pinned:VERSION"):
            VersionPolicy.parse(bad)


def test_the_setting_has_a_default_and_per_model_overrides() -> None:
    table = PolicyTable.parse("latest:2, v3-small-201=pinned:1,stem-ae=all")
    assert table.default == VersionPolicy("latest", 2)
    assert table.overrides == {"v3-small-201": VersionPolicy("pinned", 1, "1"), "stem-ae": VersionPolicy("all", 0)}
    assert PolicyTable.parse("stem-ae=latest:3").default == VersionPolicy("latest", 1)  # default of the default
    with pytest.raises(ValueError, match="2 defaults"):
        PolicyTable.parse("latest:1,all")
    with pytest.raises(ValueError, match="'a b' is not a model name"):
        PolicyTable.parse("a b=all")
    assert Settings().version_policy == "latest:1"
    with pytest.raises(ValidationError, match="version policy 'newest' is not one of"):
        Settings(version_policy="newest")


def test_policy_file_applies_unless_the_setting_names_the_model(tmp_path: Path) -> None:
    for model in ("a", "b", "c"):
        for version in ("1", "2", "3"):
            (tmp_path / model / version).mkdir(parents=True)
            (tmp_path / model / version / "manifest.json").write_text("{}")
    (tmp_path / "a" / "policy.json").write_text(json.dumps({"policy": "pinned:2"}))
    (tmp_path / "b" / "policy.json").write_text(json.dumps({"policy": "pinned:2"}))
    (tmp_path / "c" / "policy.json").write_text(json.dumps({"pin": "2"}))
    models = scan_versions(tmp_path, PolicyTable.parse("latest:2,b=latest:1"))
    assert str(models["a"].policy) == "pinned:2" and str(models["b"].policy) == "latest:1"
    assert [s.version for s in models["a"].stored] == ["1", "2", "3"]
    expected = '{"policy": "latest:N | all | pinned:VERSION"}'
    assert models["c"].error == f"c/policy.json has no 'policy' key (expected {expected})"
    assert scan_versions(tmp_path, PolicyTable(), selected={"b"}).keys() == {"b"}
    (tmp_path / "c" / "policy.json").write_text('{"policy": "every"}')
    with pytest.raises(StoreError, match=r"c/policy\.json version policy 'every' is not one of"):
        PolicyTable().for_model(tmp_path / "c")


def test_the_default_version_is_the_newest_ready_one() -> None:
    registry = ModelRegistry()
    old, new = ModelRecord("m", "9", state="ready"), ModelRecord("m", "10", state="loading")
    registry.add(new)
    registry.add(old)
    assert [r.version for r in registry.versions("m")] == ["9", "10"]
    assert registry.get("m") is old  # 10 is not ready yet
    new.state = "ready"
    assert registry.get("m") is new and registry.get_version("m", "9") is old
    assert list(registry) == [new] and registry.records() == [old, new] and len(registry) == 1
    old.state = new.state = "unavailable"
    assert registry.get("m") is new  # none ready: the newest, whose reason explains the 503
    registry.set_versions("m", [])
    assert registry.get("m") is None and registry.names() == []


def test_version_routes_reach_each_served_version(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1", "2", "10"))
    with TestClient(create_app(make_settings(root, version_policy="latest:2", warmup=False))) as client:
        plain = client.post(DECODE)
        assert plain.status_code == 200 and plain.headers["X-Model-Version"] == "10"
        second = client.post("/v1/models/tiny-render/versions/2/decode?format=npy")
        assert second.status_code == 200 and second.headers["X-Model-Version"] == "2"
        assert second.content == plain.content  # the same weights under both names
        error = assert_error(
            client.post("/v1/models/tiny-render/versions/1/decode"), 404, field="version", limit=["2", "10"],
            code="version_not_found",
        )
        assert error["message"] == "model 'tiny-render' serves no version '1'"
        assert_error(client.post("/v1/models/nope/versions/1/decode"), 404, field="name", code="model_not_found")
        refused = client.post("/v1/models/tiny-render/versions/2/decode", content=b"[1, 2]")
        assert refused.status_code == 422 and refused.headers["X-Model-Version"] == "2"  # errors name it too
        listed = client.get("/v1/models").json()["models"][0]
        assert (listed["name"], listed["version"], listed["policy"]) == ("tiny-render", "10", "latest:2")
        assert [(v["version"], v["state"]) for v in listed["versions"]] == [("2", "ready"), ("10", "ready")]
        versions = client.get("/v1/models/tiny-render/versions").json()
        assert versions["default_version"] == "10" and [v["version"] for v in versions["versions"]] == ["2", "10"]
        described = client.get("/v1/models/tiny-render/versions/2")
        assert described.json()["version"] == "2" and described.headers["X-Model-Version"] == "2"
        assert client.get("/v1/models/tiny-render").headers["X-Model-Version"] == "10"
        assert_error(client.get("/v1/models/tiny-render/versions/3"), 404, field="version", limit=["2", "10"])


def test_a_pinned_version_is_the_default(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1", "2"))
    settings = make_settings(root, version_policy="latest:1,tiny-render=pinned:1", warmup=False)
    with TestClient(create_app(settings)) as client:
        assert client.post(DECODE).headers["X-Model-Version"] == "1"
        assert_error(client.post("/v1/models/tiny-render/versions/2/decode"), 404, field="version", limit=["1"])
    settings = make_settings(root, version_policy="tiny-render=pinned:7", warmup=False)
    with TestClient(create_app(settings)) as client:
        error = assert_error(client.post(DECODE), 503, field="name")
        assert "pinned version '7' is not in the store (it has ['1', '2'])" in error["message"]


def test_a_broken_newest_version_leaves_the_one_before_serving(store: Path, tmp_path: Path) -> None:
    root = versioned_store(store, tmp_path, ("1", "2"), broken=("2",))
    with TestClient(create_app(make_settings(root, warmup=False))) as client:
        assert client.get("/readyz").status_code == 200
        answer = client.post(DECODE)
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1"
        assert [v["version"] for v in client.get("/v1/models").json()["models"][0]["versions"]] == ["1"]
    strict = create_app(make_settings(root, warmup=False, strict=True))
    failure = r"tiny-render/2 failed: artifact decode\.onnx sha256 mismatch"
    with pytest.raises(StartupError, match=failure), TestClient(strict):
        pass
