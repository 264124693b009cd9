"""Which LoRA adapters each pod holds, as the pod itself says.

Every ``models_interval`` each ready pod's ``/v1/models`` is read. vLLM lists a loaded adapter
with ``parent`` set to its base model and ``root`` the path it was loaded from, so those entries
are the pod's adapters (the path, which vLLM hashes into the adapter's KV blocks, lets the prefix
producer name those blocks exactly), and they are reported to the registry, which routes an
adapter only to pods holding it from then on: an adapter unloaded on a pod stops going there
within one interval, one loaded at runtime starts.
A pod that does not answer in a vLLM shape (an error, a timeout, not a model list) keeps its last
report, or, never having answered, the adapters discovery declared for it. Off the request path.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

from extproc.config import ScrapingSettings
from extproc.fleet.registry import Pod, PodRegistry
from extproc.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def adapters_of(body: bytes) -> dict[str, str] | None:
    """The adapters in a ``/v1/models`` answer, each with its ``root`` (empty when absent);
    ``None`` when it is not one."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return None
    return {
        entry["id"]: root if isinstance(root := entry.get("root"), str) else ""
        for entry in data
        if isinstance(entry, dict)
        and isinstance(entry.get("id"), str)
        and isinstance(entry.get("parent"), str)
        and entry["parent"]
    }


class ServedAdapters:
    """Polls every ready pod's ``/v1/models``; the registry's only writer of adapter reports."""

    def __init__(self, settings: ScrapingSettings, registry: PodRegistry) -> None:
        self._interval = settings.models_interval
        self._timeout = aiohttp.ClientTimeout(total=max(settings.timeout, 1.0))
        self._registry = registry
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._interval <= 0:
            return
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._task = asyncio.create_task(self._run(), name="served-adapters")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            pods = [pod for pod in self._registry.pods() if pod.spec.ready]
            await asyncio.gather(*(self._read(pod) for pod in pods))
            await asyncio.sleep(self._interval)

    async def _read(self, pod: Pod) -> None:
        assert self._session is not None
        try:
            async with self._session.get(f"{pod.spec.base_url}/v1/models") as response:
                body = await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return
        adapters = adapters_of(body) if ok else None
        if adapters is None or self._registry.get(pod.name) is not pod:
            return  # not a model list, or the pod changed while we asked
        before = self._registry.serving(pod)
        self._registry.report_adapters(pod.name, adapters)
        if adapters.keys() != before:
            log.info(
                "pod %s holds adapters %s",
                pod.name,
                ", ".join(sorted(adapters)) or "(none)",
                extra={"pod": pod.name},
            )
