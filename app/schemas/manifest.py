"""The model-store manifest: the only contract between `training` (writer) and `app` (reader).

One `manifest.json` per `<model>/<version>/` directory. `training.store` builds a `Manifest` and
writes it; `app.schemas.store_format` reads and verifies it for both sides with this same model.
Pure pydantic: importing this module must never pull in fastapi, torch or onnxruntime.

Op names and their tensor conventions (all images NCHW float32):
  encode            image (B,C,H,W) -> latent (B,D)                     (always flat, for LSTMs)
  decode            latent (B,D) -> image (B,C,H,W); or no input -> image (ProgressiveDecoder)
  reconstruct       image -> image
  attention_matrix  image -> attention (B,N,N)                          (head-averaged)
  denoise           x_t (B,C,H,W), t int64 (B,), condition (B,M) -> eps (B,C,H,W)   (diffusion)
Service-level capabilities ("encode", "decode", "reconstruct", "sample", "attention-map") are
composed from these ops by the service; `capabilities` lists which the model offers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

Capability = Literal["encode", "decode", "reconstruct", "sample", "attention-map"]
OpName = Literal["encode", "decode", "reconstruct", "attention_matrix", "denoise"]
ArtifactFormat = Literal["onnx", "torch_export", "aoti"]
DType = Literal["float32", "float16", "int64", "int32", "uint8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One named tensor. `shape` uses -1 for a dynamic axis: axis 0 (the batch) always, and the image
    axes 2 and 3 of an op whose preprocessing has `dynamic_hw`."""

    name: str
    dtype: DType = "float32"
    shape: list[int]
    description: str = ""


class IntensityScaling(_Strict):
    """Raw detector intensities -> model input in [0, 1] (4D-STEM): one global log scaling,
    v = min(log1p(max(I, floor) / eps) / log1p(i_max / eps), 1) with eps = i_max / dynamic_range, where I is
    a pixel's intensity as a fraction of the incident probe (a frame catching the whole beam sums to 1)."""

    kind: Literal["log_global"] = "log_global"
    i_max: float = Field(gt=0)                          # intensity mapped to 1 (the training data's maximum)
    dynamic_range: float = Field(gt=1)                  # i_max / eps: decades below i_max that stay visible
    floor: float = Field(0.0, ge=0)                     # intensities below it (noise, dark offsets) count as it


class PatternGeometry(_Strict):
    """The diffraction patterns the model was trained on: `size` (H, W) pixels of `angular_sampling_mrad`
    (ky, kx) each, the zero scattering angle at pixel (H // 2, W // 2). Raw frames of another size or
    sampling are rebinned onto this grid (each model pixel gets the counts its angular footprint covers)."""

    size: tuple[int, int]
    angular_sampling_mrad: tuple[float, float]
    max_sampling_ratio: float = Field(4.0, ge=1)        # coarsest accepted detector sampling, in model pixels

    @model_validator(mode="after")
    def _positive(self) -> PatternGeometry:
        if min(self.size) < 1 or min(self.angular_sampling_mrad) <= 0:
            raise ValueError("pattern size and angular sampling must be positive")
        return self


class Preprocessing(_Strict):
    """How the service turns client images into model input, and model output back into images."""

    channels: int = 1                                  # 1 = grayscale, 3 = RGB
    input_size: tuple[int, int] | None = None           # (H, W) the model was trained at; None = no image input
    resize: Literal["none", "bilinear"] = "bilinear"    # what the service does when a client image differs
    dynamic_hw: bool = False                            # encode accepts any (H, W) without resizing
    min_hw: tuple[int, int] = (1, 1)                     # smallest accepted (H, W) when dynamic_hw
    # largest accepted (H, W) and H·W when dynamic_hw (the encoder's memory grows with H·W, its attention
    # with (H·W)²); None: the service's defaults (AESERVE_MAX_DYNAMIC_SIDE, AESERVE_MAX_DYNAMIC_PIXELS)
    max_hw: tuple[int, int] | None = None
    max_pixels: int | None = Field(None, ge=1)
    scale: Literal["unit"] = "unit"                     # integer images are divided by their dtype max -> [0, 1]
    output_range: tuple[float, float] = (0.0, 1.0)      # range of image outputs (tanh decoders: (-1, 1))
    # raw detector frames (4D-STEM): with `intensity`, uploads are intensities or counts, not [0, 1] images;
    # the service rebins them onto `pattern` and applies the scaling (`app.preprocess.RawDetector`)
    intensity: IntensityScaling | None = None
    pattern: PatternGeometry | None = None

    @model_validator(mode="after")
    def _raw_detector(self) -> Preprocessing:
        pattern = self.pattern
        if self.intensity is not None and (pattern is None or self.channels != 1 or self.input_size != pattern.size):
            raise ValueError("intensity scaling needs one channel and a pattern geometry of the input size")
        return self


