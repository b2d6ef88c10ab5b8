"""The house rule "ruff-clean" is checked with the suite, so CI fails on a lint error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_reports_nothing() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "app", "training", "tests", "bench", "examples"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_app_never_imports_training() -> None:
    """The manifest is the only contract: no module of the service imports the training package."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "app").rglob("*.py")
                 if any(line.lstrip().startswith(("import training", "from training"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
