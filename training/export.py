"""Export a model's `ExportOp`s and prove each artifact computes what eager torch computes.

For every op (see `training/models/base.py`):
  1. ONNX (opset >= 18, dynamo exporter, one self-contained file): batch axis dynamic, plus H/W when
     `op.dynamic_hw`; compared with eager torch in onnxruntime (CPU, 1 thread) at the example shape,
     at every `op.check_shapes` and at another batch size;
  2. a fused `torch.export` program (`.pt2`): BatchNorm folded into the convolution before it
     (`fold_batchnorm`, a real weight fold found on the torch.fx graph), eval mode;
  3. an AOTInductor package compiled from that program (`.aoti.pt2`), when asked.
Each artifact records max |artifact - eager| per verified input shape; an error above
`PARITY_ATOL * max(1, max|eager|)` raises `ExportParityError` naming the op, format and shape.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from training.models.base import ExportOp

ONNX_OPSET = 18
PARITY_ATOL = 1e-4
FORMATS: tuple[str, ...] = ("onnx", "torch_export", "aoti")
FILE_SUFFIX = {"onnx": ".onnx", "torch_export": ".pt2", "aoti": ".aoti.pt2"}

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ExportParityError(RuntimeError):
    """An exported artifact disagrees with eager torch beyond the tolerance."""


@dataclass
class ArtifactResult:
    format: str
    op: str
    path: Path
    parity_max_abs_err: dict[str, float]
    seconds: float


@dataclass
class OpExport:
    """Everything the store needs to describe one exported op."""

    op: ExportOp
    inputs: list[dict[str, Any]]  # TensorSpec fields: name, dtype, shape (-1 = dynamic)
    outputs: list[dict[str, Any]]
    shape_buckets: list[list[int]]
    artifacts: list[ArtifactResult] = field(default_factory=list)
    folded_pairs: int = 0


# --- Conv-BN folding -----------------------------------------------------------------------------------


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _fold_in(module: nn.Module) -> int:
    """Fold conv->BN pairs of `module` in place; recurse into children where fx cannot trace."""
    try:
        graph_module = torch.fx.symbolic_trace(module)
    except Exception:  # data-dependent python control flow: fold inside the children instead
        return sum(_fold_in(child) for child in module.children())
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) not in _BATCHNORMS or len(node.args) != 1:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv, bn = modules.get(source.target), modules[node.target]
        if (
            type(conv) not in _CONVS
            or len(source.users) != 1
            or calls[source.target] != 1
            or calls[node.target] != 1
            or bn.running_mean is None
        ):
            continue
        transpose = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        _set_submodule(module, source.target, fuse_conv_bn_eval(conv.eval(), bn.eval(), transpose=transpose))
        _set_submodule(module, node.target, nn.Identity())
        folded += 1
    return folded


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode deep copy of `module` with every BatchNorm that directly follows a convolution (and is
    that convolution's only consumer) folded into its weights. Returns (folded copy, pairs folded)."""
    folded = copy.deepcopy(module).eval()
    pairs = _fold_in(folded)
    return folded.eval(), pairs


