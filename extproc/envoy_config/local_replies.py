"""Envoy's own error replies in the server's JSON shape.

Envoy answers some requests itself: no route (404), a body over its buffer (413), no
reachable pod (503), an upstream timeout (504), the ext_proc server unreachable (500). Out of
the box those are short plain-text bodies; ``local_reply_config`` rewrites them into the
``{"error": {"message", "type", "code", "param"}}`` body every error of the server has, with
``content-type: application/json``.

The mappers also see the server's own replies (an ext_proc ImmediateResponse is a local reply
too) and the generated ``direct_response`` routes, which are JSON already: those are told apart
by their response code details (the server sets ``extproc_<code>``; Envoy's are e.g.
``route_not_found``, ``request_payload_too_large``, ``upstream_reset_before_response_started``)
through a CEL filter, and left alone.
"""

from __future__ import annotations

import json
from typing import Any

ENVOY_OWN = (
    "!response.code_details.startsWith('extproc_') && response.code_details != 'direct_response'"
)
"""CEL: a local reply Envoy made itself, not one the server or a generated route wrote."""
ECHO = 128
"""Longest piece of the request (its path) echoed in a message."""


def too_large_message(max_body_bytes: int) -> str:
    """Word for word the server's own 413 message."""
    return f"Request body is larger than the {max_body_bytes}-byte limit."


def too_large_body(max_body_bytes: int) -> str:
    return error_body(
        too_large_message(max_body_bytes), "invalid_request_error", "request_too_large"
    )


def error_body(message: str, kind: str, code: str) -> str:
    return json.dumps(
        {"error": {"message": message, "type": kind, "code": code, "param": None}},
        separators=(",", ":"),
    )


def _mapper(condition: str, message: str, kind: str, code: str) -> dict[str, Any]:
    return {
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                    "ExpressionFilter",
                    "expression": f"{ENVOY_OWN} && {condition}",
                },
            }
        },
        "headers_to_add": [
            {
                "header": {"key": "x-request-id", "value": "%REQ(x-request-id)%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                "keep_empty_value": False,
            }
        ],
        "body_format_override": {
            "json_format": {
                "error": {"message": message, "type": kind, "code": code, "param": None}
            }
        },
    }


def config(max_body_bytes: int) -> dict[str, Any]:
    """The HTTP connection manager's ``local_reply_config``: first matching mapper wins."""
    return {
        "mappers": [
            _mapper(
                "response.code == 413",
                too_large_message(max_body_bytes),
                "invalid_request_error",
                "request_too_large",
            ),
            _mapper(
                "response.code == 404",
                f"No route for %REQ(:PATH):{ECHO}%.",
                "invalid_request_error",
                "not_found",
            ),
            _mapper(
                "response.code == 503",
                "No upstream could serve the request: %LOCAL_REPLY_BODY%",
                "service_unavailable_error",
                "upstream_unavailable",
            ),
            _mapper(
                "response.code == 504",
                "The upstream did not answer in time: %LOCAL_REPLY_BODY%",
                "server_error",
                "upstream_timeout",
            ),
            _mapper(
                "response.code == 500 && response.code_details.startsWith('ext_proc_error')",
                "The routing server could not be reached or failed (%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "routing_unavailable",
            ),
            _mapper(
                "response.code >= 500",
                "The gateway failed: %LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)",
                "server_error",
                "gateway_error",
            ),
            _mapper(
                "response.code >= 400",
                "The gateway refused the request: %LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)",
                "invalid_request_error",
                "gateway_error",
            ),
        ]
    }
