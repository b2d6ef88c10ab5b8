"""Open Inference Protocol (v2) tensors: the request header, JSON and binary tensor data, the answer.

Pure functions between bytes and arrays, nothing async: `app.api.v2` holds memory and runs them in the
decoding pool. Every problem with a client's request is an `InvalidInput` (422) naming the field (a
JSON path into the request, e.g. `inputs[0].shape`) and the limit.

Binary tensor data extension (Triton's `binary_tensor_data`, adopted by KServe): the body is the JSON
header (`Inference-Header-Content-Length` bytes long) followed by the raw data of every input whose
`parameters.binary_data_size` is set, in the order of `inputs`; little-endian, row-major, no padding.
Outputs go back as binary data when `parameters.binary_data_output` (request) or
`outputs[i].parameters.binary_data` (that output; it wins) asks for it; the answer then carries its own
`Inference-Header-Content-Length`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from app.errors import InvalidInput
from app.schemas.manifest import DType, OpSpec, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
MAX_RANK = 8
JSON_BYTES_PER_NUMBER = 40  # a parsed JSON number: a Python float (24 B) and its list slot, with slack

# v2 datatype -> little-endian numpy dtype (the binary layout); BYTES is known but no op takes or gives it
WIRE_DTYPES: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "INT8": "|i1", "UINT16": "<u2", "INT16": "<i2", "UINT32": "<u4",
    "INT32": "<i4", "UINT64": "<u8", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
KNOWN_DATATYPES = (*WIRE_DTYPES, "BYTES")
V2_DATATYPE: dict[DType, str] = {
    "float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8",
}

Parameter = StrictBool | StrictInt | StrictFloat | StrictStr
Arrays = dict[str, np.ndarray]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # e.g. "model_name" in the spec's own examples


class RequestInput(_Lenient):
    name: str
    shape: list[int] = Field(max_length=MAX_RANK)
    datatype: str
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(_Lenient):
    name: str
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class InferenceRequest(_Lenient):
    id: str | None = None
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(max_length=16)
    outputs: list[RequestOutput] | None = Field(None, max_length=16)


def accepted_datatypes(spec: TensorSpec) -> tuple[str, ...]:
    """The v2 datatypes an input takes: its own, a lossless widening, and UINT8 for float images (scaled
    to [0, 1] by 255, as v1 scales 8-bit uploads)."""
    own = V2_DATATYPE[spec.dtype]
    extra = {"FP32": ("FP16",), "FP16": ("FP32",), "INT64": ("INT32",)}.get(own, ())
    image = ("UINT8",) if own == "FP32" and len(spec.shape) == 4 else ()
    return (own, *extra, *image)


# ------------------------------------------------------------------------------------------ request body
def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) of a request body; without the header all of it is JSON."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isdigit() or not 0 < int(text) <= len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH}: {header_length[:32]!r} for a body of {len(body)} bytes",
            field=HEADER_LENGTH,
            limit=f"an integer from 1 to {len(body)} (the body's length)",
        )
    size = int(text)
    return body[:size], memoryview(body)[size:]


def parse_cost(header: bytes) -> int:
    """Bytes the header may take once parsed (counted before parsing): its numbers as Python objects."""
    return len(header) + (header.count(b",") + 1) * JSON_BYTES_PER_NUMBER


def parse_header(header: bytes) -> InferenceRequest:
    """The inference request object; 422 naming the first wrong field."""
    try:
        payload = json.loads(header)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidInput(f"request header is not JSON: {exc}", field="body", limit="a JSON object") from exc
    try:
        return InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in first["loc"]).replace(".[", "[")
        ctx = first.get("ctx") or {}
        limit = ctx.get("max_length", ctx.get("expected", "the v2 inference request schema"))
        raise InvalidInput(f"{where or 'body'}: {first['msg']}", field=where or "body", limit=limit) from exc


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class TensorLimits:
    """What one request's inputs may be: frames per request, and the check of a dynamic image size."""

    max_frames: int
    check_hw: Callable[[tuple[int, int], str], None]  # raises InvalidInput for an unacceptable (H, W)
    charge: Callable[[int, str, str], None]  # hold (bytes, field, what) for the request, 413 past its budget


