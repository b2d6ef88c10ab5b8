"""training.layers: ONNX-safe adaptive pooling, the V3 conv blocks and the self-attention block."""

from __future__ import annotations

import io
import warnings

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.layers.attention import SelfAttentionBlock
from training.layers.blocks import (
    InceptionBlock,
    ResNetBasicBlock,
    ResNeXtBlock,
    SEBlock,
    build_block,
)
from training.layers.pooling import AdaptiveAvgPool2dExportable, adaptive_avg_pool2d, averaging_matrix

# --- pooling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_size", [(4, 4), (3, 5), (1, 1), (7, 2)])
def test_pooling_matches_adaptive_avg_pool_at_many_sizes(out_size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    for h in [1, 2, 3, 4, 5, 7, 8, 13, 16, 19, 26, 40]:
        for w in [1, 3, 4, 6, 11, 13, 40, 80]:
            x = torch.randn(2, 3, h, w, generator=gen)
            expected = F.adaptive_avg_pool2d(x, out_size)
            torch.testing.assert_close(adaptive_avg_pool2d(x, out_size), expected, rtol=0, atol=1e-6)


def test_averaging_matrix_has_overlapping_windows() -> None:
    # 13 -> 4 cells: windows [0,4), [3,7), [6,10), [9,13) as in PyTorch
    m = averaging_matrix(13, 4, dtype=torch.float64, device=torch.device("cpu"))
    support = [torch.nonzero(row).flatten().tolist() for row in m]
    assert support == [list(range(0, 4)), list(range(3, 7)), list(range(6, 10)), list(range(9, 13))]
    torch.testing.assert_close(m.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_pooling_gradient_matches() -> None:
    x = torch.randn(1, 2, 13, 9, requires_grad=True)
    (g_ours,) = torch.autograd.grad(adaptive_avg_pool2d(x, (4, 4)).square().sum(), x)
    (g_ref,) = torch.autograd.grad(F.adaptive_avg_pool2d(x, (4, 4)).square().sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-6)


def test_pooling_module_validates_and_reprs() -> None:
    assert AdaptiveAvgPool2dExportable(4).output_size == (4, 4)
    assert "output_size=(2, 3)" in repr(AdaptiveAvgPool2dExportable((2, 3)))
    with pytest.raises(ValueError, match="output_size"):
        AdaptiveAvgPool2dExportable((0, 4))


def test_pooling_onnx_export_is_right_at_dynamic_sizes() -> None:
    module = AdaptiveAvgPool2dExportable((4, 4)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(1, 2, 16, 16),), buffer, dynamo=False, opset_version=18,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(1, 2, 13, 13), (3, 2, 5, 40), (2, 2, 3, 7), (1, 2, 19, 160)]:
        x = torch.rand(shape)
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(got, F.adaptive_avg_pool2d(x, 4), rtol=0, atol=1e-6)


# --- blocks ----------------------------------------------------------------------------------------


def test_resnet_block_shapes_and_shortcut() -> None:
    down = ResNetBasicBlock(16, 32, stride=2)
    assert down.out_channels == 32 and len(down.shortcut) == 2 and isinstance(down.se, nn.Identity)
    assert down(torch.rand(2, 16, 51, 51)).shape == (2, 32, 26, 26)  # ceil(51 / 2)
    same = ResNetBasicBlock(32, 32)
    assert len(same.shortcut) == 0
    x = torch.rand(1, 32, 8, 8)
    assert same(x).shape == x.shape and same(x).min() >= 0  # ends in ReLU


def test_resnet_block_computation_order() -> None:
    block = ResNetBasicBlock(4, 4).eval()
    x = torch.randn(1, 4, 6, 6)
    manual = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + x)
    torch.testing.assert_close(block(x), manual)


def test_se_block_hidden_width_and_gate() -> None:
    assert SEBlock(128).excitation[0].out_features == 8     # max(128 // 16, 8)
    assert SEBlock(512).excitation[0].out_features == 32
    se = SEBlock(64)
    x = torch.rand(2, 64, 5, 7)
    gate = torch.sigmoid(se.excitation[2](F.relu(se.excitation[0](x.mean(dim=(2, 3))))))
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])
    assert build_block("se", 32, 64, 2).se.excitation[0].in_features == 64


