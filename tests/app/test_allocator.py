"""The malloc arena cap (`app.allocator`): applied when the app is created, skipped where it must be."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

import app.main
from app.allocator import limit_malloc_arenas
from tests.app.conftest import make_settings

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_the_cap_is_set_on_glibc_and_skipped_for_zero_or_an_operator_setting(monkeypatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas(0) is False
    assert limit_malloc_arenas(8) is GLIBC  # mallopt answers 1 on success
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False  # the operator's value stands


@pytest.mark.parametrize("arenas", [0, 2])
def test_create_app_applies_the_setting_before_anything_starts(monkeypatch, tmp_path: Path, arenas: int) -> None:
    asked: list[int] = []
    monkeypatch.setattr(app.main, "limit_malloc_arenas", lambda n: asked.append(n) or False)
    app.main.create_app(make_settings(tmp_path, malloc_arenas=arenas))
    assert asked == [arenas]
