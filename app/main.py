"""The FastAPI application: `uvicorn app.main:create_app --factory`."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from app.allocator import limit_malloc_arenas
from app.api import system, v1, v2
from app.api.edge import BodyGuard, body_limits
from app.api.error_handlers import install_error_handlers
from app.api.security import install_security
from app.lifespan import lifespan
from app.settings import Settings
from app.shutdown import Drain, DrainMiddleware
from app.store import ModelRegistry


def configure_logging(level: str) -> None:
    """Give the `app` loggers a handler of their own (uvicorn configures only its own loggers)."""
    logger = logging.getLogger("app")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def configure_access_log(enabled: bool) -> None:
    """Silence uvicorn's access log unless `enabled`: uvicorn writes a line per request only while its
    `uvicorn.access` logger has handlers (checked for each new connection), whatever its command line."""
    if not enabled:
        logging.getLogger("uvicorn.access").handlers.clear()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; `settings` default to the AESERVE_* environment."""
    settings = settings or Settings()
    limit_malloc_arenas(settings.malloc_arenas)  # before the engine, ORT and codec threads start
    configure_logging(settings.log_level)
    configure_access_log(settings.access_log)
    app = FastAPI(
        title="aeserve",
        summary="Image autoencoders, decoders and diffusion samplers behind one batched HTTP API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.models = ModelRegistry()
    install_error_handlers(app)
    app.add_middleware(BodyGuard, limits=body_limits(settings))
    app.state.drain = Drain()
    app.add_middleware(DrainMiddleware, drain=app.state.drain)  # 503 for new work once SIGTERM arrived
    install_security(app, settings)  # outermost: bearer auth, then CORS
    app.include_router(v1.router())  # the hot routes first: a request is matched against the routes in order
    app.include_router(system.router)
    app.include_router(v2.router())
    return app