def batchnorm_modules(module: nn.Module) -> list[str]:
    """Names of the BatchNorm modules (any subclass) left in `module`."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --- inputs and comparisons ------------------------------------------------------------------------------


def shape_key(shapes: Iterable[Iterable[int]]) -> str:
    """`((2,1,201,201),)` -> "2x1x201x201" (inputs joined by ","); an op without inputs -> "no_input"."""
    return ",".join("x".join(str(d) for d in shape) for shape in shapes) or "no_input"


def make_inputs(
    examples: tuple[torch.Tensor, ...], shapes: tuple[tuple[int, ...], ...], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the given shapes that look like the examples (dtype and value range)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for example, shape in zip(examples, shapes, strict=True):
        if example.dtype.is_floating_point:
            unit = bool(example.numel()) and float(example.min()) >= 0 and float(example.max()) <= 1
            value = torch.rand(shape, generator=generator) if unit else torch.randn(shape, generator=generator)
            out.append(value.to(example.dtype))
        else:
            low = int(example.min()) if example.numel() else 0
            high = int(example.max()) + 1 if example.numel() else 2
            out.append(torch.randint(low, max(high, low + 1), shape, generator=generator, dtype=example.dtype))
    return tuple(out)


def verification_shapes(op: ExportOp) -> list[tuple[tuple[int, ...], ...]]:
    """The example shapes, every `check_shapes` entry and the example at another batch size."""
    example = tuple(tuple(t.shape) for t in op.example_inputs)
    other_batch = tuple((s[0] + 1, *s[1:]) if s else s for s in example)
    shapes = [example, *[tuple(tuple(s) for s in c) for c in op.check_shapes], other_batch]
    return list(dict.fromkeys(shapes))


def _as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def max_abs_err(got: tuple[Any, ...], want: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(max |got - want| over all outputs, max |want|)."""
    if len(got) != len(want):
        raise ExportParityError(f"artifact returned {len(got)} outputs, eager torch {len(want)}")
    err, scale = 0.0, 0.0
    for g, w in zip(got, want, strict=True):
        g = torch.as_tensor(g).detach().float().cpu()
        w = w.detach().float().cpu()
        if tuple(g.shape) != tuple(w.shape):
            raise ExportParityError(f"artifact output shape {tuple(g.shape)} != eager {tuple(w.shape)}")
        if w.numel():
            err = max(err, float((g - w).abs().max()))
            scale = max(scale, float(w.abs().max()))
    return err, scale


class EagerReference:
    """Eager outputs of the reference module at the verification shapes, computed once and shared by the
    formats (the inputs are a pure function of the shape index, so every format sees the same ones)."""

    def __init__(self, module: nn.Module, op: ExportOp) -> None:
        self.module = module
        self.op = op
        self._cases: dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}

    def case(self, index: int, shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple, tuple]:
        if index not in self._cases:
            op = self.op
            inputs = op.example_inputs if index == 0 else make_inputs(op.example_inputs, shapes, seed=index)
            with torch.no_grad():
                self._cases[index] = (inputs, _as_tuple(self.module(*inputs)))
        return self._cases[index]


def check_parity(
    run: Callable[[tuple[torch.Tensor, ...]], tuple[Any, ...]],
    reference: nn.Module | EagerReference,
    op: ExportOp,
    fmt: str,
    atol: float = PARITY_ATOL,
) -> dict[str, float]:
    """Max abs error of `run` vs eager `reference` at every verification shape; raises above tolerance."""
    if not isinstance(reference, EagerReference):
        reference = EagerReference(reference, op)
    errors: dict[str, float] = {}
    for index, shapes in enumerate(verification_shapes(op)):
        inputs, want = reference.case(index, shapes)
        err, scale = max_abs_err(_as_tuple(run(inputs)), want)
        key = shape_key(shapes)
        errors[key] = err
        if not err <= atol * max(1.0, scale):
            raise ExportParityError(
                f"{fmt} export of op {op.name!r} differs from eager torch at input shape "
                f"{key}: max abs err {err:.3g} > {atol:g} x max(1, {scale:.3g})"
            )
    return errors


# --- the three formats ------------------------------------------------------------------------------------


def dynamic_shapes(op: ExportOp) -> tuple[dict[int, Any], ...] | None:
    """Axis 0 of every input is dynamic; axes 2/3 of 4-D inputs too when `op.dynamic_hw`."""
    if not op.example_inputs:
        return None
    auto = torch.export.Dim.AUTO
    spec = []
    for tensor in op.example_inputs:
        axes: dict[int, Any] = {0: auto} if tensor.dim() >= 1 else {}
        if op.dynamic_hw and tensor.dim() == 4:
            axes.update({2: auto, 3: auto})
        spec.append(axes)
    return tuple(spec)


def export_onnx(program: torch.export.ExportedProgram, op: ExportOp, path: Path) -> Path:
    """ONNX from an exported program (its dynamic axes carry over), one self-contained file."""
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            program,
            op.example_inputs,
            str(path),
            input_names=op.input_names,
            output_names=op.output_names,
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return path


