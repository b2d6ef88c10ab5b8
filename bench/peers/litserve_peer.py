"""LitServe peer: the same ONNX files behind LitServe with its batching on.

    python -m bench.peers.litserve_peer --specs specs.json --port 8102 [--max-batch-size 32] [--batch-timeout 0.001]

One LitAPI per workload on aeserve's route. LitServe's API server (uvicorn) reads the raw body (a
`bytes` body parameter: no JSON) and queues it to the inference worker process, which per request
decodes it (`decode_request`), stacks up to `max_batch_size` items waiting at most `batch_timeout`
seconds (`batch`), runs one `session.run` per batch (`predict`, intra-op threads = every core,
spinning off), splits (`unbatch`) and encodes each answer (`encode_response`), all with
`bench.peers.common`'s codecs.
"""
# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run time to
# build the route, and a string annotation would not name the raw-body type.

import argparse
import os
from typing import Annotated, Any

import litserve as ls
import numpy as np
from fastapi import Body, Response

from bench.peers.common import PeerSpec, decode_request, encode_answer, make_session, read_specs

RawBody = Annotated[bytes, Body(media_type="application/octet-stream")]


class OnnxAPI(ls.LitAPI):
    """One workload: bytes in, ONNX Runtime on the batch, bytes out."""

    def __init__(self, spec: PeerSpec, max_batch_size: int, batch_timeout: float, threads: int) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=spec.route)
        self.workload = spec
        self.threads = threads

    def setup(self, device: str) -> None:
        self.session = make_session(self.workload.onnx, self.threads)

    def decode_request(self, request: RawBody) -> np.ndarray:
        return decode_request(self.workload.request, request)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> Any:
        return self.session.run([self.workload.output], {self.workload.input: x})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, output: np.ndarray) -> Response:
        return Response(
            encode_answer(self.workload.answer, output, self.workload.output_range), media_type=self.workload.accept
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", required=True)
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.001, help="seconds")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    apis = [OnnxAPI(spec, args.max_batch_size, args.batch_timeout, args.threads) for spec in read_specs(args.specs)]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
