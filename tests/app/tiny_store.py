"""A tiny model store built from tiny torch modules (ONNX opset 18, dynamic batch) with hand-made manifests.

Hand-made only for the service's unit tests; the contract test against a store written by `training`
lives elsewhere. Models:
  tiny-ae      encode/decode/reconstruct/attention-map/sample(prior_gaussian), 1x16x16 <-> 8 latents,
               saliency from a torch.export program; versions 2, 9 (broken JSON) and 10 (served)
  tiny-dyn     encode at any H, W >= 8 (no resizing) + reconstruct fixed at 16x16 without resizing
  tiny-render  fixed_render decoder (no inputs), 3x8x8 RGB in (-1, 1)
  tiny-ddim    denoise (x_t, t, condition) for the ddim sampler, 1x8x8, condition keys a, b
  tiny-broken  an artifact whose sha256 does not match its manifest
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from app.schemas.manifest import Manifest

LATENT = 8


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, LATENT)

    def forward(self, image):
        return self.fc(torch.relu(self.conv(image)).flatten(1))


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(LATENT, 4 * 8 * 8)
        self.conv = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, latent):
        h = self.fc(latent).reshape(-1, 4, 8, 8)
        h = torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        return torch.sigmoid(self.conv(h))


class TinyAE(nn.Module):
    def __init__(self, encoder: TinyEncoder, decoder: TinyDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, image):
        return self.decoder(self.encoder(image))


class TinyAttention(nn.Module):
    """4x4 patches -> 16 tokens -> softmax(q k^T / sqrt(d)) (B, 16, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 8)
        self.k = nn.Linear(16, 8)

    def forward(self, image):
        b = image.shape[0]
        tokens = image.reshape(b, 1, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 16)
        scores = self.q(tokens) @ self.k(tokens).transpose(1, 2) / (8**0.5)
        return torch.softmax(scores, dim=-1)


class TinyDynamicEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, image):
        return torch.relu(self.conv(image)).mean(dim=(2, 3))


class TinyRender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.canvas = nn.Parameter(torch.linspace(-2, 2, 3 * 8 * 8).reshape(1, 3, 8, 8))

    def forward(self):
        return torch.tanh(self.canvas)


class TinyDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.cond = nn.Linear(2, 1)

    def forward(self, x_t, t, condition):
        scale = (t.to(torch.float32) / 100.0).reshape(-1, 1, 1, 1)
        return 0.1 * self.conv(x_t) * (1 + scale) + self.cond(condition).reshape(-1, 1, 1, 1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_onnx(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic_hw: bool = False,
) -> None:
    axes = {name: {0: "batch"} for name in [*inputs, *outputs]}
    if dynamic_hw:
        axes[inputs[0]] = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            opset_version=18,
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes if inputs else None,
        )


def artifact(version_dir: Path, name: str, fmt: str, op: str | None) -> dict:
    path = version_dir / name
    return {
        "path": name,
        "sha256": _sha(path),
        "bytes": path.stat().st_size,
        "format": fmt,
        "op": op,
        "parity_max_abs_err": {"2x1x16x16": 0.0} if op else {},
    }


def tensor(name: str, shape: list[int], dtype: str = "float32") -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def write_manifest(version_dir: Path, **fields) -> None:
    manifest = Manifest.model_validate(
        {"name": version_dir.parent.name, "version": version_dir.name, **fields}
    )
    (version_dir / "manifest.json").write_text(manifest.model_dump_json(indent=2))


