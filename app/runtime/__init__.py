"""Runtimes: one class per artifact format, each with one method `run(inputs) -> outputs`."""

from app.runtime.base import Runtime, RuntimeLoadError

__all__ = ["Runtime", "RuntimeLoadError"]
