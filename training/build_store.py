"""Build model-store versions from recipes: train (time-boxed), pick the weights, export, write.

`build_recipe` does one recipe in this process; `build_in_worker` is the same in a worker process of
`python -m training build-store --jobs N`.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

from training.recipes import Recipe


def select_weights(result: Any) -> tuple[Any, dict[str, float], str]:
    """The weights a store version gets: the final ones, or the best epoch's when those validated better
    (a time budget can stop a run in a worse spot). Returns (model, its validation, which weights)."""
    from training.checkpoint import CheckpointDir, load_checkpoint

    best = CheckpointDir(result.out_dir / "checkpoints").best
    if not result.val or not best.is_file() or result.best_val_loss >= result.val["loss"]:
        return result.model, result.val, "final"
    state = load_checkpoint(best)
    result.model.load_state_dict(state["model"], strict=True)
    record = next(r for r in state["history"]["epochs"] if r["epoch"] == state["epoch"])
    return result.model, record["val"], f"best epoch {state['epoch']}"


def build_recipe(recipe: Recipe, store: Path, runs: Path, progress: bool = True, overwrite: bool = True) -> Path:
    """Train (from the recipe's init weights if any) and export one recipe into the store."""
    import shutil

    from training.loop import train
    from training.store import write_version

    config = recipe.train_config()
    run_dir = runs / f"{recipe.name}-{recipe.version}"
    shutil.rmtree(run_dir, ignore_errors=True)
    init = None
    init_used = None
    if recipe.init_path() is not None:
        from safetensors.torch import load_file

        if recipe.init_path().is_file():
            init = load_file(str(recipe.init_path()))
            init_used = recipe.init_checkpoint
        else:
            print(
                f"WARNING: recipe {recipe.source}: init_checkpoint {recipe.init_checkpoint} is missing; "
                "starting from the random initialisation (plus the training the recipe asks for)",
                file=sys.stderr,
                flush=True,
            )
    result = train(config, run_dir, progress=progress, init_state=init)
    model, val, selected = select_weights(result)
    training = {
        "steps": result.step,
        "epochs": result.epochs_completed,
        "stopped": result.stopped,
        "wall_s": round(result.wall_s, 2),
        "weights": selected,
        "val": val,
        "best_val_loss": result.best_val_loss,
        "init_checkpoint": init_used,
        "train_config": config.to_dict(),
        "recipe": recipe.source.name if recipe.source else None,
    }
    say = (lambda msg: print(f"  [{recipe.name}] {msg}", flush=True)) if progress else None
    return write_version(
        model,
        store,
        recipe.name,
        recipe.version,
        formats=recipe.formats,
        training=training,
        description=recipe.description,
        extra_files=[run_dir / "log.json", *sorted(run_dir.glob("*.png"))],  # loss curve, maps, samples
        export_batch_size=recipe.export_batch_size,
        max_batch_size=recipe.max_batch_size,
        overwrite=overwrite,
        log=say,
        command=f"python -m training build-store (recipe {recipe.source})",
    )


def build_in_worker(
    recipe_path: str, store: str, runs: str, threads: int, imports: list[str]
) -> tuple[str, str, float]:
    """One recipe in a worker process (`build-store --jobs N`): N single-threaded builds side by side use
    N cores without the thread oversubscription that stalls multi-threaded torch on a busy machine."""
    import torch

    from training.recipes import load_recipe

    torch.set_num_threads(threads)
    for module in imports:
        importlib.import_module(module)
    begun = time.monotonic()
    recipe = load_recipe(recipe_path)
    path = build_recipe(recipe, Path(store), Path(runs), progress=False)
    return recipe.name, str(path), round(time.monotonic() - begun, 1)
