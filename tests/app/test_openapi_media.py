"""The OpenAPI document says what the capability routes really take and give, and cannot drift from them.

From `/openapi.json` of the service over the tiny store: every capability route documents its request
media types, its answer media types with their headers, and the `ErrorBody` of each error it can answer;
then a real request with every documented body media type is accepted (2xx), every documented answer
type is obtained through Accept and through ?format=, the headers it documents are sent, JSON answers
and real errors validate against the documented schemas, and the documented query parameters are the
ones the code reads."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from jsonschema import validate
from PIL import Image

from app.admission import DEADLINE_HEADER, TIMEOUT_HEADER, retry_after
from app.api import io as api_io
from app.api.capabilities import CAPABILITIES
from app.api.negotiation import FORMAT_MEDIA_TYPES
from app.api.spec import CapabilitySpec
from app.api.v1 import FORMATS
from app.errors import InvalidInput
from app.preprocess import raw_detector
from app.schemas.manifest import IntensityScaling, PatternGeometry, Preprocessing
from tests.app.conftest import assert_error, make_settings, npy_bytes

SPECS = {spec.name: spec for spec in CAPABILITIES}
RNG = np.random.default_rng(0)
IMAGE = RNG.random((2, 16, 16), dtype=np.float32)  # tiny-ae takes 1x16x16 images and gives 8 latents


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(stack: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (stack * 65535).astype(np.uint16))
    return buffer.getvalue()


# one real body per (input kind, documented media type): a documented type without one fails the test
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("images", "image/png"): {"content": png_bytes(IMAGE[0])},
    ("images", "image/tiff"): {"content": tiff_bytes(IMAGE)},
    ("images", "application/x-npy"): {"content": npy_bytes(IMAGE)},
    ("images", "application/octet-stream"): {"content": npy_bytes(IMAGE[:1, None])},
    ("images", "multipart/form-data"): {
        "files": [("files", (f"{i}.png", png_bytes(frame), "image/png")) for i, frame in enumerate(IMAGE)]
    },
    ("latents", "application/json"): {"content": json.dumps({"latents": RNG.random((2, 8)).tolist()})},
    ("latents", "application/x-npy"): {"content": npy_bytes(RNG.random((2, 8), dtype=np.float32))},
    ("latents", "application/octet-stream"): {"content": npy_bytes(RNG.random(8, dtype=np.float32))},
    ("sample-request", "application/json"): {"content": json.dumps({"num_samples": 2, "seed": 3})},
}
# the models each capability's answers are checked on (tiny-ddim: the DDIM headers; tiny-render: no input)
ANSWER_MODELS = {"sample": ["tiny-ae", "tiny-ddim", "tiny-render"], "decode": ["tiny-ae", "tiny-render"]}
DDIM_BODY = {"num_samples": 2, "seed": 1, "steps": 2, "condition": {"a": "low", "b": "calm"}}


@pytest.fixture(scope="module")
def openapi(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def versions(client) -> dict[str, str]:
    return {m["name"]: m["version"] for m in client.get("/v1/models").json()["models"]}


def capability_routes(openapi: dict[str, Any]) -> Iterator[tuple[str, CapabilitySpec, dict[str, Any]]]:
    """(path, spec, POST operation) of every capability route, however many protocols register it."""
    for path, item in openapi["paths"].items():
        capability = path.rsplit("/", 1)[-1]
        if path.startswith("/v1/models/{name}/") and capability in SPECS and "post" in item:
            yield path, SPECS[capability], item["post"]


def url(path: str, model: str, versions: dict[str, str]) -> str:
    return path.replace("{name}", model).replace("{version}", versions[model])


def request_body(spec: CapabilitySpec, media: str, model: str) -> dict[str, Any]:
    if spec.name == "sample" and model == "tiny-ddim":
        return {"content": json.dumps(DDIM_BODY), "headers": {"Content-Type": media}}
    if spec.name == "decode" and model == "tiny-render":
        return {}
    body = BODIES.get((spec.input, media))
    assert body is not None, f"{spec.name} documents {media}: add a real body for it to BODIES"
    return body if "files" in body else {**body, "headers": {"Content-Type": media}}


def with_schemas(schema: dict[str, Any], openapi: dict[str, Any]) -> dict[str, Any]:
    """A documented schema with the document's components, so that its $refs resolve."""
    return {**schema, "components": openapi["components"]}


