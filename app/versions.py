"""Model versions: which stored versions of a model are served (its version policy), which one a
request reaches, and the leases that let a retired version drain before it is freed.

A policy is one of
  `latest:N`  the N newest versions that load (numeric order: "10" > "9", see `version_key`)
  `all`       every version that loads
  `pinned:V`  version V only
`AESERVE_VERSION_POLICY` holds comma-separated entries: one without `=` is the default of every model,
`model=policy` overrides it for one model, e.g. `latest:1,stem-ae=latest:2,v3-small-201=pinned:1`.
A model's folder may hold `policy.json` (`{"policy": "pinned:3"}`), read at start-up and at every
reload, so a pin can change without a restart. Precedence: the setting's entry for the model, then
`policy.json`, then the setting's default.

The default version of a model (its plain routes) is its newest served version that is ready (under
`pinned`, the pinned one). Versions that failed to load are skipped by `latest`/`all`, so a broken new
version leaves the one before it serving.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from app.errors import ModelNotFound
from app.schemas.store_format import MANIFEST_NAME, StoreError, model_dirs, version_dirs

if TYPE_CHECKING:
    from app.store import ModelRecord, ModelRegistry

POLICY_FILE = "policy.json"
VERSION_HEADER = "X-Model-Version"  # names the version that served a model response
POLICY_GRAMMAR = "latest:N | all | pinned:VERSION"
_POLICY = re.compile(r"^(?:latest:(?P<count>[1-9]\d{0,3})|(?P<all>all)|pinned:(?P<version>[\w.+-]{1,64}))$")
_MODEL_NAME = re.compile(r"^[\w.+-]{1,128}$")

Signature = tuple[int, int, int, int]  # (mtime_ns, ctime_ns, size, inode) of manifest.json: republishing changes it


@dataclass(frozen=True)
class VersionPolicy:
    """What a model serves: its `count` newest versions, all of them, or one pinned version."""

    kind: Literal["latest", "all", "pinned"] = "latest"
    count: int = 1
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest:N`, `all` or `pinned:V`; ValueError naming the grammar otherwise."""
        match = _POLICY.match(text.strip())
        if match is None:
            raise ValueError(f"version policy {text.strip()!r} is not one of {POLICY_GRAMMAR}")
        if match["count"]:
            return cls("latest", int(match["count"]))
        if match["all"]:
            return cls("all", 0)
        return cls("pinned", 1, match["version"])

    def select(self, versions: Sequence[str]) -> list[str]:
        """The versions served out of `versions` (usable ones, oldest first), oldest first."""
        if self.kind == "pinned":
            return [self.version] if self.version in versions else []
        if self.kind == "all":
            return list(versions)
        return list(versions[-self.count :])

    def __str__(self) -> str:
        if self.kind == "pinned":
            return f"pinned:{self.version}"
        return "all" if self.kind == "all" else f"latest:{self.count}"


@dataclass(frozen=True)
class PolicyTable:
    """The policies of `AESERVE_VERSION_POLICY`: a default and per-model overrides."""

    default: VersionPolicy = VersionPolicy()
    overrides: dict[str, VersionPolicy] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> PolicyTable:
        """`[default][,model=policy]...`; ValueError naming the bad entry."""
        default, overrides = VersionPolicy(), {}
        defaults = 0
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            model, sep, policy = entry.rpartition("=")
            if not sep:
                default, defaults = VersionPolicy.parse(policy), defaults + 1
                continue
            if not _MODEL_NAME.match(model.strip()):
                raise ValueError(f"version policy entry {entry!r}: {model.strip()!r} is not a model name")
            overrides[model.strip()] = VersionPolicy.parse(policy)
        if defaults > 1:
            raise ValueError(f"version policy {text!r} has {defaults} defaults (entries without model=); at most 1")
        return cls(default, overrides)

    def for_model(self, model_dir: Path) -> VersionPolicy:
        """The model's policy: its override, else its `policy.json`, else the default; StoreError for a bad file."""
        if model_dir.name in self.overrides:
            return self.overrides[model_dir.name]
        path = model_dir / POLICY_FILE
        if not path.is_file():
            return self.default
        try:
            text = json.loads(path.read_text())["policy"]
            return VersionPolicy.parse(str(text))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = "has no 'policy' key" if isinstance(exc, KeyError | TypeError) else str(exc)
            expected = f'{{"policy": "{POLICY_GRAMMAR}"}}'
            raise StoreError(f"{model_dir.name}/{POLICY_FILE} {reason} (expected {expected})") from exc


@dataclass(frozen=True)
class StoredVersion:
    """One version folder of the store, and the signature of its manifest when it was scanned."""

    model: str
    version: str
    path: Path
    signature: Signature


@dataclass
class ModelVersions:
    """A model's stored versions (oldest first) and its policy; `error`: why none can be chosen."""

    name: str
    policy: VersionPolicy
    stored: list[StoredVersion]
    error: str = ""

    def why_none(self) -> str:
        """Why the policy selects no version."""
        if self.error:
            return self.error
        if self.policy.kind == "pinned":
            have = [s.version for s in self.stored]
            return f"pinned version {self.policy.version!r} is not in the store (it has {have})"
        return "no version to serve"


def file_signature(path: Path) -> Signature:
    """(mtime_ns, ctime_ns, size, inode) of a file (a copy that keeps the mtime still gets a new ctime); zeros
    when it is missing."""
    try:
        stat = path.stat()
    except OSError:
        return (0, 0, 0, 0)
    return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)


def manifest_signature(version_dir: Path) -> Signature:
    """The signature of a version's manifest: `training export --overwrite` changes it."""
    return file_signature(version_dir / MANIFEST_NAME)


def scan_versions(root: Path, table: PolicyTable, selected: set[str] | None = None) -> dict[str, ModelVersions]:
    """Every model of the store (those `selected` names, when given) with its stored versions and policy."""
    models: dict[str, ModelVersions] = {}
    for model_dir in model_dirs(root):
        if selected is not None and model_dir.name not in selected:
            continue
        stored = [StoredVersion(model_dir.name, v.name, v, manifest_signature(v)) for v in version_dirs(model_dir)]
        try:
            policy = table.for_model(model_dir)
        except StoreError as exc:
            models[model_dir.name] = ModelVersions(model_dir.name, table.default, stored, str(exc))
            continue
        models[model_dir.name] = ModelVersions(model_dir.name, policy, stored)
    return models


def store_fingerprint(root: Path) -> tuple:
    """What the store watcher compares: every model's version folders, manifest signatures and policy file."""
    state = []
    for model_dir in model_dirs(root):
        policy = file_signature(model_dir / POLICY_FILE)
        state.append((model_dir.name, policy, tuple((v.name, manifest_signature(v)) for v in version_dirs(model_dir))))
    return tuple(state)


# ------------------------------------------------------------------------------ requests: resolve and lease
def find_version(registry: ModelRegistry, record: ModelRecord, version: str) -> ModelRecord:
    """The served `version` of `record`'s model; 404 naming the version and the served ones otherwise."""
    found = registry.get_version(record.name, version)
    if found is None:
        served = [r.version for r in registry.versions(record.name)]
        raise ModelNotFound(
            f"model {record.name!r} serves no version {version!r}", field="version", limit=served,
            code="version_not_found",
        )
    return found


@contextmanager
def leased(record: ModelRecord) -> Iterator[ModelRecord]:
    """Count a request on `record` while it runs: a retired version is freed only once none holds it."""
    record.leases += 1
    try:
        yield record
    finally:
        record.leases -= 1