def match_inputs(request: InferenceRequest, op: OpSpec) -> list[tuple[int, RequestInput, TensorSpec]]:
    """Each request input with its index and the op's spec of it; 422 for unknown, repeated or missing."""
    specs = {spec.name: spec for spec in op.inputs}
    names = list(specs)
    seen: set[str] = set()
    matched = []
    for index, item in enumerate(request.inputs):
        if item.name not in specs or item.name in seen:
            problem = "repeats an input" if item.name in seen else "is not an input of this model"
            raise InvalidInput(f"input {item.name!r} {problem}", field=f"inputs[{index}].name", limit=names)
        seen.add(item.name)
        matched.append((index, item, specs[item.name]))
    missing = [name for name in names if name not in seen]
    if missing:
        raise InvalidInput(f"inputs {missing} are missing", field="inputs", limit=names)
    return matched


def check_shape(item: RequestInput, spec: TensorSpec, index: int, limits: TensorLimits) -> None:
    """The input's shape against the op's: rank, fixed axes, the batch axis and a dynamic image size."""
    field = f"inputs[{index}].shape"
    want = spec.shape
    fits = len(item.shape) == len(want) and all(w < 0 or w == h for h, w in zip(item.shape, want, strict=True))
    if not fits or any(h < 0 for h in item.shape):
        raise InvalidInput(f"input {item.name!r} has shape {item.shape}", field=field, limit=want)
    if want and want[0] < 0 and not 1 <= item.shape[0] <= limits.max_frames:
        raise InvalidInput(
            f"input {item.name!r} has a batch of {item.shape[0]}", field=field, limit=f"1..{limits.max_frames}"
        )
    if len(want) == 4 and (want[2] < 0 or want[3] < 0):
        limits.check_hw((item.shape[2], item.shape[3]), field)


def check_datatype(item: RequestInput, spec: TensorSpec, index: int) -> None:
    allowed = accepted_datatypes(spec)
    if item.datatype not in allowed:
        known = "" if item.datatype in KNOWN_DATATYPES else "unknown "
        raise InvalidInput(
            f"input {item.name!r} has {known}datatype {item.datatype!r}", field=f"inputs[{index}].datatype",
            limit=list(allowed),
        )


def binary_size(item: RequestInput, index: int) -> int | None:
    """`parameters.binary_data_size` of an input (None: its data is JSON)."""
    size = item.parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(
            f"binary_data_size {size!r}", field=f"inputs[{index}].parameters.binary_data_size",
            limit="a non-negative integer",
        )
    return size


