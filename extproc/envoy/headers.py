"""Header names of the contract with Envoy and clients, and reading header values safely."""

from __future__ import annotations

import os
import re

TARGET_POD = "target-pod"
"""``ip:port`` of the chosen pod on the upstream request (an ORIGINAL_DST cluster reads it); the
pod's name on the client response."""
POD_NAME = "x-target-pod-name"
"""With ``response_phase: when-needed``, the chosen pod's name on the upstream request, which
Envoy copies to the client response as ``target-pod`` when the server skips the response."""
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
"""Gateway API Inference Extension: the chosen endpoint (then fallbacks), ``ip:port[,...]``."""
REQUEST_ID = "x-request-id"
MODEL = "model"
CONTENT_LENGTH = "content-length"
ROUTING_HEADERS = frozenset({TARGET_POD, DESTINATION_ENDPOINT, POD_NAME})
"""Headers only the server may set: a client's copies are removed (an open proxy otherwise)."""

REQUEST_ID_LIMIT = 256
_PRINTABLE = re.compile(r"[\x20-\x7e]+")


def value(entry: object) -> str:
    """A header's value: Envoy sends ``raw_value`` bytes (``value`` in older versions)."""
    raw: bytes = entry.raw_value  # type: ignore[attr-defined]
    if raw:
        return raw.decode("utf-8", "replace")
    text: str = entry.value  # type: ignore[attr-defined]
    return text


def request_id(client_value: str | None) -> str:
    """The client's ``x-request-id`` when it is a plausible id (printable ASCII, at most 256
    characters), else a new one: the id is logged and echoed, so it must not carry control
    characters or unbounded size."""
    if (
        client_value
        and len(client_value) <= REQUEST_ID_LIMIT
        and _PRINTABLE.fullmatch(client_value)
    ):
        return client_value
    return os.urandom(16).hex()
