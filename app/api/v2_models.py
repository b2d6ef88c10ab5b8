"""Open Inference Protocol (v2) model names: which model, version and op a v2 name means, and its metadata.

Mapping (see `app.api.v2` for why): every op of a model's manifest is the v2 model `<model>.<op>`
(`v3-small-201.encode`, `.decode`, `.reconstruct`, `.attention_matrix`, `diffusion-layouts.denoise`);
the plain `<model>` is its default op (the first of `OP_ORDER` it has; `encode` for the autoencoders)
and takes any other with the request parameter `op`. Inputs and outputs are the op's manifest tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.api.v2_tensors import V2_DATATYPE, InferenceRequest, accepted_datatypes
from app.errors import InvalidInput, ModelNotFound, ModelUnavailable
from app.schemas.manifest import OpSpec, TensorSpec
from app.store import ModelRecord, ModelRegistry
from app.versions import find_version

OP_ORDER = ("encode", "decode", "reconstruct", "attention_matrix", "denoise")
OP_PARAMETER = "op"
PLATFORMS = {"onnx": "onnxruntime_onnx", "torch_export": "pytorch_torch_export", "aoti": "pytorch_aoti"}


@dataclass(frozen=True)
class Target:
    """What a v2 model name resolves to: the record and the op its name fixes (None: the plain name)."""

    name: str  # the v2 model name as asked
    record: ModelRecord
    op: str | None
    served: tuple[str, ...] = ()  # every version of the model being served

    @property
    def metric_op(self) -> str:
        """The `op` label of the request's metrics: the op, or `infer` while a plain name's op is unknown."""
        return self.op or "infer"


def served_version(registry: ModelRegistry, record: ModelRecord, version: str | None) -> ModelRecord:
    """The record of `version` of the model (None: its default version, `record`); 404 naming the served
    versions for another. The one place v2 looks a version up (`app.versions.find_version`, as v1 does)."""
    return record if version is None else find_version(registry, record, version)


def manifest_ops(record: ModelRecord) -> list[str]:
    """The record's ops in `OP_ORDER` (empty while its manifest is unread)."""
    if record.manifest is None:
        return []
    return [op for op in OP_ORDER if op in record.manifest.ops]


def resolve(registry: ModelRegistry, name: str, version: str | None = None) -> Target:
    """The target of a v2 model name: a store model by its exact name, else `<model>.<op>`; 404 otherwise."""
    record = registry.get(name)
    op = None
    if record is None and "." in name:
        model, op = name.rsplit(".", 1)
        record = registry.get(model)
        if record is not None and op not in manifest_ops(record):
            raise ModelNotFound(
                f"model {model!r} has no op {op!r}", field="model_name",
                limit=[f"{model}.{o}" for o in manifest_ops(record)] or [model],
            )
    if record is None:
        raise ModelNotFound(
            f"no v2 model named {name!r} (names are <model> or <model>.<op>)", field="model_name",
            limit=sorted(r.name for r in registry),
        )
    served = tuple(r.version or "" for r in registry.versions(record.name))
    return Target(name, served_version(registry, record, version), op, served)


def default_op(record: ModelRecord) -> str:
    """The op the plain model name serves without an `op` parameter; 503 for a model without a manifest."""
    ops = manifest_ops(record)
    if not ops:
        raise ModelUnavailable(f"model {record.name!r} is unavailable: {record.reason}", field="model_name")
    return ops[0]


def choose_op(target: Target, request: InferenceRequest) -> str:
    """The op a request runs: fixed by the name, else the `op` parameter, else the default op."""
    asked = request.parameters.get(OP_PARAMETER)
    if target.op is not None:
        if asked is not None and asked != target.op:
            raise InvalidInput(
                f"parameter op={asked!r} contradicts the model name {target.name!r}",
                field=f"parameters.{OP_PARAMETER}", limit=[target.op],
            )
        return target.op
    if asked is None:
        return default_op(target.record)
    ops = manifest_ops(target.record)
    if asked not in ops:
        raise InvalidInput(f"op {asked!r} is not an op of {target.name!r}", field=f"parameters.{OP_PARAMETER}",
                           limit=ops)
    return str(asked)


def tensor_metadata(spec: TensorSpec, *, accepted: bool = False) -> dict[str, Any]:
    """`$metadata_tensor`: name, datatype and shape (-1: dynamic); inputs also list what they accept."""
    meta: dict[str, Any] = {"name": spec.name, "datatype": V2_DATATYPE[spec.dtype], "shape": list(spec.shape)}
    if accepted:
        meta["parameters"] = {"accepted_datatypes": ",".join(accepted_datatypes(spec))}
    return meta


def platform(record: ModelRecord, op_name: str, op: OpSpec) -> str:
    """The backend that runs the op: the format served (the manifest's first one before loading)."""
    fmt = record.formats.get(op_name) or op.preferred_format or next(iter(op.artifacts))
    return PLATFORMS.get(fmt, fmt)


def model_metadata(target: Target) -> dict[str, Any]:
    """`$metadata_model_response` of a v2 name (the plain name also maps its ops to their v2 names)."""
    record = target.record
    op_name = target.op or default_op(record)
    op = record.op(op_name)
    meta: dict[str, Any] = {
        "name": target.name,
        "versions": list(target.served),
        "platform": platform(record, op_name, op),
        "inputs": [tensor_metadata(spec, accepted=True) for spec in op.inputs],
        "outputs": [tensor_metadata(spec) for spec in op.outputs],
    }
    if target.op is None:
        meta["parameters"] = {OP_PARAMETER: op_name}
        meta["ops"] = {name: f"{record.name}.{name}" for name in manifest_ops(record)}
    return meta