def test_every_capability_route_is_documented(openapi) -> None:
    routes = list(capability_routes(openapi))
    assert {spec.name for _, spec, _ in routes} == set(SPECS)
    for path, spec, operation in routes:
        content = operation["requestBody"]["content"]
        accepted = {"images": api_io.IMAGE_MEDIA_TYPES, "latents": api_io.LATENT_MEDIA_TYPES}.get(spec.input)
        if accepted is None:  # the sample request: FastAPI's own JSON body
            assert list(content) == ["application/json"], path
        else:  # every type the reader accepts is documented, and nothing it refuses
            assert all(m.startswith(accepted) for m in content), path
            assert all(any(m.startswith(a) for m in content) for a in accepted), path
        answer = operation["responses"]["200"]
        assert set(answer["content"]) == {FORMAT_MEDIA_TYPES[f] for f in FORMATS[spec.output]}, path
        assert "Vary" in answer["headers"] and set(h.name for h in spec.headers) <= set(answer["headers"])
        errors = {int(s) for s in operation["responses"] if s[0] in "45"}
        expected = {401, 404, 406, 408, 413, 422, 429, 500, 503, 504}
        expected |= {415} if accepted else {400}
        expected |= {501} if spec.name == "attention-map" else set()
        assert expected <= errors, (path, expected - errors)
        for status in errors:
            documented = operation["responses"][str(status)]
            assert documented["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert required_headers(operation["responses"]["429"]) == set(retry_after(1.0)) == {"Retry-After"}
        assert "Retry-After" in operation["responses"]["503"]["headers"]
        assert required_headers(operation["responses"]["401"]) == {"WWW-Authenticate"}


def required_headers(documented: dict[str, Any]) -> set[str]:
    return {name for name, header in documented.get("headers", {}).items() if header["required"]}


def test_every_documented_request_media_type_is_accepted(client, openapi, versions) -> None:
    for path, spec, operation in capability_routes(openapi):
        model = "tiny-ae"
        for media in operation["requestBody"]["content"]:
            response = client.post(url(path, model, versions), **request_body(spec, media, model))
            assert response.status_code == 200, (path, media, response.text)
        if not operation["requestBody"].get("required", False):  # an empty body: fixed render or defaults
            model = "tiny-render" if spec.name == "decode" else "tiny-ae"
            response = client.post(url(path, model, versions))
            assert response.status_code == 200, (path, "empty body", response.text)


def check_answer(response, media: str, answer: dict[str, Any], openapi: dict[str, Any]) -> set[str]:
    """The answer is `media` with every header documented as always sent with it and no undocumented X- header;
    the documented headers it carries."""
    assert response.status_code == 200, (media, response.text)
    assert response.headers["content-type"].split(";")[0] == media
    for name, header in answer["headers"].items():
        if header["required"] or media in header.get("x-media-types", []):
            assert name in response.headers, (name, media)
    assert "Accept" in response.headers["vary"]
    undocumented = {h for h in response.headers if h.startswith("x-")} - {h.lower() for h in answer["headers"]}
    assert not undocumented, (media, undocumented)  # every X- header sent is documented too
    if media == "application/json":
        validate(response.json(), with_schemas(answer["content"][media]["schema"], openapi))
    return {name for name in answer["headers"] if name in response.headers}


def test_every_documented_answer_type_can_be_obtained_with_its_headers(client, openapi, versions) -> None:
    for path, spec, operation in capability_routes(openapi):
        answer, seen = operation["responses"]["200"], set()
        fmt_of = {media: fmt for fmt, media in FORMAT_MEDIA_TYPES.items()}
        for model in ANSWER_MODELS.get(spec.name, ["tiny-ae"]):
            media_in = next(iter(operation["requestBody"]["content"]))
            for media in answer["content"]:
                body = request_body(spec, media_in, model)
                target = url(path, model, versions)
                by_accept = client.post(target, **{**body, "headers": {**body.get("headers", {}), "Accept": media}})
                seen |= check_answer(by_accept, media, answer, openapi)
                by_format = client.post(f"{target}?format={fmt_of[media]}", **body)
                seen |= check_answer(by_format, media, answer, openapi)
        assert seen == set(answer["headers"]), (path, set(answer["headers"]) - seen)


def test_every_route_of_a_capability_is_documented_alike(openapi) -> None:
    """The plain and the per-version route of a capability share one documentation (`route_documentation`)."""
    by_capability: dict[str, list[dict[str, Any]]] = {}
    for _, spec, operation in capability_routes(openapi):
        by_capability.setdefault(spec.name, []).append(operation)
    for operations in by_capability.values():
        for operation in operations[1:]:
            assert operation["requestBody"] == operations[0]["requestBody"]
            assert operation["responses"] == operations[0]["responses"]


def test_documented_latent_dtypes_are_answered(client, openapi, versions) -> None:
    for path, spec, operation in capability_routes(openapi):
        if spec.output != "latents":
            continue
        (dtype,) = [p for p in operation["parameters"] if p["name"] == "dtype"]
        for value in dtype["schema"]["enum"]:
            response = client.post(f"{url(path, 'tiny-ae', versions)}?format=npy&dtype={value}",
                                   **request_body(spec, "application/x-npy", "tiny-ae"))
            assert response.status_code == 200
            assert np.load(io.BytesIO(response.content)).dtype == np.dtype(value)
        assert_error(client.post(f"{url(path, 'tiny-ae', versions)}?dtype=int8", content=npy_bytes(IMAGE)),
                     422, field="dtype", limit=dtype["schema"]["enum"])


INVALID_QUERIES = {"images": "?bit_depth=12", "attention": "?saliency=false&format=png", "latents": "?dtype=int8"}


def provoked_errors(spec: CapabilitySpec, target: str, media: str) -> dict[str, dict[str, Any]]:
    """Requests each refused with the error its name says, by the route of `spec` at `target`."""
    body = request_body(spec, media, "tiny-ae")
    errors = {
        "404": {"url": target.replace("tiny-ae", "no-such-model"), **body},
        "406": {"url": target, **body, "headers": {**body.get("headers", {}), "Accept": "text/html"}},
        "413": {"url": target, "content": b"0" * 200_001, "headers": {"Content-Type": media}},
        "422": {"url": target + INVALID_QUERIES[spec.output], **body},
    }
    if spec.input in ("images", "latents"):
        errors["415"] = {"url": target, "content": b"hello", "headers": {"Content-Type": "text/plain"}}
    return errors


def test_real_errors_are_documented_and_match_the_error_schema(client, openapi, versions) -> None:
    error_schema = with_schemas({"$ref": "#/components/schemas/ErrorBody"}, openapi)
    for path, spec, operation in capability_routes(openapi):
        media = next(iter(operation["requestBody"]["content"]))
        for status, request in provoked_errors(spec, url(path, "tiny-ae", versions), media).items():
            response = client.post(**request)
            assert str(response.status_code) == status, (path, status, response.text)
            assert status in operation["responses"], (path, status)
            validate(response.json(), error_schema)
            assert all(name in response.headers for name in required_headers(operation["responses"][status]))
        if spec.input == "sample-request":  # no 415 here: FastAPI validates any body against the request model
            response = client.post(url(path, "tiny-ae", versions), content=b"x", headers={"Content-Type": "text/plain"})
            assert response.status_code == 422 and "415" not in operation["responses"]


def test_401_is_answered_as_documented(tmp_path: Path, openapi) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(tmp_path, api_token="a-token-of-32-characters-or-more"))) as guarded:
        for path, _, operation in capability_routes(openapi):
            response = guarded.post(path.replace("{name}", "tiny-ae").replace("{version}", "1"), content=b"")
            assert_error(response, 401, field="Authorization")
            assert all(name in response.headers for name in required_headers(operation["responses"]["401"]))


