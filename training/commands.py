"""The subcommands of `python -m training` (the parser and `main` live in `training.__main__`).

Each `cmd_<name>(args)` takes the parsed arguments and returns the process exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

RUNS_DIR = Path("runs")


def _load_init(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise SystemExit(f"--init {path}: no such file")
    return load_file(path)


def _config_from_args(args: argparse.Namespace) -> tuple[Any, str | None]:
    """TrainConfig of train/resume: the checkpoint's when resuming, else the family default; then flags."""
    from training.checkpoint import CheckpointDir, load_checkpoint
    from training.config import TrainConfig, apply_overrides
    from training.tasks import default_config

    resume = args.resume
    out = Path(args.out) if args.out else None
    if resume:
        if out is None and resume not in ("latest", "best") and not str(resume).isdigit():
            candidate = Path(resume)
            out = candidate if candidate.is_dir() else candidate.parent.parent
        if out is None:
            if not args.model:
                raise SystemExit("--resume latest needs --out RUN_DIR or --model NAME (run dir runs/NAME)")
            out = RUNS_DIR / args.model
        state = load_checkpoint(CheckpointDir(out / "checkpoints").resolve(resume))
        config = TrainConfig.from_dict(state["train_config"])
        if args.model and args.model != config.model:
            raise SystemExit(f"--model {args.model} but the checkpoint trains {config.model}")
        if args.set:
            raise SystemExit("--set cannot change a resumed run's model or data; start a new run instead")
        done = int(state["epoch"])
    else:
        if not args.model:
            raise SystemExit("train needs --model NAME (or --resume)")
        out = out or RUNS_DIR / args.model
        config = apply_overrides(default_config(args.model), args.set or [])
        done = 0
    changes: dict[str, Any] = {}
    for flag, name in (
        ("epochs", "epochs"),
        ("batch_size", "batch_size"),
        ("lr", "lr"),
        ("amp", "amp"),
        ("grad_accum", "grad_accum"),
        ("seed", "seed"),
        ("time_budget_s", "time_budget_s"),
        ("device", "device"),
        ("max_steps_per_epoch", "max_steps_per_epoch"),
        ("lr_decay_steps", "lr_decay_steps"),
        ("lr_warmup_steps", "lr_warmup_steps"),
        ("keep_last", "keep_last"),
        ("min_free_disk_mb", "min_free_disk_mb"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "more_epochs", None) is not None:
        if "epochs" in changes:
            raise SystemExit("give either --epochs or --more-epochs, not both")
        changes["epochs"] = done + args.more_epochs
    if resume and "time_budget_s" not in changes:
        changes["time_budget_s"] = 0.0  # a budget belongs to one invocation
    return config.replace(**changes), str(out)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) one run; under torchrun every process runs this and DDP shares the run."""
    from training.distributed import from_environment
    from training.loop import train

    config, out = _config_from_args(args)
    started = time.monotonic()
    result = train(
        config,
        out,
        resume=args.resume,
        progress=not args.no_progress,
        init_state=_load_init(getattr(args, "init", None)),
    )
    summary = {
        "out": str(result.out_dir),
        "epochs_completed": result.epochs_completed,
        "step": result.step,
        "stopped": result.stopped,
        "best_val_loss": result.best_val_loss,
        "val": result.val,
        "wall_s": round(time.monotonic() - started, 2),
    }
    if from_environment().is_main:  # under torchrun, one summary (rank 0's; every rank has the same)
        print(json.dumps(summary, default=float))
    return 0 if result.stopped in ("done", "time_budget") else 130


def cmd_resume(args: argparse.Namespace) -> int:
    args.resume = args.which
    args.out = args.run_dir
    return cmd_train(args)


def _model_from_checkpoint(path: str) -> tuple[Any, dict[str, Any]]:
    from training.checkpoint import CheckpointDir, load_checkpoint
    from training.config import TrainConfig
    from training.tasks import build_model

    state = load_checkpoint(CheckpointDir(".").resolve(path))
    config = TrainConfig.from_dict(state["train_config"])
    model = build_model(config)
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), state


def _training_summary(state: dict[str, Any]) -> dict[str, Any]:
    epochs = state["history"]["epochs"]
    return {
        "steps": state["step"],
        "epochs": state["epoch"],
        "val": epochs[-1]["val"] if epochs else {},
        "best_val_loss": state["best_val_loss"],
        "train_config": state["train_config"],
    }


def cmd_export(args: argparse.Namespace) -> int:
    from training.store import write_version

    model, state = _model_from_checkpoint(args.checkpoint)
    name = args.name or state["model_name"].replace("_", "-")
    path = write_version(
        model,
        args.store,
        name,
        args.version,
        formats=args.formats.split(","),
        training=_training_summary(state),
        description=args.description,
        overwrite=args.overwrite,
        log=print,
    )
    print(f"wrote {path}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """Checkpoint -> plain safetensors weights (e.g. a recipe's committed `init_checkpoint`)."""
    from training.store import save_weights

    model, state = _model_from_checkpoint(args.checkpoint)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, out, half=args.fp16)
    dtype = "float16" if args.fp16 else "as trained"
    print(f"wrote {out} ({state['model_name']}, epoch {state['epoch']}, step {state['step']}, {dtype})")
    return 0


