"""Build the PyTriton peer's venv, bench/.venv-triton (git-ignored), beside the project's own.

    .venv/bin/python -m bench.peers.triton_env [--if-missing]

nvidia-pytriton pins numpy<2, which the project's venv does not take, so the peer gets a venv of its
own: nvidia-pytriton (Triton's server bundled, CPU works; its wheel needs Linux x86_64 with glibc >=
2.35), the same onnxruntime version as the project's venv (the same engine for every server), and
Pillow. `bench.servers` finds it there, or wherever AESERVE_BENCH_TRITON_PYTHON points.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import subprocess
import sys
import venv

from bench.servers import TRITON_VENV_PYTHON

GLIBC = (2, 35)


def requirements() -> list[str]:
    try:
        ort = f"onnxruntime=={importlib.metadata.version('onnxruntime')}"
    except importlib.metadata.PackageNotFoundError:
        ort = "onnxruntime"
    return ["nvidia-pytriton", ort, "pillow"]


def check_platform() -> None:
    libc, version = platform.libc_ver()
    numbers = tuple(int(part) for part in version.split(".")[:2]) if version else ()
    if platform.system() != "Linux" or platform.machine() != "x86_64" or libc != "glibc" or numbers < GLIBC:
        raise SystemExit(f"nvidia-pytriton needs Linux x86_64 with glibc >= 2.35; this is {platform.platform()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--if-missing", action="store_true", help="do nothing when the venv exists")
    args = parser.parse_args(argv)
    if args.if_missing and TRITON_VENV_PYTHON.exists():
        return 0
    check_platform()
    root = TRITON_VENV_PYTHON.parent.parent
    venv.create(root, with_pip=True, clear=True)
    subprocess.run([str(TRITON_VENV_PYTHON), "-m", "pip", "install", "-q", *requirements()], check=True)
    print(f"PyTriton peer venv ready: {root} ({' '.join(requirements())}, Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
