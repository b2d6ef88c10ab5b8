"""Readers of the container files for tests/test_deploy.py, which checks them without a Docker engine.

- `Dockerfile`: instructions (continuation lines joined, comments dropped) grouped into build stages;
- `DockerIgnore`: the build-context filter (.dockerignore: last matching pattern wins, `!` re-includes,
  a pattern that matches a folder matches everything under it, `*` stays within one path segment, `**`
  spans any number);
- `compose_config`: a compose file (or a base plus overrides) as `docker compose config` would see it,
  with `${NAME:-default}` interpolated and overrides merged (mappings key by key, sequences replaced).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the (joined) line


@dataclass
class Stage:
    name: str
    base: str  # the image or stage after FROM
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


class Dockerfile:
    """The stages of a Dockerfile; `stages[-1]` is what `docker build` makes without --target."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.args: dict[str, str] = {}  # ARG defaults, global and per stage (names are unique here)
        self.stages: list[Stage] = []
        for instruction in self._instructions(path.read_text()):
            if instruction.keyword == "FROM":
                words = instruction.args.split()
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(self.stages))
                self.stages.append(Stage(name=name, base=words[0]))
            elif self.stages:
                self.stages[-1].instructions.append(instruction)
            if instruction.keyword == "ARG" and "=" in instruction.args:
                key, value = instruction.args.split("=", 1)
                self.args[key.strip()] = value.strip()

    @staticmethod
    def _instructions(text: str) -> Iterable[Instruction]:
        pending = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            keyword, _, args = line.partition(" ")
            yield Instruction(keyword.upper(), args.strip())

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def chain(self, name: str) -> list[Stage]:
        """`name` and every stage it needs (FROM and COPY --from), in file order."""
        names = {s.name for s in self.stages}
        needed: set[str] = set()
        todo = [name]
        while todo:
            stage = self.stage(todo.pop())
            needed.add(stage.name)
            sources = [stage.base, *re.findall(r"--from=(\S+)", " ".join(i.args for i in stage.all("COPY")))]
            todo.extend(s for s in sources if s in names and s not in needed)
        return [s for s in self.stages if s.name in needed]

    def copied_sources(self) -> list[str]:
        """Build-context paths of every COPY/ADD that does not copy from another stage."""
        sources: list[str] = []
        for stage in self.stages:
            for instruction in stage.all("COPY") + stage.all("ADD"):
                words = shlex.split(instruction.args)
                if any(w.startswith("--from") for w in words):
                    continue
                sources.extend([w for w in words if not w.startswith("--")][:-1])
        return sources


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """A .dockerignore file: `excluded("a/b.py")` tells whether that path stays out of the build context."""

    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = line[1:].strip() if negated else line
            pattern = pattern.strip("/")
            self.rules.append((negated, _pattern_regex(pattern)))

    def excluded(self, relative: str) -> bool:
        parts = relative.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]  # the path and its parents
        result = False
        for negated, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not negated
        return result


_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME-default}` and `${NAME:-default}` (`:-` also replaces an empty value)."""

    def value(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        if name in env and (operator != ":-" or env[name]):
            return env[name]
        return default or ""

    return _VARIABLE.sub(value, text)


def merge(base: Any, override: Any) -> Any:
    """Compose-style override: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def compose_config(*paths: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The effective configuration of `docker compose -f paths[0] -f paths[1] ...`."""
    config: dict[str, Any] = {}
    for path in paths:
        config = merge(config, yaml.safe_load(interpolate(path.read_text(), env or {})))
    return config


def parse_volume(entry: str) -> tuple[str, str, str]:
    """Short volume syntax `source:target[:mode]` -> (source, target, mode); mode defaults to rw."""
    source, target, *rest = entry.split(":")
    return source, target, rest[0] if rest else "rw"
