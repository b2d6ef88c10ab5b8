"""PyTriton peer: the same ONNX files behind Triton Inference Server (bundled by nvidia-pytriton) on the CPU.

    bench/.venv-triton/bin/python -m bench.peers.triton_peer --specs specs.json --port 8103 --grpc-port 8104 \
        --metrics-port 8105 [--max-batch-size 32] [--delay-us 1000]

Runs in its own venv (nvidia-pytriton needs numpy<2): `python -m bench.peers.triton_env` builds it.
One Triton model per workload, named after it (light / middle / heavy), with one BYTES input
(`payload`: the same NPY / PNG body aeserve gets) and one BYTES output (`answer`: the same PNG / NPY
answer), sent and answered with the binary tensor extension (`bench.peers.triton_protocol`). Triton's
C++ HTTP server parses the requests; its dynamic batcher forms batches (max_batch_size, a
`--delay-us` queue window, preferred batch sizes 4/8/16/32 up to the maximum) and hands each batch to
the Python process, whose infer function decodes every body, runs one `session.run` on the batch
(intra-op threads = every core, spinning off) and encodes every answer (`bench.peers.common`).
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.peers.common import PeerSpec, answer_batch, make_session, read_specs
from bench.peers.triton_protocol import INPUT, OUTPUT


def infer_for(spec: PeerSpec, session: Any) -> Callable[..., dict[str, np.ndarray]]:
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        bodies = [bytes(row[0]) for row in inputs[INPUT]]
        answers = answer_batch(spec, session, bodies)
        return {OUTPUT: np.array([[a] for a in answers], dtype=np.object_)}

    return infer


def serve(specs: list[PeerSpec], args: argparse.Namespace) -> None:
    # Triton's Python stub loads libpython from the library path: make it this interpreter's, whose
    # standard library it then reads (a system libpython of another patch release breaks multiprocessing).
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        allow_metrics=False,
        log_verbose=0,
    )
    preferred = [b for b in (4, 8, 16, 32) if b <= args.max_batch_size]
    batcher = DynamicBatcher(max_queue_delay_microseconds=args.delay_us, preferred_batch_size=preferred)
    with Triton(config=config) as triton:
        for spec in specs:
            triton.bind(
                model_name=spec.triton_name,
                infer_func=infer_for(spec, make_session(spec.onnx, args.threads)),
                inputs=[Tensor(name=INPUT, dtype=bytes, shape=(1,))],
                outputs=[Tensor(name=OUTPUT, dtype=bytes, shape=(1,))],
                config=ModelConfig(max_batch_size=args.max_batch_size, batcher=batcher),
                strict=False,
            )
        triton.serve()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", required=True)
    parser.add_argument("--port", type=int, default=8103)
    parser.add_argument("--grpc-port", type=int, default=8104)
    parser.add_argument("--metrics-port", type=int, default=8105)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--delay-us", type=int, default=1000, help="the dynamic batcher's queue window")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    serve(read_specs(args.specs), args)


if __name__ == "__main__":
    main()
