"""aeserve on Ray Serve: the same FastAPI app (`app.main:create_app`) as a replicated, autoscaled deployment.

    python -m deploy.ray_serve --store model_store --replicas 2 --port 8000       # local Ray cluster
    serve run deploy.ray_serve:build_app store=model_store replicas=2             # the Ray CLI, same app
    kubectl apply -f deploy/kuberay-rayservice.yaml                              # KubeRay (serveConfigV2)

Each replica is one process with the whole service in it: `serve.ingress` gets a builder function that Ray
calls in the replica, and Ray Serve runs the app's lifespan there (uvicorn's `LifespanOn`), so
every replica verifies, loads and warms the store before it takes traffic (`load_in_background` is off
in replicas: the lifespan returns once every model is loaded). Per replica:
- `max_ongoing_requests` = the app's `max_inflight_requests` (default 64 = two full batches), never less
  than the largest batch any op of the store may form (`min(max_batch_size, op.max_batch_size)`): Ray's
  default of 5 would cap every batch at 5 single-image requests. Requests past it wait in Ray's queue
  (`max_queued_requests`, then 503) and go to the replica that has room, instead of meeting the app's 429;
- autoscaling (when `max_replicas` > `replicas`) targets `target_ongoing_requests` = that largest batch:
  a replica holding a full batch is busy, so another one is added;
- `check_health` raises unless the app's own readiness (what /readyz answers) says ready: a replica whose
  engine died or that lost every model is restarted by Ray;
- graceful shutdown: Ray stops routing to the replica, waits up to `graceful_shutdown_timeout_s`
  (= `shutdown_grace_s`) for its requests, then runs the lifespan's shutdown (engines drain and stop);
- resources: `num_cpus` (and `num_gpus` for the GPU variant) per replica; the app's `engine_instances`
  follows `num_cpus` (one thread each), so each replica uses the cores Ray gave it, not the node's.
Every answer carries `x-aeserve-replica: <replica id>/<pid>` (added here, not in the app).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.system import not_ready_because
from app.schemas.store_format import StoreError, read_manifest
from app.settings import Settings
from app.store import scan_store

log = logging.getLogger(__name__)
SERVE_LOG = logging.getLogger("ray.serve")  # a replica's Serve log file (logs/serve/replica_*.log)

REPLICA_HEADER = "x-aeserve-replica"
DEPLOYMENT_NAME = "aeserve"
APP_NAME = "aeserve"


class ServeArgs(BaseModel):
    """What `build_app` takes (`serve run deploy.ray_serve:build_app key=value ...`, or serveConfigV2 `args`)."""

    model_config = ConfigDict(extra="forbid")

    store: Path = Field(Path("model_store"), description="Model store root, the same path on every node")
    replicas: int = Field(1, ge=1, description="Replicas (the autoscaling minimum when max_replicas is larger)")
    max_replicas: int | None = Field(None, ge=1, description="Autoscale between replicas and this")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica (and its ORT threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (a fraction shares one GPU)")
    max_ongoing_requests: int | None = Field(None, ge=1, description="Default: derived from the store")
    target_ongoing_requests: float | None = Field(None, gt=0, description="Default: the largest batch")
    max_queued_requests: int | None = Field(None, description="Waiting in Ray per caller before 503; -1: no cap")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    settings: dict[str, Any] = Field(default_factory=dict, description="More app settings (AESERVE_* names)")


def largest_batch(settings: Settings) -> int:
    """The largest batch any op of the store may form: `min(max_batch_size, op.max_batch_size)` (the
    setting itself when the store is missing or empty, e.g. on a node that does not hold it)."""
    sizes = []
    for record in scan_store(settings.store):
        try:
            manifest = read_manifest(record.path)  # type: ignore[arg-type]
        except StoreError:
            continue
        sizes += [min(settings.max_batch_size, op.max_batch_size) for op in manifest.ops.values() if op.inputs]
    return max(sizes, default=settings.max_batch_size)


def replica_settings(args: ServeArgs) -> dict[str, Any]:
    """The app settings of every replica: the given ones, the store as an absolute path, models loaded before
    the replica takes traffic, one engine instance of one thread per CPU Ray reserves, and admission at
    max_ongoing_requests."""
    cpus = max(1, math.floor(args.num_cpus))
    instances = 0 if args.num_gpus > 0 else cpus  # 0: one instance on CUDA (`app.store.on_device`)
    overrides: dict[str, Any] = {"engine_instances": instances, "intra_op_threads": 1, **args.settings}
    overrides["store"] = str(args.store.resolve())
    overrides["load_in_background"] = False
    if args.num_gpus > 0:
        overrides.setdefault("device", "cuda")
    return overrides


def deployment_options(args: ServeArgs, settings: Settings) -> dict[str, Any]:
    """Ray Serve options of the deployment, derived from the store and the settings (see the module doc)."""
    batch = largest_batch(settings)
    max_ongoing = args.max_ongoing_requests or max(settings.max_inflight_requests, batch)
    if max_ongoing < batch:
        raise ValueError(
            f"max_ongoing_requests={max_ongoing} would cap batches below the store's largest batch ({batch})"
        )
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": args.max_queued_requests if args.max_queued_requests is not None else max_ongoing,
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        "graceful_shutdown_timeout_s": max(settings.shutdown_grace_s, 1.0),
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": args.health_check_period_s,
        "health_check_timeout_s": args.health_check_timeout_s,
    }
    if args.max_replicas is not None and args.max_replicas > args.replicas:
        options["autoscaling_config"] = {
            "min_replicas": args.replicas,
            "initial_replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests or batch,
        }
    else:
        options["num_replicas"] = args.replicas
    return options


class ReplicaHeader:
    """ASGI middleware: name the replica (Ray replica id and process id) in every HTTP answer."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.value = app, replica.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_named)


