"""``GET /schema/asyncapi.json``: the event log's AsyncAPI document, next to the OpenAPI one.

The document is generated from the contracts and the services' declarations
(``python -m services.catalogue --write``) and ships inside the ``contracts`` package, so every
service serves the same one without knowing the others.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from litestar import Response, get

ASYNCAPI_PATH = "/schema/asyncapi.json"


@cache
def _document() -> bytes:
    return resources.files("contracts").joinpath("asyncapi.json").read_bytes()


@get(ASYNCAPI_PATH, include_in_schema=False, sync_to_thread=False)
def asyncapi_document() -> Response[bytes]:
    """The AsyncAPI 3.0 document of every event on the log: owner, consumers, payload."""
    return Response(_document(), media_type="application/json")
