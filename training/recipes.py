"""Store recipes: `model_store/recipes/*.yaml`, one model version of the default store each.

```yaml
name: v3-small-201            # model name in the store (directory)
version: "1"
model: v3_small               # registry name
description: ...
overrides: {input_size: [201, 201], latent_strategy: conv}   # model config fields
data: {samples_per_epoch: 128}                               # data options of the family's task
train: {epochs: 40, batch_size: 8, lr: 0.002, time_budget_s: 60}   # TrainConfig fields
init_checkpoint: null         # optional safetensors weights to start from, relative to the repo
formats: [onnx, torch_export] # any of onnx, torch_export, aoti
export_batch_size: 2
max_batch_size: 32
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.export import FORMATS

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE_KEYS = (
    "name",
    "version",
    "model",
    "description",
    "overrides",
    "data",
    "train",
    "init_checkpoint",
    "formats",
    "export_batch_size",
    "max_batch_size",
)


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str
    model: str
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    formats: tuple[str, ...] = ("onnx", "torch_export")
    export_batch_size: int = 2
    max_batch_size: int = 32
    source: Path | None = None

    def train_config(self) -> TrainConfig:
        """The family's default TrainConfig with this recipe's model overrides, data and train fields."""
        from training.tasks import default_config

        if "model" in self.train or "model_overrides" in self.train or "data" in self.train:
            raise ValueError(f"recipe {self.source}: put model/data options under `overrides`/`data`, not `train`")
        base = default_config(self.model).to_dict()
        merged = {
            **base,
            **self.train,
            "model": self.model,
            "model_overrides": dict(self.overrides),
            "data": dict(self.data),
        }
        return TrainConfig.from_dict(merged)

    def init_path(self) -> Path | None:
        if not self.init_checkpoint:
            return None
        path = Path(self.init_checkpoint)
        return path if path.is_absolute() else REPO_ROOT / path


def load_recipe(path: str | Path) -> Recipe:
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: expected a mapping at the top level")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"recipe {path}: unknown key(s) {unknown}; allowed: {', '.join(RECIPE_KEYS)}")
    for key in ("name", "version", "model"):
        if key not in data:
            raise ValueError(f"recipe {path}: missing required key {key!r}")
    formats = tuple(data.get("formats", ("onnx", "torch_export")))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"recipe {path}: unknown format(s) {bad}; allowed: {', '.join(FORMATS)}")
    values = {**data, "version": str(data["version"]), "formats": formats, "source": path}
    for key in ("overrides", "data", "train"):
        values[key] = dict(values.get(key) or {})
    return Recipe(**values)


def load_recipes(directory: str | Path) -> list[Recipe]:
    """Every `*.yaml` recipe of a directory, sorted by file name; duplicate names are an error."""
    recipes = [load_recipe(p) for p in sorted(Path(directory).glob("*.yaml"))]
    seen: dict[tuple[str, str], Path | None] = {}
    for recipe in recipes:
        key = (recipe.name, recipe.version)
        if key in seen:
            raise ValueError(f"recipes {seen[key]} and {recipe.source} both build {recipe.name}/{recipe.version}")
        seen[key] = recipe.source
    return recipes