def readiness_problem(app: Any) -> str:
    """Why the app is not ready ('' when it is): the reason /readyz gives, read from its state directly."""
    if app is None:
        return "the app is not built yet"
    return not_ready_because(app.state, app.state.models)


def replica_name() -> str:
    """`<Ray replica id>/<pid>` inside a replica, `local/<pid>` outside Ray Serve."""
    serve = sys.modules.get("ray.serve")  # a replica has imported it; importing it elsewhere costs seconds
    try:
        replica = serve.get_replica_context().replica_id.unique_id  # type: ignore[union-attr]
    except Exception:  # no Ray, or not in a replica (e.g. a unit test)
        replica = "local"
    return f"{replica}/{os.getpid()}"


def build_replica_app(settings: Settings) -> ASGIApp:
    """The FastAPI app of one replica (`create_app`), naming the replica in every answer; Ray Serve builds it
    in the replica's process, then runs its lifespan there (the store loads in every replica)."""
    from app.main import create_app

    app = create_app(settings)
    app.add_middleware(ReplicaHeader, replica=replica_name())
    return app


class AeserveReplica:
    """One replica: Ray's ASGI wrapper (`serve.ingress`) around it sets `self.app`, the app built in the replica."""

    def check_health(self) -> None:
        """Ray's health check: raise unless the app is ready (every model warm, engines running, not draining)."""
        problem = readiness_problem(getattr(self, "app", None))
        if problem:
            raise RuntimeError(f"aeserve replica {replica_name()} is not ready: {problem}")

    def __del__(self) -> None:
        """Ray Serve calls this once the app's lifespan shutdown has run: log that every engine stopped."""
        app = getattr(self, "app", None)
        drain = getattr(getattr(app, "state", None), "drain", None)
        if drain is not None and drain.draining:
            running = [r.name for r in app.state.models if r.engine is not None]  # type: ignore[union-attr]
            SERVE_LOG.info("aeserve replica %s stopped; engines still running: %s", replica_name(), running or "none")


def deployment(settings_overrides: dict[str, Any]) -> Any:
    """The Ray Serve deployment (Ray is imported here, so the module imports without it): `serve.ingress` with a
    builder function, which Ray calls in each replica (Ray Serve since ray-project/ray#52892, 2025; run on 2.60)."""
    from ray import serve

    def build_asgi_app() -> ASGIApp:
        return build_replica_app(Settings(**settings_overrides))

    return serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress(build_asgi_app)(AeserveReplica))


def build_app(raw_args: dict[str, Any] | ServeArgs | None = None) -> Any:
    """The Ray Serve application (an app builder: `serve run deploy.ray_serve:build_app store=... replicas=2`)."""
    args = raw_args if isinstance(raw_args, ServeArgs) else ServeArgs.model_validate(raw_args or {})
    overrides = replica_settings(args)
    options = deployment_options(args, Settings(**overrides))
    log.info("aeserve on Ray Serve: %s", options)
    return deployment(overrides).options(**options).bind()


def parse_args(argv: list[str] | None = None) -> tuple[ServeArgs, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m deploy.ray_serve", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (GPU variant)")
    parser.add_argument("--max-ongoing-requests", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default="local", help="an existing Ray cluster, e.g. auto (default: a new one)")
    parser.add_argument("--cluster-cpus", type=int, default=None, help="CPUs of a new local cluster (default: all)")
    options = parser.parse_args(argv)
    args = ServeArgs(
        store=options.store,
        replicas=options.replicas,
        max_replicas=options.max_replicas,
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
        max_ongoing_requests=options.max_ongoing_requests,
    )
    return args, options


def main(argv: list[str] | None = None) -> None:
    """Start (or join) a Ray cluster, serve the app on host:port until SIGINT/SIGTERM, then tear it all down."""
    import ray
    from ray import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, options = parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
    local = {"num_cpus": options.cluster_cpus} if options.address == "local" else {}
    ray.init(address=options.address, runtime_env=runtime_env, **local)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        log.info("aeserve ready on http://%s:%d (Ctrl-C stops it)", options.host, options.port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
