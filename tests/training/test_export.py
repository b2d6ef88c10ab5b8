"""Export: real Conv-BN folding, ONNX / torch.export / AOTInductor artifacts with recorded parity."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn

import tests.training.toy_family  # noqa: F401  (registers toy_ae)
from training.export import (
    ONNX_OPSET,
    ExportParityError,
    batchnorm_modules,
    check_parity,
    export_model,
    export_op,
    fold_batchnorm,
    make_inputs,
    verification_shapes,
)
from training.models.base import MAX_OP_INPUTS, ExportOp, OpModule
from training.registry import create_model


def _randomize_bn(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)
    return model.eval()


class _SharedConvOutput(nn.Module):
    """The conv output feeds the BN and a skip connection: folding would change the skip, so no fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _Untraceable(nn.Module):
    """Python control flow on tensor values defeats torch.fx: folding must happen inside the children."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.block(x)
        return self.block(-x)


class _CustomNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_fold_removes_every_batchnorm_and_keeps_outputs() -> None:
    model = _randomize_bn(create_model("toy_ae"))
    folded, pairs = fold_batchnorm(model)
    assert pairs == 3
    assert batchnorm_modules(model) and not batchnorm_modules(folded)
    assert len(batchnorm_modules(model)) == 3
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-6)
        assert torch.allclose(folded.encode(x), model.encode(x), atol=1e-5)
    assert model.enc[1].__class__ is nn.BatchNorm2d, "the original model is left untouched"


def test_fold_is_a_weight_fold_not_a_relabel() -> None:
    model = _randomize_bn(create_model("toy_ae"))
    folded, _ = fold_batchnorm(model)
    conv, bn = model.enc[0], model.enc[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(folded.enc[0].weight, conv.weight * scale.view(-1, 1, 1, 1), atol=1e-6)
    assert folded.enc[3].bias is not None  # a conv without bias gains the BN shift
    assert isinstance(folded.enc[1], nn.Identity)


def test_fold_skips_shared_outputs_and_custom_norms_but_recurses_into_untraceable_modules() -> None:
    shared = _randomize_bn(_SharedConvOutput())
    folded, pairs = fold_batchnorm(shared)
    assert pairs == 0 and batchnorm_modules(folded) == ["bn"]
    custom = _randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 3), _CustomNorm(2)))
    assert fold_batchnorm(custom)[1] == 0
    untraceable = _randomize_bn(_Untraceable())
    folded, pairs = fold_batchnorm(untraceable)
    assert pairs == 1 and not batchnorm_modules(folded)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), untraceable(x), atol=1e-6)
        assert torch.allclose(fold_batchnorm(shared)[0](x), shared(x), atol=1e-6)


def test_verification_shapes_cover_example_checks_and_another_batch() -> None:
    op = ExportOp(
        "encode",
        nn.Identity(),
        (torch.rand(2, 1, 8, 8),),
        ["image"],
        ["latent"],
        dynamic_hw=True,
        check_shapes=[((1, 1, 12, 6),)],
    )
    assert verification_shapes(op) == [((2, 1, 8, 8),), ((1, 1, 12, 6),), ((3, 1, 8, 8),)]
    inputs = make_inputs((torch.rand(2, 3), torch.tensor([5, 9])), ((4, 3), (4,)))
    assert inputs[0].shape == (4, 3) and float(inputs[0].min()) >= 0 and float(inputs[0].max()) <= 1
    assert inputs[1].dtype == torch.int64 and int(inputs[1].min()) >= 5 and int(inputs[1].max()) <= 9


@pytest.mark.slow
def test_export_model_writes_verified_onnx_and_torch_export(tmp_path) -> None:
    model = _randomize_bn(create_model("toy_ae"))
    results = {r.op.name: r for r in export_model(model, tmp_path, formats=["onnx", "torch_export"])}
    assert set(results) == {"encode", "decode", "reconstruct"}
    encode = results["encode"]
    assert encode.inputs == [{"name": "image", "dtype": "float32", "shape": [-1, 1, -1, -1]}]
    assert encode.outputs == [{"name": "latent", "dtype": "float32", "shape": [-1, 8]}]
    assert encode.shape_buckets == [[24, 12]] and encode.folded_pairs == 2
    for result in results.values():
        assert {a.format for a in result.artifacts} == {"onnx", "torch_export"}
        for artifact in result.artifacts:
            assert artifact.path.is_file()
            assert len(artifact.parity_max_abs_err) >= 2  # example shape + another batch size
            assert max(artifact.parity_max_abs_err.values()) < 1e-5
    assert set(encode.artifacts[0].parity_max_abs_err) == {"2x1x16x16", "3x1x24x12", "3x1x16x16"}
    graph = onnx.load(str(tmp_path / "encode.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= ONNX_OPSET
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]
    assert not (tmp_path / "encode.onnx.data").exists(), "one self-contained ONNX file"
    program = torch.export.load(str(tmp_path / "reconstruct.pt2"))
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes), "the program is fused"


def test_parity_failure_is_loud() -> None:
    op = ExportOp("decode", nn.Linear(3, 2), (torch.rand(2, 3),), ["latent"], ["image"])
    reference = op.module.eval()

    def off_by_a_bit(inputs):
        return (reference(*inputs) + 1e-3,)

    with pytest.raises(ExportParityError, match=r"onnx export of op 'decode' .* at input shape 2x3"):
        check_parity(off_by_a_bit, reference, op, "onnx")
    errors = check_parity(lambda inputs: (reference(*inputs),), reference, op, "onnx")
    assert errors == {"2x3": 0.0, "3x3": 0.0}


class _Render(nn.Module):
    """An op without inputs (like the progressive decoder's decode): returns a learned image."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Parameter(torch.rand(1, 1, 4, 4))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.image)


class _Denoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * self.embed(t).sum(-1).view(-1, 1, 1, 1)


@pytest.mark.slow
def test_ops_without_inputs_and_with_integer_inputs(tmp_path) -> None:
    render = export_op(ExportOp("decode", _Render(), (), [], ["image"]), tmp_path, ["onnx", "torch_export"])
    assert render.inputs == [] and render.outputs[0]["shape"] == [1, 1, 4, 4]
    assert {a.format: list(a.parity_max_abs_err) for a in render.artifacts} == {
        "onnx": ["no_input"],
        "torch_export": ["no_input"],
    }
    denoise = ExportOp(
        "denoise",
        _Denoise(),
        (torch.randn(2, 1, 4, 4), torch.tensor([0, 9])),
        ["x_t", "t"],
        ["eps"],
        check_shapes=[((5, 1, 4, 4), (5,))],
    )
    result = export_op(denoise, tmp_path, ["onnx"])
    assert result.inputs[1] == {"name": "t", "dtype": "int64", "shape": [-1]}
    assert set(result.artifacts[0].parity_max_abs_err) == {"2x1x4x4,2", "5x1x4x4,5", "3x1x4x4,3"}


def test_unknown_format_is_named(tmp_path) -> None:
    op = ExportOp("decode", nn.Linear(3, 2), (torch.rand(2, 3),), ["latent"], ["image"])
    with pytest.raises(ValueError, match=r"unknown export format.*'tflite'.*allowed: onnx, torch_export, aoti"):
        export_op(op, tmp_path, ["tflite"])


@pytest.mark.slow
def test_aoti_package_of_a_tiny_op(tmp_path) -> None:
    model = _randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()))
    op = ExportOp(
        "reconstruct",
        model,
        (torch.rand(2, 1, 8, 8),),
        ["image"],
        ["reconstruction"],
        check_shapes=[((1, 1, 8, 8),)],
    )
    result = export_op(op, tmp_path, ["aoti"])
    (artifact,) = result.artifacts
    assert artifact.format == "aoti" and artifact.path.name == "reconstruct.aoti.pt2"
    assert set(artifact.parity_max_abs_err) == {"2x1x8x8", "1x1x8x8", "3x1x8x8"}
    assert max(artifact.parity_max_abs_err.values()) < 1e-5
    compiled = torch._inductor.aoti_load_package(str(artifact.path))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


