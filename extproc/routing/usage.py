"""Reading token usage from a response body as Envoy streams it to us.

Only asked for (mode override to STREAMED) when something needs tokens: a strategy that counts
them, or a user with a TPM limit. A JSON answer carries ``usage`` near its end; a stream carries
it in its last event only when the client asked (``stream_options.include_usage``). When the
client did not ask, the server asks the pod for it (``with_usage_requested``) and
``UsageStripper`` takes that one event out of the stream again, so the client receives exactly
the bytes it would have received; every other byte passes unchanged. Only where the pod cannot
report (the body could not be rewritten) is the usage estimated, and marked ``estimated``.
"""

from __future__ import annotations

import orjson

from strategies.context import Usage

WHOLE_BODY_LIMIT = 1024 * 1024
"""JSON answers up to this size are parsed whole; larger ones are searched in their tail."""
TAIL_BYTES = 64 * 1024

_USAGE_KEY = b'"usage"'
_EVENT = b"data:"


class UsageReader:
    __slots__ = ("_chunks", "_events", "_size", "_streaming", "_tail")

    def __init__(self, streaming: bool) -> None:
        self._streaming = streaming
        self._chunks: list[bytes] = []
        self._tail = b""
        self._size = 0
        self._events = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._size += len(chunk)
        if self._streaming:
            self._events += chunk.count(_EVENT)
            self._tail = (self._tail + chunk)[-TAIL_BYTES:]
            return
        if self._size <= WHOLE_BODY_LIMIT:
            self._chunks.append(chunk)
        else:
            if self._chunks:
                self._tail = b"".join(self._chunks)[-TAIL_BYTES:]
                self._chunks = []
            self._tail = (self._tail + chunk)[-TAIL_BYTES:]

    def result(self, prompt_tokens: int) -> Usage | None:
        """The reported usage, else an estimate for a stream, else ``None`` (nothing seen)."""
        if self._size == 0:
            return None
        if not self._streaming and self._chunks:
            usage = _from_document(b"".join(self._chunks))
            if usage is not None:
                return usage
        usage = _from_tail(self._tail)
        if usage is not None:
            return usage
        if not self._streaming:
            return None
        # One event per generated token is how vLLM streams; the first carries only the role and
        # the last is [DONE], so they do not count.
        completion = max(0, self._events - 2)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            estimated=True,
        )


def _from_document(body: bytes) -> Usage | None:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    return _usage(document.get("usage"))


def _from_tail(tail: bytes) -> Usage | None:
    """The last ``"usage": {...}`` object in ``tail`` (balanced braces, no nesting surprises)."""
    at = tail.rfind(_USAGE_KEY)
    while at >= 0:
        start = tail.find(b"{", at + len(_USAGE_KEY))
        if start >= 0 and not tail[at + len(_USAGE_KEY) : start].strip(b" :\t\r\n"):
            end = _matching_brace(tail, start)
            if end > 0:
                try:
                    return _usage(orjson.loads(tail[start : end + 1]))
                except orjson.JSONDecodeError:
                    pass
        at = tail.rfind(_USAGE_KEY, 0, at)
    return None


def _matching_brace(data: bytes, start: int) -> int:
    depth = 0
    in_string = False
    escaped = False
    for index in range(start, len(data)):
        byte = data[index]
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x7B:  # {
            depth += 1
        elif byte == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return index
    return -1


def _usage(value: object) -> Usage | None:
    """Chat/completions/embeddings name the fields ``prompt_tokens``/``completion_tokens``; the
    Responses API names them ``input_tokens``/``output_tokens``."""
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens", value.get("input_tokens"))
    completion = value.get("completion_tokens", value.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


class UsageStripper:
    """Removes the usage event the server asked for from a stream of server-sent events.

    Events end with a blank line; an event cut across chunks is held back until it is whole (it
    may be the usage event), so chunk boundaries move but the bytes do not change. The stream's
    usage event is the one whose ``choices`` is empty and whose ``usage`` is an object.

    vLLM puts ``system_fingerprint`` on a stream's last event: the usage event when there is
    one, else the last choice's finishing event. So finishing events wait for the next event
    (vLLM sends it in the same step) and, when that is the usage event, take its fingerprint:
    the client gets the stream vLLM sends a client that did not ask for usage.
    """

    __slots__ = ("_held", "_pending", "found")

    def __init__(self) -> None:
        self._pending = b""
        self._held: list[bytes] = []
        self.found = False

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """What to pass on for ``chunk``."""
        data = self._pending + chunk if self._pending else chunk
        if self.found:
            self._pending = b""
            return data
        cut = data.rfind(_EVENT_END) + len(_EVENT_END)
        if end_of_stream:
            cut = len(data)
        elif cut < len(_EVENT_END):
            self._pending = data
            return b""
        complete, self._pending = data[:cut], data[cut:]
        if not self._held and _USAGE_KEY not in complete and _FINISHED not in complete:
            return complete
        events = complete.split(_EVENT_END)
        tail = events.pop()
        held = self._held
        out: list[bytes] = []
        for event in events:
            if not self.found:
                usage = _usage_event(event)
                if usage is not None:
                    self.found = True
                    fingerprint = usage.get("system_fingerprint")
                    if isinstance(fingerprint, str) and held and _FINGERPRINT not in held[-1]:
                        held[-1] = _with_fingerprint(held[-1], fingerprint)
                    continue
                if _FINISHED in event:
                    held.append(event)
                    continue
            out.extend(held)
            held.clear()
            out.append(event)
        if self.found or end_of_stream:
            out.extend(held)
            held.clear()
        return b"".join([event + _EVENT_END for event in out]) + tail


_EVENT_END = b"\n\n"
_FINISHED = b'"finish_reason":"'
_FINGERPRINT = b'"system_fingerprint"'


def _with_fingerprint(event: bytes, fingerprint: str) -> bytes:
    end = event.rfind(b"}")
    if end < 0:
        return event
    return event[:end] + b',"system_fingerprint":' + orjson.dumps(fingerprint) + event[end:]


def _usage_event(event: bytes) -> dict[str, object] | None:
    """The usage event's document, or None for any other event."""
    if _USAGE_KEY not in event:
        return None
    payload = event.strip()
    if not payload.startswith(_EVENT):
        return None
    try:
        document = orjson.loads(payload[len(_EVENT) :])
    except orjson.JSONDecodeError:
        return None
    if (
        isinstance(document, dict)
        and document.get("choices") == []
        and isinstance(document.get("usage"), dict)
    ):
        return document
    return None
