"""aeserve_client: a small Python client of the aeserve service (httpx, numpy and pillow only).

    from aeserve_client import Client
    with Client("http://127.0.0.1:8000") as client:
        latents = client.encode_sequence("v3-small-201", frames, dtype="float16")   # (T, D) float16

`Client` (sync) and `AsyncClient` (asyncio) share the requests and answer parsing of
`aeserve_client.protocol` and the chunk planning of `aeserve_client.sequence`.
Install with `pip install -e ".[client]"`.
"""

from aeserve_client.async_client import AsyncClient
from aeserve_client.client import Client
from aeserve_client.errors import ClientError, Overloaded, ServerError, ServiceError
from aeserve_client.protocol import AttentionMap, RetryPolicy
from aeserve_client.sequence import EncodeLimits

__all__ = [
    "AsyncClient",
    "AttentionMap",
    "Client",
    "ClientError",
    "EncodeLimits",
    "Overloaded",
    "RetryPolicy",
    "ServerError",
    "ServiceError",
]
