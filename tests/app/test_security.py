"""Security: bearer-token auth on every non-health route, the admin dependency, CORS off by default,
build-host details only for admins, `make serve` on 127.0.0.1."""

from __future__ import annotations

import hmac
import json
import re
import shutil
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

import app.api.security as security
from app.api.security import AdminDep, scrub_paths
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUILD_HOST = {
    "git_commit": "abc123",
    "command": "python -m training build-store (recipe /home/builder/recipes/render.toml)",
    "platform": "Linux-6.8.0-45-generic-x86_64-with-glibc2.39",
    "torch": "2.13.0",
    "created_at": "2026-01-01T00:00:00+00:00",
}


@pytest.fixture
def render_store(store: Path, tmp_path: Path) -> Path:
    """tiny-render (ONNX only), its manifest carrying build-host details as `training` writes them."""
    root = tmp_path / "store"
    shutil.copytree(store / "tiny-render", root / "tiny-render")
    path = root / "tiny-render" / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["provenance"] = BUILD_HOST
    manifest["training"] = {"data": "/home/builder/data/render.npy", "url": "https://example.org/a/b", "ratio": "1/2"}
    path.write_text(json.dumps(manifest))
    return root


def serve(store: Path, *, admin_route: bool = False, **overrides) -> TestClient:
    app = create_app(make_settings(store, warmup=False, load_in_background=False, **overrides))
    if admin_route:
        add_admin_route(app)
    return TestClient(app)


def add_admin_route(app: FastAPI) -> None:
    async def reload(_: AdminDep) -> dict[str, str]:
        return {"status": "reloaded"}

    app.add_api_route("/admin/reload", reload, methods=["POST"])


def assert_401(response, challenge: str = 'Bearer realm="aeserve"') -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == challenge
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.json()["error"]["field"] == "Authorization"


def test_without_a_token_routes_are_open_and_admin_routes_off(render_store: Path):
    with serve(render_store, admin_route=True) as client:
        for path in ("/v1/models", "/metrics", "/openapi.json", "/docs", "/healthz", "/readyz"):
            assert client.get(path).status_code == 200, path
        refused = client.post("/admin/reload", headers=AUTH)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert "AESERVE_API_TOKEN" in refused.json()["error"]["message"]


def test_the_token_guards_every_route_but_health(render_store: Path, monkeypatch):
    compared, compare_digest = [], hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    with serve(render_store, api_token=TOKEN, admin_route=True) as client:
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200  # open unless auth_metrics
        assert client.get("/openapi.json").status_code == 200  # open unless auth_docs
        assert_401(client.get("/v1/models"))
        assert_401(client.get("/v1/models/tiny-render"))
        assert_401(client.post("/v1/models/tiny-render/decode", content=b"x" * 1000))
        assert_401(client.get("/nowhere"))  # unknown paths fail closed
        assert_401(client.post("/admin/reload"))
        assert_401(client.get("/v1/models", headers={"Authorization": f"Basic {TOKEN}"}))
        wrong = {"Authorization": "Bearer not-the-token-0123456789"}
        assert_401(client.get("/v1/models", headers=wrong), 'Bearer realm="aeserve", error="invalid_token"')
        assert client.get("/v1/models", headers=AUTH).status_code == 200
        assert client.post("/v1/models/tiny-render/decode?format=npy", headers=AUTH).status_code == 200
        assert client.get("/nowhere", headers=AUTH).status_code == 404
        assert client.post("/admin/reload", headers=AUTH).json() == {"status": "reloaded"}
    assert (TOKEN.encode(), TOKEN.encode()) in compared  # the constant-time compare decided


def test_metrics_and_docs_can_be_put_behind_the_token(render_store: Path):
    with serve(render_store, api_token=TOKEN, auth_metrics=True, auth_docs=True) as client:
        for path in ("/metrics", "/openapi.json", "/docs", "/redoc"):
            assert_401(client.get(path))
            assert client.get(path, headers=AUTH).status_code == 200, path
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_a_short_or_empty_token_is_refused_at_startup(monkeypatch):
    with pytest.raises(ValidationError, match="api_token"):
        Settings(api_token="short")
    monkeypatch.setenv("AESERVE_API_TOKEN", "")
    with pytest.raises(ValidationError, match="api_token"):
        Settings()
    assert TOKEN not in repr(Settings(api_token=TOKEN))


def test_cors_is_off_by_default_and_on_for_listed_origins(render_store: Path):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    with serve(render_store) as client:
        assert "access-control-allow-origin" not in client.options("/v1/models", headers=preflight).headers
        assert "access-control-allow-origin" not in client.get("/v1/models", headers=preflight).headers
    with serve(render_store, api_token=TOKEN, cors_origins="https://app.example") as client:
        allowed = client.options("/v1/models", headers=preflight)  # a preflight carries no token
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        refused = client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert_401(refused)
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/v1/models", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_model_details_hide_the_build_host_from_non_admins(render_store: Path):
    with serve(render_store) as client:
        public = client.get("/v1/models/tiny-render")
        assert public.json()["provenance"] == {k: BUILD_HOST[k] for k in ("git_commit", "torch", "created_at")}
        assert "/home/builder" not in public.text and "generic" not in public.text
        training = public.json()["training"]
        assert training == {"data": "render.npy", "url": "https://example.org/a/b", "ratio": "1/2"}
    with serve(render_store, api_token=TOKEN) as client:
        admin = client.get("/v1/models/tiny-render", headers=AUTH).json()
        assert admin["provenance"] == BUILD_HOST
        assert admin["training"]["data"] == "/home/builder/data/render.npy"


def test_scrub_paths_cuts_absolute_paths_only():
    assert scrub_paths("cannot read /srv/store/m/1/encode.onnx: denied") == "cannot read encode.onnx: denied"
    nested = ["(recipe /a/b/r.toml)", {"k": "C:\\Users\\me\\run.log"}]
    assert scrub_paths(nested) == ["(recipe r.toml)", {"k": "run.log"}]
    kept = "see https://x.org/a/b, 1/2 of ../rel/path and a / b at 2026-01-01T00:00:00+00:00"
    assert scrub_paths(kept) == kept
    assert scrub_paths({"n": 3, "f": None}) == {"n": 3, "f": None}


def test_make_serve_binds_localhost_by_default():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", makefile, re.MULTILINE)
    assert "--host $(HOST)" in makefile
    assert '"--host", "0.0.0.0"' in (ROOT / "Dockerfile").read_text()  # the container binds every interface
