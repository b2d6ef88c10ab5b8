"""THE test from the issue: 64 concurrent reconstructs are batched; nobody gets another's image."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import onnxruntime as ort

from app.main import create_app
from tests.app.conftest import make_settings, npy_bytes


def metric(text: str, name: str, labels: str) -> float:
    for row in text.splitlines():
        if row.startswith(f"{name}{{") and labels in row:
            return float(row.rsplit(" ", 1)[1])
    return 0.0


async def _run(app, bodies: list[bytes]) -> tuple[list[httpx.Response], str, str]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://aeserve") as client:
            before = (await client.get("/metrics")).text
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/models/tiny-ae/reconstruct",
                        content=body,
                        headers={"Accept": "application/x-npy"},
                    )
                    for body in bodies
                )
            )
            after = (await client.get("/metrics")).text
    return responses, before, after


def test_64_concurrent_reconstructs_are_batched_and_each_client_gets_its_own_image(store):
    rng = np.random.default_rng(64)
    inputs = [rng.random((1, 16, 16)).astype(np.float32) for _ in range(64)]
    app = create_app(make_settings(store, max_batch_size=16))
    responses, before, after = asyncio.run(_run(app, [npy_bytes(x) for x in inputs]))

    session = ort.InferenceSession(
        str(store / "tiny-ae" / "10" / "reconstruct.onnx"), providers=["CPUExecutionProvider"]
    )
    outputs = []
    for x, response in zip(inputs, responses, strict=True):
        assert response.status_code == 200, response.text
        got = np.load(io.BytesIO(response.content))
        expected = session.run(None, {"image": x[None]})[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        outputs.append(got)
    # distinct inputs gave distinct outputs: a swapped answer could not have passed the check above
    assert len({o.tobytes() for o in outputs}) == 64

    labels = 'model="tiny-ae",op="reconstruct",version="10"'
    items = metric(after, "aeserve_batch_size_sum", labels) - metric(before, "aeserve_batch_size_sum", labels)
    batches = metric(after, "aeserve_batch_size_count", labels) - metric(
        before, "aeserve_batch_size_count", labels
    )
    assert items == 64
    print(f"mean batch size {items / batches:.2f} over {batches:.0f} batches")
    assert items / batches > 1.0, f"mean batch size {items / batches:.2f}"
    ok = metric(after, "aeserve_requests_total", labels.replace('version="10"', 'status="200",version="10"'))
    assert ok >= 64
