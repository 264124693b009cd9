"""One simulated vLLM pod: an aiohttp app in front of its own engine.

Routes follow vLLM's OpenAI-compatible server, plus the handful of SGLang worker endpoints the
SGLang router probes, plus ``/sim/*`` test controls. Every response names the pod in
``x-pod-name`` so a test can see where a gateway sent each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from . import metrics as prom
from . import responses
from .config import PodSpec, SimParams
from .engine import Engine, RequestRejected
from .kv_events import Event, KVEventPublisher
from .protocol import (
    DONE,
    SYSTEM_FINGERPRINT_PREFIX,
    ApiError,
    ChunkWriter,
    GenerationOptions,
    bad_parameter,
    bad_request,
    chat_completion,
    generation_options,
    invalid_json,
    json_response,
    method_not_allowed_response,
    missing_fields,
    model_not_found,
    not_found_response,
    request_id,
    sse_response,
    stream_usage,
    text_completion,
    usage,
)
from .sequence import Sequence, TokenEvent
from .tokenizer import (
    BOS_TOKEN_ID,
    Tokenizer,
    as_token_batches,
    is_token_ids,
    prompt_token_ids,
    render_chat,
)

log = logging.getLogger(__name__)

POD_HEADER = "x-pod-name"
SIM_VERSION = "0.32.0+sim"
"""The vLLM release whose API, metrics and events the simulator follows."""
_HANG_SECONDS = 3600.0

#: Requests counted by ``/load`` while in flight (vLLM's server-load tracking).
_LOAD_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _QuietHttp2Probe(logging.Filter):
    """Drop aiohttp's traceback for HTTP/2 prefaces: the SGLang router probes every worker
    for gRPC before falling back to HTTP/1.1, which is expected, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, BadHttpMessage) and "PRI" in str(exc))


_PROBE_FILTER = _QuietHttp2Probe()


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's ``model`` names: the served name, and the adapter if it is one."""

    served: str
    lora: str | None = None
    lora_path: str | None = None
    lora_id: int | None = None


def _install_probe_filter() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if _PROBE_FILTER not in server_log.filters:
        server_log.addFilter(_PROBE_FILTER)