class _Methods(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def features(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.bn(self.conv(x)) * scale

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def four(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return a + b + c + d


def test_op_module_calls_the_named_method_and_shares_the_mode() -> None:
    model = _Methods().eval()
    op = OpModule(model, "features", scale=2.0)
    x = torch.rand(2, 1, 8, 8)
    assert op.arity == 1 and not op.training
    assert torch.equal(op(x), model.features(x, scale=2.0))
    a, b = torch.rand(3, 4), torch.rand(3, 4)
    assert OpModule(model, "add").arity == 2 and torch.equal(OpModule(model, "add")(a, b), a + b)
    assert OpModule(model.train(), "add").training
    with pytest.raises(AttributeError, match="has no method 'nope'"):
        OpModule(model, "nope")
    with pytest.raises(ValueError, match=f"at most {MAX_OP_INPUTS}"):
        OpModule(model, "four")


def test_op_module_exports_with_one_dynamic_spec_per_input_and_folds_batchnorm() -> None:
    op = OpModule(_Methods().eval(), "features")
    x = torch.rand(2, 1, 8, 8)
    auto = torch.export.Dim.AUTO
    program = torch.export.export(op, (x,), dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    y = torch.rand(3, 1, 10, 6)
    assert torch.allclose(program.module()(y), op(y), atol=1e-6)
    folded, pairs = fold_batchnorm(op)
    assert pairs == 1 and not batchnorm_modules(folded)

