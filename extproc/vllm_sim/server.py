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
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from . import metrics as prom
from .config import PodSpec, SimParams
from .engine import Engine, RequestRejected
from .protocol import (
    DONE,
    ApiError,
    ChunkWriter,
    GenerationOptions,
    bad_request,
    chat_completion,
    generation_options,
    json_response,
    new_id,
    text_completion,
    usage,
)
from .sequence import Sequence
from .tokenizer import Tokenizer, as_token_batches, prompt_token_ids, render_chat

log = logging.getLogger(__name__)

POD_HEADER = "x-pod-name"
SIM_VERSION = "0.11.0+sim"
_HANG_SECONDS = 3600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _QuietHttp2Probe(logging.Filter):
    """Drop aiohttp's traceback for HTTP/2 prefaces: the SGLang router probes every worker
    for gRPC before falling back to HTTP/1.1, which is expected, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, BadHttpMessage) and "PRI" in str(exc))


_PROBE_FILTER = _QuietHttp2Probe()


def _install_probe_filter() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if _PROBE_FILTER not in server_log.filters:
        server_log.addFilter(_PROBE_FILTER)


class SimPod:
    """A pod: name, model, port, parameters, engine and HTTP server.

    ``port`` may be 0 in the spec; after ``start()`` it holds the port actually bound.
    """

    def __init__(self, spec: PodSpec, host: str = "127.0.0.1") -> None:
        spec.params.validate()
        self.name = spec.name
        self.model = spec.model
        self.host = host
        self.port = spec.port
        self.lora_modules: dict[str, str] = dict(spec.lora_modules)
        self._params = spec.params
        self.tokenizer = Tokenizer(spec.params.chars_per_token, spec.params.vocab_size)
        self.engine = Engine(spec.params)
        self.requests_errored = 0
        self._rng = random.Random(f"{spec.params.seed}:{spec.name}")
        self._started_at = 0.0
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
        return new

    def set_params(self, **changes: Any) -> SimParams:
        """Keyword form of ``update_params``: ``pod.set_params(metrics_error=True)``."""
        return self.update_params(changes)

    async def start(self) -> None:
        _install_probe_filter()
        self._stopping.clear()
        self.engine.start()
        self._started_at = self.engine.now()
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        if self.port == 0:
            self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        self._stopping.set()
        await self.engine.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
        }

    # -- app -----------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._error_middleware], client_max_size=64 * 2**20)
        app.on_response_prepare.append(self._stamp)
        get, post = app.router.add_get, app.router.add_post
        post("/v1/chat/completions", self._chat)
        post("/v1/completions", self._completions)
        post("/v1/embeddings", self._embeddings)
        get("/v1/models", self._models)
        get("/health", self._health)
        get("/ping", self._health)
        get("/version", self._version)
        get("/metrics", self._metrics)
        post("/tokenize", self._tokenize)
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
        except web.HTTPException:
            raise
        except Exception as exc:  # answer like vLLM would rather than with a bare 500 page
            log.exception("pod %s: unhandled error on %s", self.name, request.path)
            self.requests_errored += 1
            return ApiError(500, str(exc) or type(exc).__name__, "InternalServerError").response()

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        return body

    def _resolve_model(self, model: str | None) -> tuple[str, str | None]:
        """(served name, LoRA adapter or None); unknown names are a 404 as in vLLM."""
        if model is None or model == self.model:
            return self.model, None
        if model in self.lora_modules:
            return model, model
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    def _maybe_fail(self) -> None:
        rate = self._params.error_rate
        if rate > 0 and self._rng.random() < rate:
            raise ApiError(500, "Simulated internal server error", "InternalServerError")

    def _submit(self, seq: Sequence) -> None:
        try:
            self.engine.submit(seq)
        except RequestRejected as exc:
            raise bad_request(str(exc)) from None

    # -- inference -----------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._maybe_fail()
        body = await self._json(request)
        options = generation_options(body, chat=True)
        served, lora = self._resolve_model(options.model)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages must be a non-empty list", "messages")
        try:
            text = render_chat(
                messages, add_generation_prompt=body.get("add_generation_prompt", True) is not False
            )
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        return await self._generate(
            request, self.tokenizer.encode(text), options, served, lora, chat=True
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self._maybe_fail()
        body = await self._json(request)
        options = generation_options(body, chat=False)
        served, lora = self._resolve_model(options.model)
        try:
            ids = prompt_token_ids(body.get("prompt"), self.tokenizer)
        except ValueError as exc:
            raise bad_request(str(exc), "prompt") from None
        return await self._generate(request, ids, options, served, lora, chat=False)

    async def _generate(
        self,
        request: web.Request,
        prompt_ids: list[int],
        options: GenerationOptions,
        served: str,
        lora: str | None,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        max_tokens = options.max_tokens or self._params.default_max_tokens
        seq = Sequence(prompt_ids, max_tokens, lora=lora, stream=options.stream)
        self._submit(seq)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if options.stream:
            return await self._stream(request, seq, options, rid, served, chat=chat)
        try:
            await seq.done.wait()
        finally:
            self.engine.abort(seq)
        if seq.finish_reason == "abort":
            raise ApiError(503, "The pod is shutting down.", "ServiceUnavailableError")
        text = "".join(Tokenizer.decode_output(t) for t in seq.output_ids)
        usage_body = self._usage(seq)
        shape = chat_completion if chat else text_completion
        return json_response(shape(rid, served, text, seq.finish_reason or "length", usage_body))

    def _usage(self, seq: Sequence) -> dict[str, Any]:
        cached = seq.num_cached_tokens if self._params.prompt_tokens_details else None
        return usage(len(seq.prompt_ids), len(seq.output_ids), cached)

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
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        writer = ChunkWriter(rid, served, chat=chat)
        prompt_len = len(seq.prompt_ids)
        continuous = options.include_usage and options.continuous_usage
        try:
            await response.prepare(request)
            produced = 0
            while True:
                event = await seq.events.get()
                if event.finish_reason == "abort":
                    break
                parts: list[bytes] = []
                if chat and produced == 0:
                    role = writer.role()
                    if continuous:
                        role["usage"] = usage(prompt_len, 0)
                    parts.append(writer.encode(role))
                produced += 1
                chunk = writer.token(event.text, event.finish_reason)
                if continuous:
                    chunk["usage"] = usage(prompt_len, produced)
                parts.append(writer.encode(chunk))
                await response.write(b"".join(parts))
                if event.finish_reason is not None:
                    break
            if options.include_usage:
                await response.write(writer.encode(writer.usage(self._usage(seq))))
            await response.write(DONE)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away mid-stream, as clients do; the finally aborts the work
        finally:
            self.engine.abort(seq)
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        self._maybe_fail()
        body = await self._json(request)
        served, lora = self._resolve_model(body.get("model"))
        try:
            batches = as_token_batches(body.get("input"), self.tokenizer)
        except ValueError as exc:
            raise bad_request(str(exc), "input") from None
        seqs = [Sequence(ids, 0, lora=lora) for ids in batches]
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
                "id": new_id("embd"),
                "object": "list",
                "created": int(time.time()),
                "model": served,
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
        if parent is None:
            card["max_model_len"] = self._params.max_model_len
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
        if name in self.lora_modules or name == self.model:
            raise bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        self.lora_modules[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise bad_request("'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self.lora_modules:
            raise ApiError(
                404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name"
            )
        del self.lora_modules[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # -- utility endpoints ---------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return json_response({"version": SIM_VERSION})

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        self._resolve_model(body.get("model"))
        try:
            if "messages" in body:
                messages = body["messages"]
                if not isinstance(messages, list):
                    raise ValueError("messages must be a list")
                add_prompt = body.get("add_generation_prompt", True) is not False
                tokens = self.tokenizer.encode(
                    render_chat(messages, add_generation_prompt=add_prompt)
                )
            else:
                tokens = prompt_token_ids(body.get("prompt"), self.tokenizer)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        return json_response(
            {
                "count": len(tokens),
                "max_model_len": self._params.max_model_len,
                "tokens": tokens,
                "token_strs": None,
            }
        )

    async def _reset_prefix_cache(self, request: web.Request) -> web.StreamResponse:
        if not self.engine.kv.reset_prefix_cache():
            raise ApiError(
                409, "Cannot reset the prefix cache while requests are running.", "ConflictError"
            )
        return web.Response(status=200)

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
        text = prom.render(self.model, p, self.engine.snapshot(), self.engine.stats)
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
