"""Assembles one server process: discovery, the router, the gRPC server and the HTTP server.

``Server`` is what ``extproc serve`` runs and what tests start in-process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extproc import http_server, logs, self_signed
from extproc.autoscaling import keda
from extproc.autoscaling.counts import LocalCounts, RedisCounts
from extproc.autoscaling.externalscaler import externalscaler_pb2_grpc
from extproc.autoscaling.signals import Signals, SignalsCollector
from extproc.config import ConfigError, Settings
from extproc.debug import service as debug_service
from extproc.debug.v1 import debug_pb2_grpc
from extproc.discovery.static import StaticDiscovery
from extproc.envoy.exchange import Exchange, ExchangeServices, Interim
from extproc.envoy.servicer import ExternalProcessor
from extproc.fleet.health import PodHealth
from extproc.fleet.models_list import ModelsList
from extproc.fleet.registry import PodRegistry
from extproc.kvevents.events import KvEvents
from extproc.prefix import producer as prefix_producer
from extproc.routing.access_log import AccessLog
from extproc.routing.accounting import Accounting
from extproc.routing.holds import Holds
from extproc.routing.pipeline import Pipeline
from extproc.routing.plans import Plans
from extproc.scraping.readings import Readings
from extproc.scraping.scraper import Scraper
from extproc.scraping.served_adapters import ServedAdapters
from extproc.tasks import cancel_and_wait
from extproc.telemetry import Telemetry
from extproc.tls import ServerCertificates
from extproc.users.api import UsersApi
from extproc.users.ratelimit import RateLimiter
from extproc.users.store import MemoryUserStore, RedisUserStore, UserStore
from strategies import registry

if TYPE_CHECKING:
    from extproc.kube.cluster import Cluster

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
GRPC_OVERHEAD_BYTES = 1024 * 1024
CUT_AHEAD = 0.05
"""How long before the drain's end the streams still open are marked as cut."""
LIVENESS = "liveness"
READINESS_SERVICES = ("", EXT_PROC_SERVICE, "readiness")
"""gRPC health service names that follow readiness (endpoint pickers are probed on the last
two); ``liveness`` is SERVING from start to exit."""