def onnx_runner(path: Path, input_names: list[str]) -> Callable[[tuple[torch.Tensor, ...]], tuple[Any, ...]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if names != list(input_names):
        raise ExportParityError(f"ONNX inputs {names} != op input names {input_names}")

    def run(inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feeds))

    return run


def export_program(module: nn.Module, op: ExportOp) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, op.example_inputs, dynamic_shapes=dynamic_shapes(op))


def _signature(inputs: list[torch.Tensor], names: list[str], dynamic: Callable[[int, int], bool]) -> list[dict]:
    specs = []
    for tensor, name in zip(inputs, names, strict=True):
        shape = [-1 if dynamic(i, tensor.dim()) else int(d) for i, d in enumerate(tensor.shape)]
        specs.append({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": shape})
    return specs


def export_op(
    op: ExportOp,
    out_dir: str | Path,
    formats: Iterable[str] = FORMATS,
    atol: float = PARITY_ATOL,
    log: Callable[[str], None] | None = None,
) -> OpExport:
    """Export one op to the requested formats in `out_dir` (files named `<op>.<suffix>`), verified."""
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; allowed: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = EagerReference(copy.deepcopy(op.module).eval(), op)
    folded, pairs = fold_batchnorm(op.module)
    outputs = reference.case(0, tuple(tuple(t.shape) for t in op.example_inputs))[1]
    hw, batched = op.dynamic_hw, bool(op.example_inputs)

    def dynamic(axis: int, ndim: int) -> bool:
        return batched and (axis == 0 or (hw and ndim == 4 and axis >= 2))

    result = OpExport(
        op=op,
        inputs=_signature(list(op.example_inputs), op.input_names, dynamic),
        outputs=_signature(list(outputs), op.output_names, dynamic),
        shape_buckets=[list(c[0][2:4]) for c in op.check_shapes if hw and len(c[0]) == 4],
        folded_pairs=pairs,
    )
    say = log or (lambda _msg: None)
    started = time.monotonic()
    program = export_program(folded, op)
    if "onnx" in formats:
        path = export_onnx(program, op, out_dir / f"{op.name}{FILE_SUFFIX['onnx']}")
        parity = check_parity(onnx_runner(path, op.input_names), reference, op, "onnx", atol)
        result.artifacts.append(ArtifactResult("onnx", op.name, path, parity, time.monotonic() - started))
        say(f"{op.name}: onnx ok, max err {max(parity.values()):.2g}")
    if "torch_export" in formats and op.torch_export:
        started = time.monotonic()
        path = out_dir / f"{op.name}{FILE_SUFFIX['torch_export']}"
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
        parity = check_parity(lambda inputs: _as_tuple(loaded(*inputs)), reference, op, "torch_export", atol)
        result.artifacts.append(ArtifactResult("torch_export", op.name, path, parity, time.monotonic() - started))
        say(f"{op.name}: torch.export ok, max err {max(parity.values()):.2g}")
    if "aoti" in formats and op.aoti:
        started = time.monotonic()
        path = out_dir / f"{op.name}{FILE_SUFFIX['aoti']}"
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        compiled = torch._inductor.aoti_load_package(str(path))
        parity = check_parity(lambda inputs: _as_tuple(compiled(*inputs)), reference, op, "aoti", atol)
        result.artifacts.append(ArtifactResult("aoti", op.name, path, parity, time.monotonic() - started))
        say(f"{op.name}: aoti ok, max err {max(parity.values()):.2g}")
    return result


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    formats: Iterable[str] = FORMATS,
    batch_size: int = 2,
    atol: float = PARITY_ATOL,
    log: Callable[[str], None] | None = None,
) -> list[OpExport]:
    """Export every op of a model (eval mode) into `out_dir`."""
    model.eval()
    formats = list(formats)
    return [export_op(op, out_dir, formats, atol, log) for op in model.export_ops(batch_size)]
