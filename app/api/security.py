"""Who may call what: optional bearer-token auth, the admin dependency, CORS, and build-host redaction.

- `api_token` set: every route but /healthz and /readyz needs `Authorization: Bearer <token>` (compared
  in constant time); /metrics and /docs, /redoc, /openapi.json only with `auth_metrics` / `auth_docs`.
  Anything else is refused with a 401 JSON error and `WWW-Authenticate: Bearer`, before its body is read
  (`BearerAuth` is an ASGI middleware, so a route added later is covered without opting in).
- Admins are callers holding the token. `AdminDep` guards admin routes: 401 without the token, 403 when
  no token is configured (admin routes are then off).
- CORS is off unless `cors_origins` lists origins.
- `public_view` strips build-host details (platform, command lines, absolute paths) from what
  non-admins see of a model.
"""

from __future__ import annotations

import hmac
import re
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.error_handlers import error_response
from app.errors import Forbidden, Unauthorized
from app.settings import Settings

HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
METRICS_PATHS = frozenset({"/metrics"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
REALM = 'Bearer realm="aeserve"'
# what non-admins see of a manifest's provenance: versions and dates, not the build host
PUBLIC_PROVENANCE = ("git_commit", "created_at", "python", "torch", "onnx", "onnxruntime", "onnxscript")
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:~?/|[A-Za-z]:[\\/])[^\s'\"()\[\]{},;:]+")


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (None without one)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def token_matches(presented: bytes | None, expected: str | None) -> bool:
    """True when a token is configured and `presented` equals it (constant-time compare)."""
    if not expected or presented is None:
        return False
    return hmac.compare_digest(presented, expected.encode())


def is_admin(request: Request) -> bool:
    """The caller holds the configured token (nobody is an admin without one)."""
    settings: Settings = request.app.state.settings
    return token_matches(bearer_token(request.scope.get("headers", [])), settings.api_token)


def require_admin(request: Request) -> None:
    """Admin routes: 403 when no token is configured, 401 without the right one."""
    settings: Settings = request.app.state.settings
    if not settings.api_token:
        raise Forbidden("admin routes are off: set AESERVE_API_TOKEN to enable them", field="Authorization")
    if not is_admin(request):
        raise Unauthorized(
            "this route needs Authorization: Bearer <token>", field="Authorization", headers={"WWW-Authenticate": REALM}
        )


AdminDep = Annotated[None, Depends(require_admin)]


def open_paths(settings: Settings) -> frozenset[str]:
    """The paths anyone may call even when a token is set."""
    paths = set(HEALTH_PATHS)
    if not settings.auth_metrics:
        paths |= METRICS_PATHS
    if not settings.auth_docs:
        paths |= DOCS_PATHS
    return frozenset(paths)


class BearerAuth:
    """ASGI middleware: 401 for every request to a path outside `open_paths` without the token."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str]) -> None:
        self.app, self.token, self.open_paths = app, token, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = bearer_token(scope.get("headers", []))
        if token_matches(presented, self.token):
            await self.app(scope, receive, send)
            return
        challenge = REALM if presented is None else f'{REALM}, error="invalid_token"'
        message = "missing bearer token" if presented is None else "invalid bearer token"
        response = error_response(
            401, Unauthorized.code, f"{message}: send Authorization: Bearer <token>", field="Authorization",
            headers={"WWW-Authenticate": challenge}, path=scope.get("path", ""),
        )
        await response(scope, receive, send)


def install_security(app: FastAPI, settings: Settings) -> None:
    """Bearer auth when a token is set, then CORS (outermost, so preflights and 401s carry its headers)."""
    if settings.api_token:
        app.add_middleware(BearerAuth, token=settings.api_token, open_paths=open_paths(settings))
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"],
            expose_headers=["*"], max_age=600,
        )


def scrub_paths(value: Any) -> Any:
    """`value` with every absolute path inside its strings cut to its last component."""
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(lambda m: PurePath(m.group(0).replace("\\", "/")).name or "…", value)
    if isinstance(value, dict):
        return {key: scrub_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_paths(item) for item in value]
    return value


def public_view(summary: dict[str, Any]) -> dict[str, Any]:
    """A model summary without build-host details: provenance cut to `PUBLIC_PROVENANCE`, no absolute paths."""
    view = dict(summary)
    if isinstance(view.get("provenance"), dict):
        view["provenance"] = {k: v for k, v in view["provenance"].items() if k in PUBLIC_PROVENANCE}
    return scrub_paths(view)
