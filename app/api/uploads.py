"""Image uploads sized from their headers, then decoded: no HTTP here (`app.api.io` reads the request).

`plan_upload` reads every part's header (PNG IHDR/acTL, TIFF IFDs, NPY header) and charges the request's
memory budget for the uploaded bytes, the declared data and the model input before anything is decoded
(413 naming the part past it); `decode_upload` then decodes the planned parts frame by frame into the
model's input (N, C, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from app import codecs, preprocess
from app.budget import MemoryBudget
from app.errors import InvalidInput
from app.image_headers import ImageHeader, read_header
from app.schemas.manifest import Preprocessing
from app.settings import Settings


@dataclass(frozen=True)
class PartPlan:
    """One uploaded image as its header declares it, and the size the model will get it at."""

    field: str
    data: bytes
    header: ImageHeader
    size: tuple[int, int]


def plan_parts(
    blobs: list[tuple[str, bytes]], preprocessing: Preprocessing, input_shape: list[int], settings: Settings,
    raw: preprocess.RawDetector | None = None,
) -> list[PartPlan]:
    """Every part's header, the request's frames (a running total) and the model's sizes: nothing decoded."""
    channels = preprocess.model_channels(preprocessing, input_shape)
    side = settings.max_dynamic_side
    limits = {
        "max_hw": preprocessing.max_hw or (side, side),
        "max_pixels": preprocessing.max_pixels or settings.max_dynamic_pixels,
    }
    plans: list[PartPlan] = []
    frames = 0
    for field, data in blobs:
        header = read_header(data, field, settings.max_frames, frames_before=frames)
        frames += header.frames
        have = (header.height, header.width)
        if raw is not None:  # raw detector frames (4D-STEM): rebinned onto the model's pattern grid
            size = raw.model_size(have, header.bands, field)
        else:
            preprocess.check_channels(header.bands, channels, field)
            size = preprocess.model_input_size(have, preprocessing, input_shape, field=field, **limits)
        plans.append(PartPlan(field, data, header, size))
    sizes = {p.size for p in plans}
    if len(sizes) > 1:
        raise InvalidInput(
            "images of one request must share a size after preprocessing",
            field="files",
            limit=[[channels, *s] for s in sorted(sizes)],
        )
    return plans


def charge_plan(plans: list[PartPlan], channels: int, budget: MemoryBudget) -> tuple[int, int, int, int]:
    """Charge the uploaded bytes, the model input and each part's declared data (a running total over
    parts and frames), with each part's decoding checked on top: the model input's shape, or 413 naming
    the part that would pass the budget."""
    field = plans[0].field if len(plans) == 1 else "files"
    budget.charge(sum(len(p.data) for p in plans), field=field, what="the uploaded images")
    shape = (sum(p.header.frames for p in plans), channels, *plans[0].size)
    budget.charge(4 * math.prod(shape), field=field, what=f"the model input {list(shape)} float32")
    for p in plans:
        budget.charge(p.header.data_bytes, field=p.field, what=f"the data of {p.header.describe}")
        work = p.header.decoder_bytes + preprocess.frame_work_bytes(p.header, channels, p.size)
        budget.transient(work, field=p.field, what=f"decoding {p.header.describe}")
    return shape


@dataclass(frozen=True)
class UploadPlan:
    """An upload sized from its headers: its parts, the model input's shape and the bytes it holds."""

    parts: list[PartPlan]
    channels: int
    shape: tuple[int, int, int, int]
    held_bytes: int  # what the budget keeps charged: uploaded bytes + declared data + model input
    raw: preprocess.RawDetector | None = None  # raw detector frames, prepared by `RawDetector.prepare`

    @property
    def field(self) -> str:
        return self.parts[0].field if len(self.parts) == 1 else "files"


def plan_upload(
    blobs: list[tuple[str, bytes]], preprocessing: Preprocessing, input_shape: list[int], settings: Settings,
    raw: preprocess.RawDetector | None = None,
) -> UploadPlan:
    """Size every blob from its header within the request's budget (413 past it): nothing decoded."""
    parts = plan_parts(blobs, preprocessing, input_shape, settings, raw)
    channels = preprocess.model_channels(preprocessing, input_shape)
    budget = MemoryBudget(settings.max_request_memory_bytes)
    shape = charge_plan(parts, channels, budget)
    return UploadPlan(parts, channels, shape, budget.used, raw)


def decode_and_prepare(
    blobs: list[tuple[str, bytes]], preprocessing: Preprocessing, input_shape: list[int], settings: Settings
) -> np.ndarray:
    """`plan_upload`, then `decode_upload`, in one go."""
    return decode_upload(plan_upload(blobs, preprocessing, input_shape, settings))


def decode_upload(plan: UploadPlan) -> np.ndarray:
    """Decode a planned upload frame by frame into the model's input (N, C, H, W): integer images
    scaled to [0, 1], converted and resized."""
    out = np.empty(plan.shape, np.float32)
    index = 0
    for p in plan.parts:
        start = index
        for frame in codecs.iter_frames(p.data, p.header, p.field, plan.raw is None):
            out[index] = preprocess.prepare_frame(frame, plan.channels, p.size, plan.raw, p.field)
            index += 1
        if index - start != p.header.frames:
            raise InvalidInput(
                f"decoded {index - start} frames, its header declares {p.header.frames}",
                field=p.field,
                limit=p.header.frames,
            )
    return out