class SimPod:
    """A pod: name, model, port, parameters, engine and HTTP server.

    ``port`` may be 0 in the spec; after ``start()`` it holds the port actually bound. With
    ``kv_events`` on, ``start()`` also binds the KV-event publisher (``publisher``).
    """

    def __init__(self, spec: PodSpec, host: str = "127.0.0.1") -> None:
        spec.params.validate()
        self.name = spec.name
        self.model = spec.model
        self.host = host
        self.port = spec.port
        self.lora_modules: dict[str, str] = {}
        self._lora_ids: dict[str, int] = {}
        self._next_lora_id = 1
        for name, path in spec.lora_modules.items():
            self._add_lora(name, path)
        self._params = spec.params
        self.tokenizer = Tokenizer(spec.params.chars_per_token, spec.params.vocab_size)
        self.publisher: KVEventPublisher | None = None
        self.engine = self._new_engine()
        self.fingerprint = SYSTEM_FINGERPRINT_PREFIX + secrets.token_hex(4)
        """``system_fingerprint``: vLLM's version and a per-process tag."""
        self.requests_errored = 0
        self.in_flight = 0
        """Inference requests being served (``GET /load``)."""
        self._rng = random.Random(f"{spec.params.seed}:{spec.name}")
        self._started_at = 0.0
        self._ran = False
        self.metrics_requests = 0
        """``/metrics`` requests received (tests check who still scrapes the pod)."""
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # -- public API ----------------------------------------------------------------------------

    @property
    def params(self) -> SimParams:
        return self._params

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def lora_enabled(self) -> bool:
        """vLLM's ``--enable-lora``: set, or implied by adapters loaded at start or later."""
        return self._params.enable_lora or bool(self._lora_ids)

    def update_params(self, changes: Mapping[str, Any]) -> SimParams:
        """Apply runtime changes (validated; cache-sizing keys refused) and return the result."""
        new = self._params.replace(changes, runtime=True)
        old = self._params
        self._params = new
        if (new.chars_per_token, new.vocab_size) != (old.chars_per_token, old.vocab_size):
            self.tokenizer = Tokenizer(new.chars_per_token, new.vocab_size)
        if new.seed != old.seed:
            self._rng = random.Random(f"{new.seed}:{self.name}")
        self.engine.update_params(new)
        self.engine.lora_enabled = self.lora_enabled
        return new

    def set_params(self, **changes: Any) -> SimParams:
        """Keyword form of ``update_params``: ``pod.set_params(metrics_error=True)``."""
        return self.update_params(changes)

    async def start(self) -> None:
        """Bind the KV-event publisher (when on) and the HTTP port, then run the engine. A pod
        started again after ``stop()`` comes back empty, like a restarted vLLM: a fresh cache
        and event sequence numbers from 0."""
        _install_probe_filter()
        self._stopping.clear()
        if self._ran:
            self.engine = self._new_engine()
        self._ran = True
        p = self._params
        if p.kv_events:
            publisher = KVEventPublisher(
                self.host,
                p.kv_events_port,
                p.kv_events_topic,
                None if p.kv_events_replay_port < 0 else p.kv_events_replay_port,
                p.kv_events_buffer_steps,
            )
            await publisher.start()
            self.publisher = publisher
        try:
            self.engine.start()
            self._started_at = self.engine.now()
            runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            self._runner = runner
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        if self.port == 0:
            self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        self._stopping.set()
        await self.engine.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.publisher is not None:
            await self.publisher.stop()
            self.publisher = None

    def stats(self) -> dict[str, Any]:
        """What ``GET /sim/stats`` returns."""
        engine, kv, stats = self.engine, self.engine.kv, self.engine.stats
        return {
            "name": self.name,
            "model": self.model,
            "lora_adapters": sorted(self.lora_modules),
            "uptime_seconds": engine.now() - self._started_at,
            "requests_received": engine.requests_received,
            "requests_served": engine.requests_finished,
            "requests_errored": self.requests_errored,
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "steps": engine.steps,
            "step_lag_seconds": engine.lag_seconds,
            "blocks_total": kv.num_blocks,
            "blocks_used": kv.num_used_blocks,
            "blocks_cached": kv.num_cached_blocks,
            "blocks_free": kv.num_free_blocks,
            "kv_cache_usage": kv.usage,
            "prefix_cache_hit_tokens": stats.prefix_hits,
            "prefix_cache_query_tokens": stats.prefix_queries,
            "prompt_tokens": stats.prompt_tokens,
            "generation_tokens": stats.generation_tokens,
            "preemptions": stats.preemptions,
            "kv_events_sent": self.publisher.sent if self.publisher else 0,
        }

    def kv_event_sources(self) -> dict[str, dict[str, Any]]:
        """``GET /kv_event_sources``: the publisher's config by data-parallel rank, as vLLM
        reports it (``{}`` without KV events)."""
        publisher = self.publisher
        if publisher is None:
            return {}
        p = self._params
        replay = None if p.kv_events_replay_port < 0 else p.kv_events_replay_port
        return {str(publisher.data_parallel_rank): publisher.config(p.kv_events_port, replay)}

    # -- internals -----------------------------------------------------------------------------

    def _new_engine(self) -> Engine:
        publish = self._publish_events if self._params.kv_events else None
        engine = Engine(self._params, publish)
        engine.lora_enabled = self.lora_enabled
        return engine

    def _publish_events(self, events: list[Event]) -> None:
        if self.publisher is not None:
            self.publisher.publish(events)

    def _add_lora(self, name: str, path: str) -> None:
        self.lora_modules[name] = path
        self._lora_ids[name] = self._next_lora_id
        self._next_lora_id += 1

    # -- app -----------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._error_middleware, self._load_middleware],
            client_max_size=64 * 2**20,
        )
        app.on_response_prepare.append(self._stamp)
        get, post = app.router.add_get, app.router.add_post
        post("/v1/chat/completions", self._chat)
        post("/v1/completions", self._completions)
        post("/v1/responses", self._responses)
        post("/v1/embeddings", self._embeddings)
        get("/v1/models", self._models)
        get("/health", self._health)
        get("/ping", self._health)
        get("/version", self._version)
        get("/load", self._load)
        get("/metrics", self._metrics)
        get("/kv_event_sources", self._kv_event_sources)
        post("/tokenize", self._tokenize)
        post("/detokenize", self._detokenize)
        post("/v1/load_lora_adapter", self._load_lora)
        post("/v1/unload_lora_adapter", self._unload_lora)
        post("/reset_prefix_cache", self._reset_prefix_cache)
        # What the SGLang router asks a worker for.
        for path in ("/server_info", "/get_server_info"):
            get(path, self._server_info)
        for path in ("/model_info", "/get_model_info"):
            get(path, self._model_info)
        get("/get_load", self._get_load)
        get("/health_generate", self._health)
        post("/flush_cache", self._reset_prefix_cache)
        # Test controls.
        get("/sim/params", self._get_params)
        post("/sim/params", self._post_params)
        get("/sim/stats", self._stats)
        return app

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[POD_HEADER] = self.name

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.status >= 500:
                self.requests_errored += 1
            return exc.response()
        except web.HTTPNotFound:
            return not_found_response()
        except web.HTTPMethodNotAllowed:
            return method_not_allowed_response()
        except web.HTTPException:
            raise
        except Exception as exc:  # answer like vLLM would rather than with a bare 500 page
            log.exception("pod %s: unhandled error on %s", self.name, request.path)
            self.requests_errored += 1
            return ApiError(500, str(exc) or type(exc).__name__, "InternalServerError").response()

    @web.middleware
    async def _load_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _LOAD_PATHS:
            return await handler(request)
        self.in_flight += 1
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise invalid_json(raw) from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        return body

    def _resolve_model(self, model: str | None) -> Target:
        """The base model or a loaded adapter; anything else is vLLM's 404."""
        if model is None or model == self.model:
            return Target(self.model)
        path = self.lora_modules.get(model)
        if path is not None:
            return Target(model, model, path, self._lora_ids[model])
        raise model_not_found(model, self.model)

    def _maybe_fail(self) -> None:
        rate = self._params.error_rate
        if rate > 0 and self._rng.random() < rate:
            raise ApiError(500, "Simulated internal server error", "InternalServerError")

    def _sequence(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        target: Target,
        *,
        stream: bool = False,
        cache_salt: Any = None,
    ) -> Sequence:
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise bad_request("cache_salt must be a string", "cache_salt")
        return Sequence(
            prompt_ids,
            max_tokens,
            lora=target.lora,
            lora_path=target.lora_path,
            lora_id=target.lora_id,
            cache_salt=cache_salt or None,
            stream=stream,
        )

    def _submit(self, seq: Sequence) -> None:
        try:
            self.engine.submit(seq)
        except RequestRejected as exc:
            raise bad_request(str(exc), exc.param) from None

    def _chat_ids(self, body: Mapping[str, Any]) -> list[int]:
        """The chat template applied to ``messages``: BOS, the rendered turns, and the
        generation prompt unless ``add_generation_prompt`` is false."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise missing_fields(body, "messages")
        add_prompt = body.get("add_generation_prompt", True) is not False
        try:
            text = render_chat(messages, add_generation_prompt=add_prompt)
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        return [BOS_TOKEN_ID, *self.tokenizer.encode(text)]

    # -- inference -----------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._maybe_fail()
        body = await self._json(request)
        options = generation_options(body, chat=True, max_model_len=self._params.max_model_len)
        target = self._resolve_model(options.model)
        ids = self._chat_ids(body)
        rid = request_id(request, "chatcmpl", body.get("request_id"))
        return await self._generate(request, body, ids, options, target, rid, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self._maybe_fail()
        body = await self._json(request)
        options = generation_options(body, chat=False, max_model_len=self._params.max_model_len)
        target = self._resolve_model(options.model)
        if not body.get("prompt"):
            raise bad_parameter(
                "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
            )
        add_special = body.get("add_special_tokens", True) is not False
        try:
            ids = prompt_token_ids(body.get("prompt"), self.tokenizer, add_special)
        except ValueError as exc:
            raise bad_request(str(exc), "prompt") from None
        rid = request_id(request, "cmpl", body.get("request_id"))
        return await self._generate(request, body, ids, options, target, rid, chat=False)

    async def _generate(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        prompt_ids: list[int],
        options: GenerationOptions,
        target: Target,
        rid: str,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        max_tokens = self._max_tokens(len(prompt_ids), options.max_tokens)
        seq = self._sequence(
            prompt_ids, max_tokens, target, stream=options.stream, cache_salt=body.get("cache_salt")
        )
        self._submit(seq)
        if options.stream:
            return await self._stream(request, seq, options, rid, target.served, chat=chat)
        await self._wait(seq)
        text = "".join(Tokenizer.decode_output(t) for t in seq.output_ids)
        usage_body = self._usage(seq)
        shape = chat_completion if chat else text_completion
        reason = seq.finish_reason or "length"
        return json_response(shape(rid, target.served, text, reason, usage_body, self.fingerprint))

    def _max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """The output budget: as asked (else ``default_max_tokens``), cut to the room the
        prompt leaves in the context, as vLLM cuts it (a prompt with no room is a 400)."""
        wanted = requested or self._params.default_max_tokens
        return max(min(wanted, self._params.max_model_len - prompt_len), 1)

    async def _wait(self, seq: Sequence) -> None:
        """Until ``seq`` is done; a 503 when the pod stopped under it."""
        try:
            await seq.done.wait()
        finally:
            self.engine.abort(seq)
        if seq.finish_reason == "abort":
            raise ApiError(503, "The pod is shutting down.", "ServiceUnavailableError")

    def _cached(self, seq: Sequence) -> int | None:
        """What ``prompt_tokens_details.cached_tokens`` reports, when it is enabled."""
        return seq.num_cached_tokens if self._params.prompt_tokens_details else None

    def _usage(self, seq: Sequence) -> dict[str, Any]:
        return usage(len(seq.prompt_ids), len(seq.output_ids), self._cached(seq))

    async def _next_events(self, seq: Sequence, first: bool) -> list[TokenEvent]:
        """The engine's next outputs for ``seq``, for one SSE event: every output already
        waiting (a client that lags gets tokens merged, as vLLM merges them), and after the
        first event at least ``stream_interval`` tokens unless the request ends first."""
        interval = self._params.stream_interval
        events = [await seq.events.get()]
        while True:
            while not seq.events.empty():
                events.append(seq.events.get_nowait())
            if first or len(events) >= interval or events[-1].finish_reason is not None:
                return events
            events.append(await seq.events.get())

    async def _stream(
        self,
        request: web.Request,
        seq: Sequence,
        options: GenerationOptions,
        rid: str,
        served: str,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        response = sse_response()
        writer = ChunkWriter(rid, served, self.fingerprint, chat=chat)
        prompt_len = len(seq.prompt_ids)
        continuous = options.include_usage and options.continuous_usage
        try:
            await response.prepare(request)
            produced = 0
            finished = False
            while not finished:
                events = await self._next_events(seq, produced == 0)
                if events[-1].finish_reason == "abort":
                    return response
                parts: list[bytes] = []
                if chat and produced == 0:
                    # The role chunk goes out with the first output, as vLLM sends it.
                    role = writer.role()
                    if continuous:
                        role["usage"] = stream_usage(prompt_len, 0)
                    parts.append(writer.encode(role))
                produced += len(events)
                reason = events[-1].finish_reason
                chunk = writer.token("".join(e.text for e in events), reason)
                if continuous:
                    chunk["usage"] = stream_usage(prompt_len, produced)
                parts.append(writer.encode(chunk))
                await response.write(b"".join(parts))
                finished = reason is not None
            if options.include_usage:
                final = stream_usage(len(seq.prompt_ids), len(seq.output_ids), self._cached(seq))
                await response.write(writer.encode(writer.usage(final)))
            await response.write(DONE)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away mid-stream, as clients do; the finally aborts the work
        finally:
            self.engine.abort(seq)
        return response

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        self._maybe_fail()
        body = await self._json(request)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad_request("model must be a string", "model")
        target = self._resolve_model(model)
        messages = responses.input_messages(body)
        try:
            text = render_chat(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise bad_request(str(exc), "input") from None
        ids = [BOS_TOKEN_ID, *self.tokenizer.encode(text)]
        requested = responses.max_output_tokens(body)
        stream = bool(body.get("stream", False))
        seq = self._sequence(ids, self._max_tokens(len(ids), requested), target, stream=stream)
        self._submit(seq)
        rid = request_id(request, "resp", body.get("request_id"), sep="_")
        builder = responses.ResponseBuilder(rid, target.served, body, requested)
        if not stream:
            await self._wait(seq)
            output = "".join(Tokenizer.decode_output(t) for t in seq.output_ids)
            counts = (len(seq.prompt_ids), len(seq.output_ids), seq.num_cached_tokens)
            return json_response(builder.final(output, seq.finish_reason or "length", counts))
        response = sse_response()
        try:
            await response.prepare(request)
            await response.write(builder.opening())
            pieces: list[str] = []
            while True:
                events = await self._next_events(seq, not pieces)
                if events[-1].finish_reason == "abort":
                    return response
                piece = "".join(e.text for e in events)
                pieces.append(piece)
                await response.write(builder.delta(piece))
                reason = events[-1].finish_reason
                if reason is not None:
                    break
            counts = (len(seq.prompt_ids), len(seq.output_ids), seq.num_cached_tokens)
            await response.write(builder.closing("".join(pieces), reason, counts))
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.engine.abort(seq)
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        self._maybe_fail()
        body = await self._json(request)
        target = self._resolve_model(body.get("model"))
        if "input" not in body:
            raise missing_fields(body, "input")
        try:
            batches = as_token_batches(body.get("input"), self.tokenizer)
        except ValueError as exc:
            raise bad_request(str(exc), "input") from None
        seqs = [self._sequence(ids, 0, target) for ids in batches]
        try:
            for seq in seqs:
                self._submit(seq)
            await asyncio.gather(*(seq.done.wait() for seq in seqs))
        finally:
            for seq in seqs:
                self.engine.abort(seq)
        if any(seq.finish_reason == "abort" for seq in seqs):
            raise ApiError(503, "The pod is shutting down.", "ServiceUnavailableError")
        dim = self._params.embedding_dim
        data = [
            {"index": i, "object": "embedding", "embedding": _embedding(ids, dim)}
            for i, ids in enumerate(batches)
        ]
        tokens = sum(len(ids) for ids in batches)
        return json_response(
            {
                "id": request_id(request, "embd", body.get("request_id")),
                "object": "list",
                "created": int(time.time()),
                "model": target.served,
                "data": data,
                "usage": {
                    "prompt_tokens": tokens,
                    "total_tokens": tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )

    # -- model management ----------------------------------------------------------------------

    def _model_card(self, model_id: str, root: str, parent: str | None) -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": model_id,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": self._params.max_model_len if parent is None else None,
            "permission": [
                {
                    "id": f"modelperm-{zlib.crc32(model_id.encode()):08x}",
                    "object": "model_permission",
                    "created": int(time.time()),
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return card

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [self._model_card(self.model, self.model, None)]
        data.extend(
            self._model_card(name, path, self.model) for name, path in self.lora_modules.items()
        )
        return json_response({"object": "list", "data": data})

    async def _load_lora(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided.")
        if name == self.model or (
            name in self.lora_modules and body.get("load_inplace") is not True
        ):
            raise ApiError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        self._add_lora(name, path)
        self.engine.lora_enabled = True
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise bad_request("'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self.lora_modules:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.lora_modules[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # -- utility endpoints ---------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return json_response({"version": SIM_VERSION})

    async def _load(self, request: web.Request) -> web.StreamResponse:
        return json_response({"server_load": self.in_flight})

    async def _kv_event_sources(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.kv_event_sources())

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        self._resolve_model(body.get("model"))
        if "messages" in body:
            ids = self._chat_ids(body)
        elif "prompt" in body:
            add_special = body.get("add_special_tokens", True) is not False
            try:
                ids = prompt_token_ids(body.get("prompt"), self.tokenizer, add_special)
            except ValueError as exc:
                raise bad_request(str(exc), "prompt") from None
        else:
            raise missing_fields(body, "prompt", "messages")
        strs = self.tokenizer.token_strs(ids) if body.get("return_token_strs") else None
        return json_response(
            {
                "count": len(ids),
                "max_model_len": self._params.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )

    async def _detokenize(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        self._resolve_model(body.get("model"))
        tokens = body.get("tokens")
        if tokens is None:
            raise missing_fields(body, "tokens")
        if not is_token_ids(tokens):
            raise bad_request("tokens must be a list of token ids", "tokens")
        return json_response({"prompt": self.tokenizer.decode(tokens)})

    async def _reset_prefix_cache(self, request: web.Request) -> web.StreamResponse:
        """``{"success": false}`` while any block is held by a running request, as vLLM."""
        return json_response({"success": self.engine.reset_prefix_cache()})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.metrics_requests += 1
        p = self._params
        if p.metrics_hang:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _HANG_SECONDS)
            return web.Response(status=503, text="metrics exporter hung\n")
        if p.metrics_error:
            return web.Response(status=500, text="simulated metrics exporter failure\n")
        if self.engine.now() - self._started_at < p.metrics_delay:
            return web.Response(status=503, text="metrics not available yet\n")
        text = prom.render(
            self.model,
            p,
            self.engine.snapshot(),
            self.engine.stats,
            lora=self.lora_enabled,
        )
        return web.Response(body=text.encode(), headers={"Content-Type": prom.CONTENT_TYPE})

    # -- SGLang worker compatibility -----------------------------------------------------------

    def _sglang_info(self) -> dict[str, Any]:
        p = self._params
        return {
            "served_model_name": self.model,
            "is_generation": True,
            "max_total_num_tokens": p.num_gpu_blocks * p.block_size,
            "max_running_requests": p.max_num_seqs,
            "context_length": p.max_model_len,
            "page_size": p.block_size,
            "dp_size": 1,
            "version": SIM_VERSION,
        }

    async def _server_info(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._sglang_info())

    async def _model_info(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._sglang_info())

    async def _get_load(self, request: web.Request) -> web.StreamResponse:
        engine = self.engine
        tokens = sum(seq.num_tokens for seq in engine.running)
        return json_response(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": len(engine.running) + len(engine.waiting),
                    "num_waiting_reqs": len(engine.waiting),
                    "num_tokens": tokens,
                }
            ]
        )

    # -- test controls -------------------------------------------------------------------------

    async def _get_params(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._params.to_dict())

    async def _post_params(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        try:
            params = self.update_params(body)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        return json_response(params.to_dict())

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.stats())


def _embedding(ids: list[int], dim: int) -> list[float]:
    """A unit vector that depends only on the token ids."""
    seed = zlib.crc32(orjson.dumps(ids))
    rng = random.Random(seed)
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]
