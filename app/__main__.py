"""`python -m app [--host H] [--port P]`: run the service with uvicorn (settings from AESERVE_*)."""

from __future__ import annotations

import argparse

import uvicorn

from app.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    access_log = Settings().access_log  # AESERVE_ACCESS_LOG=true: a line per request (off by default)
    uvicorn.run(
        "app.main:create_app", factory=True, host=args.host, port=args.port, log_level=args.log_level,
        access_log=access_log,
    )


if __name__ == "__main__":
    main()