def test_the_readmes_header_names_are_the_documented_ones(openapi) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    named = set(re.findall(r"`(X-[A-Za-z-]+)", readme))
    documented = {TIMEOUT_HEADER, DEADLINE_HEADER}  # request headers
    for _, _, operation in capability_routes(openapi):
        for answer in operation["responses"].values():
            documented |= set(answer.get("headers", {}))
    assert {"X-Grid-Rows", "X-Image-Count"} <= named <= documented, named - documented


RAW = Preprocessing(
    input_size=(16, 16),
    intensity=IntensityScaling(i_max=0.01, dynamic_range=1e4),
    pattern=PatternGeometry(size=(16, 16), angular_sampling_mrad=(1.6, 1.6)),
)


def test_raw_frame_parameters_are_the_ones_the_service_reads(openapi) -> None:
    for path, spec, operation in capability_routes(openapi):
        params = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
        raw = {"intensity", "angular_sampling_mrad", "counts_per_probe"}
        assert raw <= set(params) if spec.input == "images" else not raw & set(params), path
    operation = next(op for _, spec, op in capability_routes(openapi) if spec.name == "encode")
    params = {p["name"]: p["schema"] for p in operation["parameters"] if p["in"] == "query"}
    assert raw_detector(RAW, {"intensity": "scaled"}) is None
    detector = raw_detector(RAW, {"angular_sampling_mrad": params["angular_sampling_mrad"]["example"],
                                  "counts_per_probe": str(params["counts_per_probe"]["example"])})
    assert detector is not None and detector.counts_per_probe == params["counts_per_probe"]["example"]
    assert re.fullmatch(params["angular_sampling_mrad"]["pattern"], "1.2,1.3")
    for name, bad in [("intensity", "log"), ("angular_sampling_mrad", "-1"), ("counts_per_probe", "0")]:
        with pytest.raises(InvalidInput) as refused:  # each documented name is the field the code refuses
            raw_detector(RAW, {name: bad})
        assert refused.value.field == name


