"""The in-repo baseline: a plain FastAPI app, one ONNX Runtime call per request, no batching.

    python -m bench.peers.plain_fastapi --specs specs.json --port 8101 [--intra-op-threads 1] [--floor]

Per request, on the route aeserve uses for the workload: the body is read on the event loop, then one
hop to the thread pool runs `bench.peers.common.answer_batch` for that one body (decode the NPY / PNG,
one `session.run` at batch 1, encode the PNG / NPY answer) and the bytes are returned. One session per
workload, shared by the thread pool's threads (`session.run` is thread-safe), CPU provider, every graph
optimisation, spinning off; uvicorn with httptools/uvloop when installed, access log off.

`--floor` makes it the harness floor instead: each route reads the body and answers the bytes it answered
the first time (computed once), with no decoding, no hop and no model run, so its latency at one client is
what the load generator, the loopback HTTP round trip and the FastAPI stack cost on this machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool

from bench.peers.common import PeerSpec, answer_batch, make_session, read_specs


def endpoint_for(spec: PeerSpec, session: Any) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        body = await request.body()
        try:
            (answer,) = await run_in_threadpool(answer_batch, spec, session, [body])
        except ValueError as exc:  # a body that is not this workload's NPY / PNG
            return Response(str(exc), status_code=422)
        return Response(answer, media_type=spec.accept)

    return endpoint


def floor_endpoint_for(spec: PeerSpec, session: Any) -> Callable[[Request], Awaitable[Response]]:
    """The harness floor's route: the body read, then the first answer's bytes again."""
    answers: list[bytes] = []

    async def endpoint(request: Request) -> Response:
        body = await request.body()
        if not answers:
            answers.extend(answer_batch(spec, session, [body]))
        return Response(answers[0], media_type=spec.accept)

    return endpoint


def create_app(specs: list[PeerSpec], intra_op_threads: int = 1, floor: bool = False) -> FastAPI:
    app = FastAPI(title="harness floor" if floor else "plain FastAPI peer")
    make_endpoint = floor_endpoint_for if floor else endpoint_for
    for spec in specs:
        app.add_api_route(spec.route, make_endpoint(spec, make_session(spec.onnx, intra_op_threads)), methods=["POST"])
    app.add_api_route("/healthz", lambda: {"status": "ok"}, methods=["GET"])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", required=True, help="JSON written by bench.peers.common.write_specs")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--floor", action="store_true", help="answer the first answer again, no work (see above)")
    args = parser.parse_args(argv)
    app = create_app(read_specs(args.specs), args.intra_op_threads, args.floor)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
