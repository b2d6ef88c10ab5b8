"""ProgressiveDecoder (PRISM): a decoder-only generator that renders one image from a learnable latent.

The model owns a latent parameter ``input_vec`` (1, L, 1, 1) and one ``nn.Sequential`` ``decoder``:
an initial transposed conv (1×1 → 4×4), ``n`` ×2 transposed-conv upsampling blocks, 3×3 refinement
convs down to one channel (the final one with padding 0, so the map shrinks by 2 pixels), the output
activation, then ``CropPad(output_size)`` and ``CropPad(input_size)``. ``forward()`` takes no input and
returns (1, 1, input_size, input_size). Layer order, sizes and quirks follow the original code
(``omriwen/PRISM`` @ dd8973e), see /work/shared/reference/progressive-decoder.md; state_dict keys are
the original ones without the ``.main`` of its BatchNorm wrapper.

Configuration modes: automatic (`ProgressiveDecoder.create(input_size=..., output_size=...)`), manual
latent size, manual channel progression, full manual, and `NetworkConfig` + `from_config` (plain
dataclass, YAML round trip through ``dataclasses.asdict``). The frozen `ProgressiveDecoderConfig` is
the constructor's only argument.

Training learns from measurements: ``loss = ||A(model()) - measurement||²`` for a forward operator
``A`` of `training.forward_operators`, described by the batch (see `training.data.single_image`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint

from training.layers.progressive import build_decoder, initialize_weights, no_bn_update_on_recompute
from training.models.base import ExportOp, OpModule, config_to_dict
from training.registry import register_model

OUTPUT_ACTIVATIONS: dict[str, tuple[float, float]] = {
    # name -> value range of the rendered image (unbounded ones report the [0, 1] data range)
    "sigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
    "relu": (0.0, 1.0),
    "none": (0.0, 1.0),
    "hardsigmoid": (0.0, 1.0),
    "leaky": (0.0, 1.0),
}
HIDDEN_ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu")
INIT_METHODS = ("default", "xavier", "kaiming", "orthogonal", "normal")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_choice(option: str, value: str, allowed: tuple[str, ...] | dict[str, Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class ResolvedArchitecture:
    """The sizes the constructor derives from a config (what PRISM calls the automatic choices)."""

    input_size: int
    output_size: int
    latent_channels: int
    num_upsample_layers: int
    channel_progression: tuple[int, ...]

    @property
    def generated_size(self) -> int:
        """Side of the map before the CropPads (4·2^n, minus 2 when there is a refinement layer)."""
        size = 4 * 2**self.num_upsample_layers
        return size - 2 if len(self.channel_progression) > self.num_upsample_layers + 1 else size


@dataclass(frozen=True)
class ProgressiveDecoderConfig:
    """Everything that defines a ProgressiveDecoder; ``None`` sizes are derived automatically.

    The keyword names are those of PRISM's constructor, plus `activation` (hidden activation; PRISM
    uses ReLU) and `init_method` (weight initialisation; ``default`` is PyTorch's, as PRISM).
    """

    input_size: int = 256
    output_size: int | None = None
    latent_channels: int | None = None
    channel_progression: tuple[int, ...] | None = None
    num_upsample_layers: int | None = None
    use_bn: bool = True
    output_activation: str = "sigmoid"
    use_amp: bool = False
    activation: str = "relu"
    init_method: str = "default"

    def __post_init__(self) -> None:
        if self.channel_progression is not None:
            object.__setattr__(self, "channel_progression", tuple(int(c) for c in self.channel_progression))
        if not isinstance(self.input_size, int) or not _is_power_of_two(self.input_size):
            raise ValueError(f"input_size must be power of 2, got {self.input_size!r}")
        if self.output_size is not None and not 1 <= self.output_size <= self.input_size:
            raise ValueError(f"output_size must be between 1 and input_size ({self.input_size}); "
                             f"got {self.output_size}")
        if self.latent_channels is not None and self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1; got {self.latent_channels}")
        if self.num_upsample_layers is not None and self.num_upsample_layers < 0:
            raise ValueError(f"num_upsample_layers must be >= 0; got {self.num_upsample_layers}")
        _check_choice("output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        _check_choice("activation", self.activation, HIDDEN_ACTIVATIONS)
        _check_choice("init_method", self.init_method, INIT_METHODS)
        self.resolve()  # validates the channel progression

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProgressiveDecoderConfig:
        """Inverse of `config_to_dict` (lists become tuples); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ProgressiveDecoderConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def resolve(self) -> ResolvedArchitecture:
        """Derive latent size, number of upsampling layers and channel progression (PRISM's rules)."""
        output_size = self.output_size if self.output_size is not None else self.input_size
        latent = self.latent_channels
        if latent is None:
            latent = 2 ** (int(math.log2(self.input_size)) - 2 + 2)  # == input_size
        n = self.num_upsample_layers
        if n is None:
            n, size = 0, 4
            while size < output_size:
                size *= 2
                n += 1
        progression = self.channel_progression
        if progression is None:
            channels = [latent // 2]
            for _ in range(n):
                channels.append(channels[-1] // 2)
            while channels[-1] != 1:
                channels.append(max(1, channels[-1] // 2))
            progression = tuple(channels)
            if min(progression) < 1:
                raise ValueError(f"latent_channels={latent} is too small for {n} upsampling layers: the "
                                 f"automatic channel_progression {list(progression)} reaches 0 channels; "
                                 "raise latent_channels or give channel_progression")
        else:
            if len(progression) < 2 or progression[-1] != 1:
                raise ValueError(f"channel_progression must have at least 2 entries and end with 1; "
                                 f"got {list(progression)}")
            if min(progression) < 1:
                raise ValueError(f"channel_progression entries must be >= 1; got {list(progression)}")
            if len(progression) < n + 1:
                raise ValueError(f"channel_progression needs at least num_upsample_layers + 1 = {n + 1} "
                                 f"entries; got {len(progression)}")
        return ResolvedArchitecture(self.input_size, output_size, latent, n, progression)


@dataclass(frozen=True)
class NetworkConfig:
    """PRISM's configuration-driven interface (Mode 5); YAML round trip via ``dataclasses.asdict``.

    Field names follow the document: `hidden_channels` is the channel progression and
    `use_batch_norm` is `use_bn`. Lists stay lists so ``yaml.safe_load`` reads a dump back.
    """

    input_size: int
    output_size: int | None = None
    latent_channels: int | None = None
    hidden_channels: list[int] | None = None
    num_upsample_layers: int | None = None
    activation: str = "relu"
    use_batch_norm: bool = True
    init_method: str = "default"
    output_activation: str = "sigmoid"
    use_amp: bool = False

    def to_model_config(self) -> ProgressiveDecoderConfig:
        return ProgressiveDecoderConfig(
            input_size=self.input_size,
            output_size=self.output_size,
            latent_channels=self.latent_channels,
            channel_progression=None if self.hidden_channels is None else tuple(self.hidden_channels),
            num_upsample_layers=self.num_upsample_layers,
            use_bn=self.use_batch_norm,
            output_activation=self.output_activation,
            use_amp=self.use_amp,
            activation=self.activation,
            init_method=self.init_method,
        )


class ProgressiveDecoder(nn.Module):
    """Decoder-only generator: learnable latent → progressive ×2 upsampling → one image."""

    family: ClassVar[str] = "progressive-decoder"

    def __init__(self, config: ProgressiveDecoderConfig) -> None:
        super().__init__()
        if not isinstance(config, ProgressiveDecoderConfig):
            raise TypeError("ProgressiveDecoder takes a ProgressiveDecoderConfig; use "
                            "ProgressiveDecoder.create(input_size=...) or from_config(NetworkConfig(...))")
        self.config = config
        self.arch = config.resolve()
        if not _is_power_of_two(self.arch.output_size):
            warnings.warn(f"output_size={self.arch.output_size} is not a power of 2", UserWarning,
                          stacklevel=2)
        self.input_vec = nn.Parameter(torch.randn(1, self.arch.latent_channels, 1, 1))
        self.decoder = build_decoder(config, self.arch)
        initialize_weights(self.decoder, config.init_method)
        self._checkpoint_segments = 0
        self.fused = False

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, input_size: int, output_size: int | None = None, latent_channels: int | None = None,
               channel_progression: list[int] | tuple[int, ...] | None = None,
               num_upsample_layers: int | None = None, use_bn: bool = True,
               output_activation: str = "sigmoid", use_amp: bool = False, **extra: Any) -> ProgressiveDecoder:
        """PRISM's documented constructor keywords (modes 1-4); `extra` = other config fields."""
        return cls(ProgressiveDecoderConfig(
            input_size=input_size, output_size=output_size, latent_channels=latent_channels,
            channel_progression=None if channel_progression is None else tuple(channel_progression),
            num_upsample_layers=num_upsample_layers, use_bn=use_bn, output_activation=output_activation,
            use_amp=use_amp, **extra))

    @classmethod
    def from_config(cls, config: NetworkConfig | ProgressiveDecoderConfig | dict[str, Any],
                    ) -> ProgressiveDecoder:
        """Mode 5: build from a `NetworkConfig` (or our own config / its dict)."""
        if isinstance(config, NetworkConfig):
            config = config.to_model_config()
        elif isinstance(config, dict):
            config = ProgressiveDecoderConfig.from_dict(config)
        return cls(config)

    # ----------------------------------------------------------------- computation
    def _decode(self) -> torch.Tensor:
        if self._checkpoint_segments and self.training and torch.is_grad_enabled():
            return self._decode_checkpointed()
        return self.decoder(self.input_vec)

    def _decode_checkpointed(self) -> torch.Tensor:
        """Like `checkpoint_sequential`: every segment but the last is recomputed in backward."""
        layers = list(self.decoder)
        size = math.ceil(len(layers) / self._checkpoint_segments)
        segments = [nn.Sequential(*layers[i:i + size]) for i in range(0, len(layers), size)]
        context_fn = no_bn_update_on_recompute(self)
        x = self.input_vec
        for segment in segments[:-1]:
            x = checkpoint(segment, x, use_reentrant=False, context_fn=context_fn)
        return segments[-1](x)

    def forward(self) -> torch.Tensor:
        """Render the image (1, 1, input_size, input_size); CUDA autocast when `use_amp`."""
        if self.config.use_amp and self.input_vec.is_cuda:
            with torch.autocast("cuda", dtype=torch.float16):
                return self._decode()
        return self._decode()

    def render(self) -> torch.Tensor:
        """The exported image: one plain decoder pass (no autocast, no checkpointing)."""
        return self.decoder(self.input_vec)

    def generate_fp32(self) -> torch.Tensor:
        """Render in float32 with autocast disabled, whatever `use_amp` says."""
        with torch.autocast(device_type=self.input_vec.device.type, enabled=False):
            return self._decode().float()

    # ----------------------------------------------------------------- performance
    def fuse_conv_bn(self) -> int:
        """Fold every eval-mode BatchNorm into the conv before it (BN → Identity); returns the count."""
        if self.training:
            raise RuntimeError("fuse_conv_bn needs eval mode (BatchNorm running statistics); call .eval()")
        fused = 0
        for i in range(1, len(self.decoder)):
            conv, bn = self.decoder[i - 1], self.decoder[i]
            if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d | nn.ConvTranspose2d):
                transpose = isinstance(conv, nn.ConvTranspose2d)
                self.decoder[i - 1] = fuse_conv_bn_eval(conv, bn, transpose=transpose)
                self.decoder[i] = nn.Identity()
                fused += 1
        self.fused = self.fused or fused > 0
        return fused

    def prepare_for_inference(self, compile_mode: str | None = None,
                              free_memory: bool = True) -> ProgressiveDecoder:
        """Eval mode, Conv-BN fusion, frozen parameters, optional torch.compile, optional CUDA cache free."""
        self.eval()
        self.fuse_conv_bn()
        self.requires_grad_(False)
        if compile_mode is not None:
            self.compile(compile_mode)
        if free_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self

    def compile(self, mode: str = "default", **kwargs: Any) -> ProgressiveDecoder:  # type: ignore[override]
        """torch.compile this module in place (first call compiles); returns self."""
        _check_choice("compile mode", mode, COMPILE_MODES)
        super().compile(mode=mode, **kwargs)
        return self

    def enable_gradient_checkpointing(self, segments: int | None = None) -> None:
        """Recompute activations in backward (one segment per upsampling block by default)."""
        segments = segments if segments is not None else self.arch.num_upsample_layers + 2
        if segments < 1:
            raise ValueError(f"segments must be >= 1; got {segments}")
        self._checkpoint_segments = min(segments, len(self.decoder))

    def disable_gradient_checkpointing(self) -> None:
        self._checkpoint_segments = 0

    @torch.no_grad()
    def benchmark(self, num_iterations: int = 100, warmup: int = 10,
                  measure_memory: bool = True) -> dict[str, float]:
        """Time eval-mode forward passes: avg_time_ms, fps, num_parameters (+ memory_mb on CUDA)."""
        if num_iterations < 1 or warmup < 0:
            raise ValueError(f"need num_iterations >= 1 and warmup >= 0; got {num_iterations}, {warmup}")
        device = self.input_vec.device
        on_cuda = device.type == "cuda"
        was_training = self.training
        self.eval()
        try:
            for _ in range(warmup):
                self()
            if on_cuda:
                torch.cuda.synchronize(device)
                if measure_memory:
                    torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(num_iterations):
                self()
            if on_cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
        finally:
            self.train(was_training)
        avg_ms = elapsed / num_iterations * 1000.0
        results: dict[str, float] = {
            "avg_time_ms": avg_ms,
            "fps": 1000.0 / avg_ms if avg_ms > 0 else math.inf,
            "num_parameters": sum(p.numel() for p in self.parameters()),
        }
        if on_cuda and measure_memory:
            results["memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return results

    # ----------------------------------------------------------------- family protocol
    def get_config(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def capabilities(self) -> list[str]:
        return ["decode", "sample"]

    def output_range(self) -> tuple[float, float]:
        return OUTPUT_ACTIVATIONS[self.config.output_activation]

    def preprocessing(self) -> dict[str, Any]:
        return {"channels": 1, "input_size": None, "resize": "none", "output_range": self.output_range()}

    def sampler_spec(self) -> dict[str, Any]:
        """`SamplerSpec` fields for the manifest: `sample` renders the fixed learned image."""
        return {"kind": "fixed_render", "image_shape": [1, self.arch.input_size, self.arch.input_size]}

    def export_ops(self, batch_size: int = 2) -> list[ExportOp]:
        """One `decode` op with NO inputs (the latent is a parameter) returning (1, 1, N, N).

        `batch_size` does not apply: the model renders exactly one image.
        """
        return [ExportOp(name="decode", module=OpModule(self, "render"), example_inputs=(), input_names=[],
                         output_names=["image"], dynamic_hw=False, check_shapes=[])]


# --------------------------------------------------------------------- registered variants
def _variant(defaults: dict[str, Any], overrides: dict[str, Any]) -> ProgressiveDecoder:
    return ProgressiveDecoder(ProgressiveDecoderConfig.from_dict({**defaults, **overrides}))


@register_model("progressive_decoder")
def progressive_decoder(**overrides: Any) -> ProgressiveDecoder:
    """Automatic configuration, 256 grid with a 128 object (the public fixture): 699,735 parameters."""
    return _variant({"input_size": 256, "output_size": 128}, overrides)


@register_model("progressive_decoder_tiny")
def progressive_decoder_tiny(**overrides: Any) -> ProgressiveDecoder:
    """Automatic configuration, 64 grid with a 32 object: 43,799 parameters."""
    return _variant({"input_size": 64, "output_size": 32}, overrides)