@pytest.fixture(scope="module")
def stem_client(store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A service over one raw-frame model: tiny-ae's encoder behind a 4D-STEM preprocessing (16x16 patterns)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.app.tiny_store import LATENT, artifact, tensor, write_manifest

    version = tmp_path_factory.mktemp("stem_store") / "tiny-stem" / "1"
    version.mkdir(parents=True)
    shutil.copy(store / "tiny-ae" / "10" / "encode.onnx", version / "encode.onnx")
    write_manifest(
        version, family="tiny-ae", config={}, capabilities=["encode"],
        preprocessing={"channels": 1, "input_size": [16, 16], **RAW.model_dump(include={"intensity", "pattern"})},
        ops={"encode": {"inputs": [tensor("image", [-1, 1, 16, 16])], "outputs": [tensor("latent", [-1, LATENT])],
                        "artifacts": {"onnx": "encode.onnx"}}},
        artifacts=[artifact(version, "encode.onnx", "onnx", "encode")],
    )
    with TestClient(create_app(make_settings(version.parent.parent))) as client:
        yield client


def test_raw_frames_with_the_documented_parameters_are_served(stem_client) -> None:
    openapi = stem_client.get("/openapi.json").json()
    for path, _, operation in capability_routes(openapi):
        if not path.endswith("/{name}/encode"):
            continue
        params = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
        assert {"intensity", "angular_sampling_mrad", "counts_per_probe"} <= params
        counts = RNG.integers(0, 500, (2, 16, 16)).astype(np.uint16)
        wide = np.zeros((2, 24, 24), np.uint16)
        wide[:, 4:20, 4:20] = counts  # zero angle at pixel 12 of 24 = pixel 8 of the model's 16
        target = path.replace("{name}", "tiny-stem") + "?format=npy"
        npy = {"Content-Type": "application/x-npy"}
        same_size = stem_client.post(f"{target}&counts_per_probe=1e5", content=npy_bytes(counts), headers=npy)
        rebinned = stem_client.post(f"{target}&counts_per_probe=1e5&angular_sampling_mrad=1.6",
                                    content=npy_bytes(wide), headers=npy)
        assert same_size.status_code == rebinned.status_code == 200, (same_size.text, rebinned.text)
        np.testing.assert_allclose(np.load(io.BytesIO(rebinned.content)), np.load(io.BytesIO(same_size.content)),
                                   atol=1e-5)
        assert_error(stem_client.post(target, content=npy_bytes(wide), headers=npy), 422,
                     field="angular_sampling_mrad", code="angular_sampling_required")
        scaled = stem_client.post(f"{target}&intensity=scaled", content=npy_bytes(IMAGE), headers=npy)
        assert scaled.status_code == 200 and np.load(io.BytesIO(scaled.content)).shape == (2, 8)