def test_resnext_block_expands_and_groups() -> None:
    block = ResNeXtBlock(64, 128, stride=2)
    assert block.out_channels == 256
    assert block.conv2.weight.shape == (256, 8, 3, 3)  # width int(128·4/64)·32 = 256, groups 32
    assert block.conv2.stride == (2, 2) and block.conv1.stride == (1, 1)
    assert block(torch.rand(1, 64, 13, 13)).shape == (1, 256, 7, 7)
    assert len(ResNeXtBlock(128, 64).shortcut) == 0  # 128 == 2·64, stride 1: identity
    with pytest.raises(ValueError, match="out_channels"):
        ResNeXtBlock(8, 8)


def test_inception_block_branches() -> None:
    block = InceptionBlock(16, 32, stride=2)
    y = block(torch.rand(2, 16, 13, 13))
    assert y.shape == (2, 32, 7, 7) and block.out_channels == 32
    assert isinstance(block.branch_pool[0], nn.MaxPool2d)
    assert isinstance(InceptionBlock(16, 32).branch_pool[0], nn.Identity)
    with pytest.raises(ValueError, match="multiple of 4"):
        InceptionBlock(16, 30)


def test_build_block_factory() -> None:
    assert isinstance(build_block("ResNet", 8, 8), ResNetBasicBlock)
    assert isinstance(build_block("resnext", 8, 16), ResNeXtBlock)
    assert isinstance(build_block("inception", 8, 16), InceptionBlock)
    se = build_block("se", 8, 16)
    assert isinstance(se, ResNetBasicBlock) and isinstance(se.se, SEBlock)
    with pytest.raises(ValueError, match="resnet, resnext, se, inception"):
        build_block("densenet", 8, 8)


# --- attention -------------------------------------------------------------------------------------


def _naive_attention(block: SelfAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head loop following the reference description literally."""
    b, _, h, w = x.shape
    heads, d = block.num_heads, block.head_dim
    qkv = block.qkv(x).reshape(b, 3, heads, d, h * w)
    outs, maps = [], []
    for head in range(heads):
        q, k, v = (qkv[:, i, head].transpose(1, 2) for i in range(3))  # (B, N, d)
        a = torch.softmax(q @ k.transpose(1, 2) * d ** -0.5, dim=-1)
        maps.append(a)
        outs.append((a @ v).transpose(1, 2))  # (B, d, N)
    out = torch.cat(outs, dim=1).reshape(b, heads * d, h, w)  # channel = head·d + j
    return block.proj(out) + x, torch.stack(maps, dim=1).mean(dim=1)


@pytest.mark.parametrize(("channels", "head_dim"), [(64, 8), (256, 8), (512, 16)])
def test_attention_head_dim_rule(channels: int, head_dim: int) -> None:
    block = SelfAttentionBlock(channels)
    assert block.head_dim == head_dim
    assert block.qkv.weight.shape == (3 * 4 * head_dim, channels, 1, 1)
    assert block.proj.weight.shape == (channels, 4 * head_dim, 1, 1)


def test_attention_matches_naive_and_keeps_weights() -> None:
    torch.manual_seed(0)
    block = SelfAttentionBlock(64)
    x = torch.randn(2, 64, 5, 7)
    out = block(x)
    expected_out, expected_weights = _naive_attention(block, x)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-5)
    weights = block.attention_weights
    assert weights is not None and weights.shape == (2, 35, 35) and not weights.requires_grad
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 35))


def test_attention_record_flag_and_attend() -> None:
    block = SelfAttentionBlock(32)
    block(torch.randn(1, 32, 3, 3), record=False)
    assert block.attention_weights is None
    out, weights = block.attend(torch.randn(3, 32, 2, 4))
    assert out.shape == (3, 32, 2, 4) and weights.shape == (3, 8, 8)
