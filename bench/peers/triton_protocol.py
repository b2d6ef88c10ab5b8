"""Triton's HTTP/REST inference protocol (KServe v2) with the binary tensor extension, for one BYTES item.

A request is a JSON header followed by the raw tensor, `Inference-Header-Content-Length` giving the
header's length; a BYTES element is its length (4 bytes, little-endian) and its bytes. The benchmark
sends the same request body that aeserve gets (a PNG or an NPY) as that one element, and asks for the
answer (a PNG or an NPY) the same way, so no JSON number lists or base64 are parsed on either side.
"""

from __future__ import annotations

import json
import struct

INPUT = "payload"
OUTPUT = "answer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def infer_request(payload: bytes) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer request whose one BYTES input element is `payload`."""
    tensor = bytes_element(payload)
    header = json.dumps(
        {
            "inputs": [
                {"name": INPUT, "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(tensor)}}
            ],
            "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + tensor, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def infer_answer(body: bytes, header_length: str | None) -> bytes:
    """The one BYTES element of the answer's OUTPUT tensor, binary or JSON."""
    length = int(header_length) if header_length else len(body)
    header = json.loads(body[:length])
    offset = length
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if output["name"] == OUTPUT:
            if size is None:
                return output["data"][0].encode("latin-1")
            (element,) = struct.unpack_from("<I", body, offset)
            return body[offset + 4 : offset + 4 + element]
        offset += size or 0
    raise ValueError(f"no {OUTPUT!r} output in the answer: {header}")