def build_tiny_ae(root: Path, version: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    encoder, decoder, attention = TinyEncoder(), TinyDecoder(), TinyAttention()
    ae = TinyAE(encoder, decoder)
    d = root / "tiny-ae" / version
    d.mkdir(parents=True)
    x = torch.rand(2, 1, 16, 16)
    export_onnx(encoder, (x,), d / "encode.onnx", ["image"], ["latent"])
    export_onnx(decoder, (torch.randn(2, LATENT),), d / "decode.onnx", ["latent"], ["image"])
    export_onnx(ae, (x,), d / "reconstruct.onnx", ["image"], ["reconstruction"])
    export_onnx(attention, (x,), d / "attention.onnx", ["image"], ["attention"])
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(ae.eval(), (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(d / "reconstruct.pt2"))
    image, latent = tensor("image", [-1, 1, 16, 16]), tensor("latent", [-1, LATENT])
    write_manifest(
        d,
        family="tiny-ae",
        description="tiny conv autoencoder for service tests",
        config={"latent_dim": LATENT},
        capabilities=["encode", "decode", "reconstruct", "sample", "attention-map"],
        preprocessing={"channels": 1, "input_size": [16, 16], "resize": "bilinear"},
        ops={
            "encode": {"inputs": [image], "outputs": [latent], "artifacts": {"onnx": "encode.onnx"}},
            "decode": {
                "inputs": [latent],
                "outputs": [tensor("image", [-1, 1, 16, 16])],
                "artifacts": {"onnx": "decode.onnx"},
            },
            "reconstruct": {
                "inputs": [image],
                "outputs": [tensor("reconstruction", [-1, 1, 16, 16])],
                "artifacts": {"onnx": "reconstruct.onnx", "torch_export": "reconstruct.pt2"},
            },
            "attention_matrix": {
                "inputs": [image],
                "outputs": [tensor("attention", [-1, 16, 16])],
                "artifacts": {"onnx": "attention.onnx"},
            },
        },
        artifacts=[
            artifact(d, "encode.onnx", "onnx", "encode"),
            artifact(d, "decode.onnx", "onnx", "decode"),
            artifact(d, "reconstruct.onnx", "onnx", "reconstruct"),
            artifact(d, "reconstruct.pt2", "torch_export", "reconstruct"),
            artifact(d, "attention.onnx", "onnx", "attention_matrix"),
        ],
        saliency={"op": "reconstruct"},
        sampler={"kind": "prior_gaussian", "latent_dim": LATENT},
        training={"val_psnr": 12.5, "steps": 1},
        metrics={"heldout": {"model": {"psnr": 11.0}, "bicubic_4x4": {"psnr": 10.0}}},
    )
    return {"encode": encoder, "decode": decoder, "reconstruct": ae, "attention": attention}


def build_tiny_dyn(root: Path) -> None:
    torch.manual_seed(1)
    d = root / "tiny-dyn" / "1"
    d.mkdir(parents=True)
    export_onnx(
        TinyDynamicEncoder(),
        (torch.rand(2, 1, 12, 20),),
        d / "encode.onnx",
        ["image"],
        ["latent"],
        dynamic_hw=True,
    )
    shutil.copy(root / "tiny-ae" / "10" / "reconstruct.onnx", d / "reconstruct.onnx")
    write_manifest(
        d,
        family="tiny-dyn",
        config={},
        capabilities=["encode", "reconstruct"],
        preprocessing={
            "channels": 1,
            "input_size": [16, 16],
            "resize": "none",
            "dynamic_hw": True,
            "min_hw": [8, 8],
        },
        ops={
            "encode": {
                "inputs": [tensor("image", [-1, 1, -1, -1])],
                "outputs": [tensor("latent", [-1, 4])],
                "artifacts": {"onnx": "encode.onnx"},
                "shape_buckets": [[8, 8], [24, 32]],
            },
            "reconstruct": {
                "inputs": [tensor("image", [-1, 1, 16, 16])],
                "outputs": [tensor("reconstruction", [-1, 1, 16, 16])],
                "artifacts": {"onnx": "reconstruct.onnx"},
            },
        },
        artifacts=[
            artifact(d, "encode.onnx", "onnx", "encode"),
            artifact(d, "reconstruct.onnx", "onnx", "reconstruct"),
        ],
    )


def build_tiny_render(root: Path) -> None:
    d = root / "tiny-render" / "1"
    d.mkdir(parents=True)
    export_onnx(TinyRender(), (), d / "decode.onnx", [], ["image"])
    write_manifest(
        d,
        family="tiny-render",
        config={},
        capabilities=["decode", "sample"],
        preprocessing={"channels": 3, "input_size": None, "output_range": [-1.0, 1.0]},
        ops={
            "decode": {
                "inputs": [],
                "outputs": [tensor("image", [1, 3, 8, 8])],
                "artifacts": {"onnx": "decode.onnx"},
            }
        },
        artifacts=[artifact(d, "decode.onnx", "onnx", "decode")],
        sampler={"kind": "fixed_render", "image_shape": [3, 8, 8]},
    )


def build_tiny_ddim(root: Path) -> None:
    torch.manual_seed(2)
    d = root / "tiny-ddim" / "1"
    d.mkdir(parents=True)
    args = (torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.randn(2, 2))
    export_onnx(TinyDenoiser(), args, d / "denoise.onnx", ["x_t", "t", "condition"], ["eps"])
    write_manifest(
        d,
        family="tiny-ddim",
        config={},
        capabilities=["sample"],
        preprocessing={"channels": 1, "input_size": None, "output_range": [-1.0, 1.0]},
        ops={
            "denoise": {
                "inputs": [
                    tensor("x_t", [-1, 1, 8, 8]),
                    tensor("t", [-1], "int64"),
                    tensor("condition", [-1, 2]),
                ],
                "outputs": [tensor("eps", [-1, 1, 8, 8])],
                "artifacts": {"onnx": "denoise.onnx"},
            }
        },
        artifacts=[artifact(d, "denoise.onnx", "onnx", "denoise")],
        sampler={
            "kind": "ddim",
            "num_train_timesteps": 100,
            "beta_schedule": "linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "default_steps": 10,
            "max_steps": 100,
            "condition_dim": 2,
            "condition_keys": ["a", "b"],
            "condition_values": {"a": ["low", "high"], "b": {"calm": -0.5, "loud": 0.5}},
            "image_shape": [1, 8, 8],
        },
    )


def build_tiny_broken(root: Path) -> None:
    d = root / "tiny-broken" / "1"
    d.mkdir(parents=True)
    shutil.copy(root / "tiny-ae" / "10" / "encode.onnx", d / "encode.onnx")
    record = artifact(d, "encode.onnx", "onnx", "encode")
    record["sha256"] = "0" * 64
    write_manifest(
        d,
        family="tiny-ae",
        config={},
        capabilities=["encode"],
        preprocessing={"channels": 1, "input_size": [16, 16]},
        ops={
            "encode": {
                "inputs": [tensor("image", [-1, 1, 16, 16])],
                "outputs": [tensor("latent", [-1, LATENT])],
                "artifacts": {"onnx": "encode.onnx"},
            }
        },
        artifacts=[record],
    )


def build_store(root: Path) -> dict[str, nn.Module]:
    """Every model above under `root`; returns the eager modules behind tiny-ae version 10."""
    modules = build_tiny_ae(root, "10")
    shutil.copytree(root / "tiny-ae" / "10", root / "tiny-ae" / "2")
    (root / "tiny-ae" / "9").mkdir()
    (root / "tiny-ae" / "9" / "manifest.json").write_text("{not json")
    build_tiny_dyn(root)
    build_tiny_render(root)
    build_tiny_ddim(root)
    build_tiny_broken(root)
    (root / "README.md").write_text("not a model")
    return modules
