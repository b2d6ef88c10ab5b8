"""`python -m examples.lstm_viscosity --url URL --model NAME`: prints the R² table (see pipeline.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.lstm_viscosity", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    parser.add_argument("--model", default="v3-droplet-201", help="a V3 droplet model of its store")
    parser.add_argument("--train", type=int, default=96, help="training videos")
    parser.add_argument("--heldout", type=int, default=48, help="held-out videos (R² is scored on them)")
    parser.add_argument("--frames", type=int, default=20, help="frames per video (T)")
    parser.add_argument("--epochs", type=int, default=120, help="LSTM training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--physics-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="side-strip size the physics baseline tracks the drop in (default 152 1280)")
    parser.add_argument("--token", default=None, help="bearer token, when the service sets AESERVE_API_TOKEN")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the LSTMs")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    from examples.lstm_viscosity.pipeline import PipelineConfig, format_table, run

    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    options = {k: getattr(args, k) for k in ("url", "model", "train", "heldout", "frames", "epochs", "seed", "token")}
    if args.physics_size:
        options["physics_size"] = tuple(args.physics_size)
    if args.train < 5 or args.heldout < 2:
        raise SystemExit("need at least 5 training and 2 held-out videos")
    result = run(PipelineConfig(**options), log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        payload = dataclasses.asdict(result)
        payload["config"].pop("token", None)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