def wire_array(item: RequestInput, index: int, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """The input's values as sent (binary slice or JSON data), shaped; and the next binary offset."""
    dtype = np.dtype(WIRE_DTYPES[item.datatype])
    count = math.prod(item.shape)
    size = binary_size(item, index)
    if size is not None:
        field = f"inputs[{index}].parameters.binary_data_size"
        if size != count * dtype.itemsize:
            raise InvalidInput(
                f"binary_data_size {size} for {item.datatype} {item.shape}", field=field,
                limit=count * dtype.itemsize,
            )
        if offset + size > len(binary):
            raise InvalidInput(
                f"input {item.name!r} needs {size} binary bytes at offset {offset}; the body holds {len(binary)}",
                field=field, limit=len(binary) - offset,
            )
        return np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(item.shape), offset + size
    field = f"inputs[{index}].data"
    if item.data is None:
        raise InvalidInput(f"input {item.name!r} has neither data nor binary_data_size", field=field, limit=count)
    try:
        array = np.asarray(item.data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(
            f"data of {item.name!r} are not {item.datatype} values: {exc}", field=field, limit=item.datatype
        ) from exc
    if array.size != count:
        raise InvalidInput(f"data of {item.name!r} hold {array.size} values", field=field, limit=count)
    return array.reshape(item.shape), offset


def model_array(array: np.ndarray, item: RequestInput, spec: TensorSpec, index: int) -> np.ndarray:
    """Wire values -> the op's dtype (UINT8 images to [0, 1] floats); NaN/Inf refused."""
    if item.datatype == "UINT8" and spec.dtype != "uint8":
        out = array.astype(np.float32) / np.float32(255.0)
    elif array.flags.writeable:
        out = np.ascontiguousarray(array, dtype=np.dtype(spec.dtype))
    else:  # binary data are a view of the body: runtimes (torch.from_numpy) want arrays they may own
        out = np.array(array, dtype=np.dtype(spec.dtype))
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise InvalidInput(f"input {item.name!r} holds NaN or Inf", field=f"inputs[{index}].data", limit="finite")
    return out


def decode_inputs(request: InferenceRequest, binary: memoryview, op: OpSpec, limits: TensorLimits) -> Arrays:
    """The op's inputs from the request: matched by name, checked against the op's specs (datatype, shape,
    batch, dynamic size), sized against the request's budget before they are allocated, then converted."""
    matched = match_inputs(request, op)
    for index, item, spec in matched:
        check_datatype(item, spec, index)
        check_shape(item, spec, index, limits)
    batches = {item.shape[0] for _, item, spec in matched if spec.shape and spec.shape[0] < 0}
    if len(batches) > 1:
        raise InvalidInput(f"inputs have batches {sorted(batches)}", field="inputs", limit="one batch size")
    arrays: Arrays = {}
    offset = 0
    for index, item, spec in matched:
        nbytes = math.prod(item.shape) * np.dtype(spec.dtype).itemsize
        limits.charge(nbytes, f"inputs[{index}]", f"input {item.name!r} {item.shape} {spec.dtype}")
        wire, offset = wire_array(item, index, binary, offset)
        arrays[spec.name] = model_array(wire, item, spec, index)
    if offset != len(binary):
        raise InvalidInput(
            f"the body holds {len(binary)} bytes of binary data; the inputs' binary_data_size add up to {offset}",
            field=HEADER_LENGTH, limit=offset,
        )
    return arrays


# ------------------------------------------------------------------------------------------ outputs
def wants_binary(request: InferenceRequest) -> dict[str, bool]:
    """Output name -> binary or JSON, for the outputs asked for (all outputs when none are named)."""
    default = request.parameters.get("binary_data_output") is True
    return {
        out.name: out.parameters.get("binary_data", default) is True for out in request.outputs or ()
    } or {"*": default}


def select_outputs(request: InferenceRequest, op: OpSpec) -> list[tuple[TensorSpec, bool]]:
    """(spec, as binary) of every output to send, in the request's order; 422 for unknown names."""
    wanted = wants_binary(request)
    specs = {spec.name: spec for spec in op.outputs}
    if "*" in wanted:
        return [(spec, wanted["*"]) for spec in op.outputs]
    for index, name in enumerate(wanted):
        if name not in specs:
            raise InvalidInput(f"output {name!r} is not an output of this model", field=f"outputs[{index}].name",
                               limit=list(specs))
    return [(specs[name], binary) for name, binary in wanted.items()]


def output_values(spec: TensorSpec, batch: int) -> int | None:
    """Values of an output for a batch (None: a dynamic axis other than the batch makes it unknown)."""
    shape = [batch if i == 0 and d < 0 else d for i, d in enumerate(spec.shape)]
    return None if any(d < 0 for d in shape) else math.prod(shape)


def encode_response(
    head: dict[str, Any], outputs: Arrays, selected: Sequence[tuple[TensorSpec, bool]]
) -> tuple[bytes, int | None]:
    """The answer body, and the JSON header's length when any output goes as binary data (else None)."""
    described, blobs = [], []
    for spec, binary in selected:
        array = np.ascontiguousarray(outputs[spec.name])
        datatype = V2_DATATYPE.get(array.dtype.name, "FP32")  # type: ignore[call-overload]
        array = array.astype(np.dtype(WIRE_DTYPES[datatype]), copy=False)
        entry: dict[str, Any] = {"name": spec.name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blobs.append(array.tobytes())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    header = json.dumps({**head, "outputs": described}).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
