"""The house rule "ruff-clean" is checked with the suite, so CI fails on a lint error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_reports_nothing() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = ["app", "training", "tests", "bench", "examples", "aeserve_client", "deploy"]
    result = subprocess.run([ruff, "check", *paths], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_app_never_imports_training() -> None:
    """The manifest is the only contract: no module of the service imports the training package."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "app").rglob("*.py")
                 if any(line.lstrip().startswith(("import training", "from training"))
                        for line in p.read_text().splitlines())]
    assert offenders == []


def test_modules_stay_under_400_lines() -> None:
    """One job per module: no source module of the service, the training package, the bench, the client or the
    deploy scripts grows past 400 lines."""
    packages = ("app", "training", "bench", "aeserve_client", "deploy")
    long = {str(p.relative_to(REPO)): n for pkg in packages for p in (REPO / pkg).rglob("*.py")
            if not any(part.startswith(".venv") for part in p.parts) and (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
