"""How the conformance tests measure agreement with the original code's fixtures.

The error of a tensor is its largest absolute difference from the fixture divided by
max(1, max |fixture|): absolute for values of order one, relative for larger activations, since
float32 rounding grows with the magnitude of what a kernel sums. The fixtures were recorded on another
machine, and other CPUs pick other kernels (AVX-512, AVX2, SSE), which sum in another order. So each
bound is at least 4 times the largest error measured (the tests print theirs: pytest -s) on an AVX-512
Xeon both natively and with narrower kernels forced, as on an AVX2-only or an old CPU:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 pytest -s tests/contract
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 pytest -s tests/contract

The narrower kernels roughly double or triple the errors of the native run.
"""

from __future__ import annotations

import torch


def scaled_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max(1, max |theirs|), in float64; shapes must agree."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    if not theirs.numel():
        return 0.0
    theirs64 = theirs.detach().double()
    diff = (ours.detach().double() - theirs64).abs().max()
    return float(diff / max(1.0, float(theirs64.abs().max())))


def report(title: str, errors: dict[str, float]) -> None:
    """Print the measured errors of one case (visible with pytest -s)."""
    print(f"\n{title}: " + ", ".join(f"{key}={err:.2e}" for key, err in errors.items()))