class Server:
    """Builds every component from its settings section and wires them together once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        routing, users = settings.routing, settings.users
        self.telemetry = Telemetry()
        self.registry = PodRegistry()
        self.accounting = Accounting()
        picker = settings.mode == "epp"
        # An endpoint picker must always pick: without a configured default, least-request.
        self.plans = Plans(routing, default=registry.FALLBACK if picker else None)
        self.users: UserStore = (
            RedisUserStore(users.redis_url, users.redis_timeout, users.redis_max_wait)
            if users.redis_url
            else MemoryUserStore()
        )
        self.limiter = RateLimiter(users, self.users, self.telemetry, routing.user_header)
        self.users_api = UsersApi(users, self.users, self.telemetry)
        self.readings = Readings(settings.scraping.stale_after)
        self.kv_events = KvEvents(settings.kv_events, self.registry, self.readings, self.telemetry)
        self.prefix = prefix_producer.build(
            settings.prefix, self.registry, self.readings, self.telemetry, self.kv_events
        )
        self.telemetry.watch_indexes(
            lambda: {"approximate": len(self.prefix.index), "exact": len(self.kv_events.index)}
        )
        self.holds = Holds(settings.autoscaling, self.registry, routing.retry_after_seconds)
        self.signals = Signals(self.registry, self.readings, self.accounting, self.holds)
        self.telemetry.registry.register(SignalsCollector(self.signals))
        # KEDA asks one replica: with a shared Redis, every replica's counts are in the answer.
        self.scaler_counts = (
            RedisCounts(
                self.registry,
                self.accounting,
                self.holds,
                url=users.redis_url,
                timeout=users.redis_timeout,
                telemetry=self.telemetry,
            )
            if users.redis_url
            else LocalCounts(self.registry, self.accounting, self.holds)
        )
        self.scaler = keda.ExternalScaler(self.signals, self.scaler_counts)
        self.pod_health = PodHealth(settings.health, self.registry, self.telemetry)
        self.pipeline = Pipeline(
            routing,
            registry=self.registry,
            readings=self.readings,
            accounting=self.accounting,
            plans=self.plans,
            producers=[self.prefix],
            limiter=self.limiter,
            holds=self.holds,
            health=self.pod_health,
            telemetry=self.telemetry,
            access_log=AccessLog(settings.logging.prompts),
            any_model=picker,
        )
        server = settings.server
        self.exchange_services = ExchangeServices(
            pipeline=self.pipeline,
            models=ModelsList(self.registry),
            strategy_header=routing.strategy_header,
            user_header=routing.user_header,
            max_body_bytes=server.max_body_bytes,
            response_phase=server.response_phase,
            destination_endpoint_header=server.destination_endpoint_header or picker,
            picker=picker,
        )
        self.draining = False
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.http_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self.discovery: StaticDiscovery | None = None
        discovery = settings.discovery
        if discovery.provider == "static":
            if settings.config is None:
                raise ConfigError(
                    "config",
                    "static discovery needs --config FILE listing the pods (docs/configuration.md)",
                )
            self.discovery = StaticDiscovery(
                settings.config, self.registry, self.telemetry, discovery.static_reload_interval
            )
        self.cluster: Cluster | None = None
        kube_discovery = discovery.provider in ("kubernetes", "inferencepool")
        if kube_discovery or settings.kubernetes.manage_httproutes:
            from extproc.kube.cluster import Cluster  # the kubernetes client loads only when needed

            self.cluster = Cluster(
                settings.kubernetes, self.registry, self.telemetry, provider=discovery.provider
            )
        self.telemetry.watch_fleet(self.registry, self.readings, self.accounting)
        self.registry.on_removed(self._forget_pod)
        self.scraper = Scraper(settings.scraping, self.registry, self.readings, self.telemetry)
        self.served_adapters = ServedAdapters(settings.scraping, self.registry)

        self.ext_proc = ExternalProcessor(self.new_exchange, self.telemetry)

    def new_exchange(self, interim: Interim | None = None) -> Exchange:
        return Exchange(self.exchange_services, interim)

    async def start(self) -> None:
        settings = self.settings.server
        if self.discovery is not None:
            self.discovery.load_initial()
        credentials = None
        if settings.tls_cert is not None:
            credentials = ServerCertificates(settings, self.telemetry).credentials()
        elif settings.tls_self_signed:
            credentials = self_signed.credentials()
        message_limit = settings.max_body_bytes + GRPC_OVERHEAD_BYTES
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
            ]
        )
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            self.ext_proc, self._grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        routing = self.settings.routing
        debug_pb2_grpc.add_RouterDebugServicer_to_server(
            debug_service.RouterDebug(
                self.pipeline,
                strategy_header=routing.strategy_header,
                user_header=routing.user_header,
                max_body_bytes=settings.max_body_bytes,
                destination_endpoint_header=settings.destination_endpoint_header,
                prefix_index=self.prefix.index,
                kv_events=self.kv_events,
            ),
            self._grpc,
        )
        externalscaler_pb2_grpc.add_ExternalScalerServicer_to_server(self.scaler, self._grpc)
        reflection.enable_server_reflection(
            (
                EXT_PROC_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                debug_service.SERVICE_NAME,
                keda.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            self._grpc,
        )
        address = f"{_bracket(settings.host)}:{settings.port}"
        try:
            if credentials is None:
                self.grpc_port = self._grpc.add_insecure_port(address)
            else:
                self.grpc_port = self._grpc.add_secure_port(address, credentials)
        except RuntimeError:
            raise OSError(f"cannot bind the gRPC port {address} (already in use?)") from None
        await self._grpc.start()

        http_server.install_bad_request_filter()
        self._http = web.AppRunner(
            http_server.make_app(self.telemetry, self.registry, lambda: self.draining),
            access_log=None,
        )
        await self._http.setup()
        site = web.TCPSite(self._http, settings.host, settings.http_port, reuse_port=False)
        await site.start()
        self.http_port = int(self._http.addresses[0][1])
        await self.users_api.start()
        self.limiter.start()
        log.info(
            "users API on :%d, users in %s",
            self.users_api.port,
            "redis" if self.users.remote else "memory (this process only)",
        )

        if self.discovery is not None:
            self._tasks.append(asyncio.create_task(self.discovery.run(), name="static-discovery"))
        self._tasks.append(asyncio.create_task(_flush_logs(), name="flush-logs"))
        if self.cluster is not None:
            self.cluster.start()
        await self.scraper.start()
        await self.served_adapters.start()
        await self.pod_health.start()
        await self.kv_events.start()
        await self.scaler_counts.start()
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._set_serving(self.registry.loaded)
        if not self.registry.loaded:
            self._tasks.append(asyncio.create_task(self._serve_when_loaded(), name="await-pods"))
        log.info(
            "serving ext_proc on %s:%d, metrics on :%d",
            settings.host,
            self.grpc_port,
            self.http_port,
        )

    async def _serve_when_loaded(self) -> None:
        """Kubernetes discovery loads in the background; report SERVING once pods are known."""
        if self.cluster is not None:
            await self.cluster.wait_loaded()
            await self._set_serving(True)

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in READINESS_SERVICES:
            await self.health.set(service, status)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking streams, let open ones finish, cut what is still open, and be done
        within ``grace`` seconds: the last part of it is kept for closing everything else."""
        deadline = asyncio.get_running_loop().time() + grace
        self.draining = True
        await self._set_serving(False)
        self.scaler.close()  # KEDA's open StreamIsActive calls end now, not at the drain's end
        if self._grpc is not None:
            # Open streams keep routing with live metrics until they finish or grace ends;
            # those still open then are cut, and logged as cut just before.
            streams_grace = max(0.0, grace - _cleanup_reserve(grace))
            stopping = asyncio.create_task(self._grpc.stop(streams_grace))
            await asyncio.wait({stopping}, timeout=max(0.0, streams_grace - CUT_AHEAD))
            if not stopping.done():
                self.ext_proc.cut_open_streams()
            await stopping
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self._close_the_rest(), remaining)
        except TimeoutError:
            log.warning("shutdown did not finish within the drain time; exiting anyway")
        self._stopped.set()

    async def _close_the_rest(self) -> None:
        await self.scraper.stop()
        await self.served_adapters.stop()
        await self.pod_health.stop()
        await self.kv_events.stop()
        await self.scaler_counts.stop()
        await self.prefix.close()
        await cancel_and_wait(self._tasks)
        if self.cluster is not None:
            await self.cluster.stop()
        await self.users_api.stop()
        await self.limiter.stop()
        if self._http is not None:
            await self._http.cleanup()

    async def run_until_signalled(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        grace = self.settings.server.drain_seconds
        log.info("signal received; draining for up to %.1fs", grace)
        await self.stop(grace)

    def _forget_pod(self, name: str) -> None:
        self.plans.forget_pod(name)
        self.prefix.forget_pod(name)
        self.accounting.forget(name)
        self.pipeline.snapshots.forget(name)
        self.pod_health.forget(name)
        self.telemetry.forget_pod(name)


async def _flush_logs() -> None:
    """Buffered log lines reach stderr within a second even when traffic stops."""
    while True:
        await asyncio.sleep(1.0)
        logs.flush()


def _cleanup_reserve(grace: float) -> float:
    """The part of the drain time kept for closing connections, tasks and stores."""
    return min(1.0, grace / 4)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
