"""`python -m training train|resume|export|weights|build-store|sample|evaluate ...` (see `--help` of each)."""

from __future__ import annotations

import argparse
import importlib
import sys

from training.commands import (
    RUNS_DIR,
    cmd_build_store,
    cmd_evaluate,
    cmd_export,
    cmd_resume,
    cmd_sample,
    cmd_train,
    cmd_weights,
)


def _threads(count: int) -> None:
    import torch

    if count > 0:
        torch.set_num_threads(count)


def _add_train_flags(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("--model", help="registry name, e.g. v3_small")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="model config field (KEY), data option (data.KEY) or TrainConfig field (train.KEY)",
        )
        p.add_argument("--out", help="run directory (default runs/MODEL)")
        p.add_argument("--resume", help="checkpoint to continue from: latest, best, an epoch number or a path")
        p.add_argument("--init", help="safetensors weights to start a new run from")
    p.add_argument("--epochs", type=int, help="train until this many epochs are complete")
    p.add_argument("--more-epochs", type=int, help="with --resume: train this many epochs more")
    p.add_argument(
        "--batch-size", type=int, help="samples per micro-batch; under torchrun the global batch, split over the ranks"
    )
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--amp",
        nargs="?",
        const="auto",
        choices=["off", "auto", "bf16", "fp16"],
        help="mixed precision (bare --amp = auto: bf16 on CPU, fp16 + GradScaler on CUDA)",
    )
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--time-budget-s", type=float)
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--lr-decay-steps", type=int)
    p.add_argument("--lr-warmup-steps", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--keep-last",
        type=int,
        metavar="N",
        help="keep the newest N epoch checkpoints besides best.ckpt and latest.ckpt (default 3; "
        "0 = only best and latest); older ones are deleted once the new one is safely written",
    )
    p.add_argument(
        "--min-free-disk-mb",
        type=float,
        metavar="MB",
        help="free disk space (MiB) that must remain after each checkpoint write (default: the "
        "checkpoint's own size, so a write needs twice its size free); a write that would not fit, or "
        "a full disk during the write, stops the run with an error (exit status 2) and the newest "
        "good checkpoint intact",
    )
    p.add_argument("--no-progress", action="store_true")


def _add_build_store_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-store", help="build the model store from its recipes")
    p.add_argument("--store", default="model_store")
    p.add_argument("--recipes", help="recipe directory (default STORE/recipes)")
    p.add_argument("--runs", default=str(RUNS_DIR / "store"), help="where the training runs go")
    p.add_argument("--if-missing", action="store_true", help="skip versions already present and valid")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="recipes built side by side, each in its own single-threaded process (default: CPU count); "
        "1 = one after another in this process, with --threads torch threads",
    )
    p.add_argument("--only", action="append", metavar="NAME", help="build only this recipe (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build_store)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module that registers extra models/tasks (plug-ins, tests)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train a model (or continue with --resume); under torchrun, with DDP over the processes"
    )
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run: resume RUN_DIR [latest|best|EPOCH] --more-epochs K")
    p.add_argument("run_dir")
    p.add_argument("which", nargs="?", default="latest")
    _add_train_flags(p, with_model=False)
    p.set_defaults(func=cmd_resume, model=None, set=None, init=None)

    p = sub.add_parser("export", help="checkpoint -> model store version")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (its latest)")
    p.add_argument("--store", default="model_store")
    p.add_argument("--name", help="store model name (default: the registry name with '-')")
    p.add_argument("--version", default="1")
    p.add_argument("--formats", default="onnx,torch_export", help="comma list of onnx, torch_export, aoti")
    p.add_argument("--description", default="")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("weights", help="checkpoint -> safetensors weights (a recipe's init_checkpoint)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fp16", action="store_true", help="floating tensors as float16 (half the size; loading upcasts)")
    p.set_defaults(func=cmd_weights)

    _add_build_store_command(sub)

    p = sub.add_parser("sample", help="write a PNG grid of samples (or reconstructions) from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (diffusion models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="held-out quality report of a store (table, JSON, figures, manifests)")
    p.add_argument("--store", default="model_store")
    p.add_argument("--only", action="append", metavar="NAME", help="evaluate only this model (repeatable)")
    p.add_argument("--out", default="reports/quality", help="where quality.json and the figures go")
    p.add_argument("--no-manifest", action="store_true", help="leave the manifests' metrics.heldout as they are")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _threads(args.threads)
    for module in args.imports:
        importlib.import_module(module)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from training.checkpoint import CheckpointError

        if isinstance(exc, CheckpointError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