class OpSpec(_Strict):
    """One exported computation; `artifacts` maps each format to a file in this version directory."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    artifacts: dict[ArtifactFormat, str]
    shape_buckets: list[list[int]] = Field(default_factory=list)  # extra input (H, W) the ONNX was verified at
    max_batch_size: int = 32
    # The format the export measured fastest for this op on the machine that built it (median ms per call of
    # `format_timing_batch` items, per format, in `format_ms`); the service runs it unless AESERVE_PREFER
    # names one.
    preferred_format: ArtifactFormat | None = None
    format_ms: dict[ArtifactFormat, float] = Field(default_factory=dict)
    format_timing_batch: int | None = None


class ArtifactRecord(_Strict):
    """A file of the version with its checksum and, for model files, its parity against eager torch."""

    path: str
    sha256: str
    bytes: int
    format: ArtifactFormat | Literal["other"] = "other"
    op: OpName | None = None
    # max |artifact - eager| per verified input shape, e.g. {"2x1x201x201": 3.1e-6}
    parity_max_abs_err: dict[str, float] = Field(default_factory=dict)


class SaliencySpec(_Strict):
    """Gradient saliency served from a torch.export program (ONNX cannot express gradients)."""

    op: OpName = "reconstruct"
    objective: Literal["sum_squared_reconstruction_error"] = "sum_squared_reconstruction_error"
    normalize: Literal["global_minmax"] = "global_minmax"
    eps: float = 1e-8


class SamplerSpec(_Strict):
    """How `sample` works: draw latents from the prior and decode, run a diffusion sampler, or render."""

    kind: Literal["prior_gaussian", "ddim", "fixed_render"]
    latent_dim: int | None = None                       # prior_gaussian
    # ddim: the noise schedule travels as numbers so the service needs no training code
    num_train_timesteps: int | None = None
    beta_schedule: Literal["linear", "cosine"] | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    default_steps: int = 50
    max_steps: int = 1000
    default_eta: float = 0.0
    clip_denoised: bool = True
    condition_dim: int = 0                              # length of the meta/condition vector
    condition_keys: list[str] = Field(default_factory=list)  # named slots of the condition vector
    # named values a slot accepts, e.g. {"goal": ["inspire", ...], "tone": {"calm": 0.3, ...}}: a list maps
    # a name to its index (an embedding id), a dict to its number; numbers are always accepted as they are
    condition_values: dict[str, list[str] | dict[str, float]] = Field(default_factory=dict)
    image_shape: list[int] | None = None                # (C, H, W) generated


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    family: str                                         # fixture folder name, e.g. "autoencoder-cnn-v3"
    # the registered variant (training.registry) that, built with `config`, rebuilds the model alone;
    # None only in stores written before the field existed
    architecture: str | None = None
    description: str = ""
    config: dict                                        # the family config; rebuilds the model alone
    capabilities: list[Capability]
    preprocessing: Preprocessing
    ops: dict[OpName, OpSpec]
    artifacts: list[ArtifactRecord]
    saliency: SaliencySpec | None = None
    sampler: SamplerSpec | None = None
    training: dict = Field(default_factory=dict)        # metrics (val PSNR/SSIM...), steps, data, wall time
    provenance: dict = Field(default_factory=dict)      # git commit, command, torch/onnx versions, created_at
    # measured after writing, e.g. `metrics.heldout` by `python -m training evaluate` (the quality report:
    # held-out data, PSNR/SSIM next to equal-size baselines, goals); not covered by the artifact checksums
    metrics: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        paths = {a.path for a in self.artifacts}
        for op_name, op in self.ops.items():
            for fmt, path in op.artifacts.items():
                if path not in paths:
                    raise ValueError(f"ops.{op_name}.artifacts.{fmt}: {path!r} has no artifacts[] record")
        needs = {
            "encode": {"encode"},
            "reconstruct": {"reconstruct"},
            "attention-map": {"attention_matrix"},
        }
        for cap, ops in needs.items():
            if cap in self.capabilities and not ops <= self.ops.keys():
                raise ValueError(f"capability {cap!r} needs ops {sorted(ops)}")
        if "decode" in self.capabilities and "decode" not in self.ops:
            raise ValueError("capability 'decode' needs op 'decode'")
        if "sample" in self.capabilities and self.sampler is None:
            raise ValueError("capability 'sample' needs a sampler")
        if "attention-map" in self.capabilities and self.saliency is None:
            raise ValueError("capability 'attention-map' needs a saliency spec")
        return self
