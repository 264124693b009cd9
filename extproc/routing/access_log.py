"""The one access-log line each inference request leaves when it ends.

Never a header wholesale, never a prompt (unless the ``log_prompts`` debug setting asks).
"""

from __future__ import annotations

import logging
from typing import Any

from extproc.routing.openai_request import InferenceRequest

log = logging.getLogger("extproc.access")


class AccessLog:
    def __init__(self, log_prompts: bool) -> None:
        self.log_prompts = log_prompts

    @property
    def enabled(self) -> bool:
        return log.isEnabledFor(logging.INFO)

    def write(self, message: str, fields: dict[str, Any], request: InferenceRequest | None) -> None:
        if self.log_prompts and request is not None:
            fields["prompt"] = prompt_of(request)
        log.info(message, extra=fields)


def prompt_of(request: InferenceRequest) -> object:
    """The prompt as ``log_prompts`` writes it: chat turns, text, or token ids."""
    if request.messages is not None:
        return [{"role": role, "content": content} for role, content in request.messages]
    return request.text if request.text is not None else request.token_ids