def cmd_build_store(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from training.build_store import build_in_worker, build_recipe
    from training.recipes import load_recipes
    from training.store import version_is_valid

    store = Path(args.store)
    recipes_dir = Path(args.recipes) if args.recipes else store / "recipes"
    recipes = load_recipes(recipes_dir)
    if args.only:
        wanted = set(args.only)
        unknown = wanted - {r.name for r in recipes}
        if unknown:
            raise SystemExit(
                f"--only {sorted(unknown)}: no such recipe in {recipes_dir} "
                f"(have: {', '.join(r.name for r in recipes)})"
            )
        recipes = [r for r in recipes if r.name in wanted]
    todo = [r for r in recipes if not (args.if_missing and version_is_valid(store / r.name / r.version))]
    jobs = max(1, min(args.jobs or (os.cpu_count() or 1), len(todo) or 1))
    print(
        f"build-store: {len(todo)} of {len(recipes)} recipe(s) to build into {store} ({jobs} job(s))",
        flush=True,
    )
    started = time.monotonic()
    timings: dict[str, float] = {}
    bar = tqdm(total=len(todo), desc="build-store", unit="model", disable=args.no_progress)
    if jobs == 1:
        for recipe in todo:
            begun = time.monotonic()
            path = build_recipe(recipe, store, Path(args.runs), progress=not args.no_progress)
            timings[recipe.name] = round(time.monotonic() - begun, 1)
            bar.update(1)
            tqdm.write(f"built {path} in {timings[recipe.name]} s")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [
                pool.submit(build_in_worker, str(r.source), str(store), args.runs, args.threads or 1, args.imports)
                for r in todo
            ]
            for future in as_completed(futures):
                name, path, seconds = future.result()
                timings[name] = seconds
                bar.update(1)
                tqdm.write(f"built {path} in {seconds} s")
    bar.close()
    print(json.dumps({"built": timings, "total_s": round(time.monotonic() - started, 1), "jobs": jobs}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The held-out quality report of a store (`training.quality`): table, JSON, figures, manifests."""
    from training.quality.report import REPORT_NAME, evaluate_store, format_table

    started = time.monotonic()
    command = "python -m training evaluate --store {} --out {}{}".format(
        args.store, args.out, "".join(f" --only {name}" for name in args.only or ())
    )
    records = evaluate_store(
        args.store, args.out, only=args.only, write_manifests=not args.no_manifest, command=command
    )
    print(format_table(records))
    misses = [name for name, r in records.items() if r["goal"] and r["goal"]["status"] != "PASS"]
    print(
        f"\ngoals: {len(misses)} missed ({', '.join(misses) or 'none'}); report {Path(args.out) / REPORT_NAME}, "
        f"{round(time.monotonic() - started, 1)} s"
    )
    return 0


def _save_grid(images: Any, path: Path) -> None:
    import numpy as np
    from PIL import Image

    arr = images.detach().float().cpu().numpy()
    if float(arr.min()) < 0:  # tanh outputs
        arr = (arr + 1) / 2
    arr = np.clip(arr, 0, 1)
    n, c, h, w = arr.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = arr[i].transpose(1, 2, 0)
    grid = (grid * 255).round().astype(np.uint8)
    Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3]).save(path)


def cmd_sample(args: argparse.Namespace) -> int:
    """A PNG grid from a checkpoint, by the model's sampler: decoded prior draws (prior_gaussian), the
    rendered image (fixed_render), DDIM samples over a grid of conditions (ddim); a model without a
    sampler shows validation images above their reconstructions."""
    import torch

    from training.tasks import task_for_model

    model, state = _model_from_checkpoint(args.checkpoint)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    kind = model.sampler_spec().get("kind") if hasattr(model, "sampler_spec") else None
    with torch.no_grad():
        if kind == "ddim":
            from training.data.layouts import condition_grid
            from training.visualize_diffusion import sample_grid_png

            conditions = condition_grid(n_per_format=-(-args.n // 4))[: args.n]
            sample_grid_png(model, None, conditions, out, steps=args.steps, seed=args.seed)
            print(f"wrote {out} ({conditions.shape[0]} DDIM samples, {args.steps} steps)")
            return 0
        if kind == "prior_gaussian":
            images = model.decode(torch.randn(args.n, model.sampler_spec()["latent_dim"]))
        elif kind == "fixed_render":
            images = model()
        else:
            from training.config import TrainConfig

            _, val = task_for_model(model).datasets(model, TrainConfig.from_dict(state["train_config"]))
            originals = torch.stack([val[i]["image"] for i in range(min(args.n, len(val)))])
            images = torch.cat([originals, model(originals)])
    _save_grid(images, out)
    print(f"wrote {out} ({tuple(images.shape)})")
    return 0
