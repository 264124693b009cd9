"""Running a workload against one target and recording every request."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from tools.bench.workloads import Session


@dataclass
class Target:
    """Where requests go: a base URL (or one per session) and extra headers."""

    name: str
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)
    url_for: Callable[[Session], str] | None = None
    """Per-session base URL (session-sticky routing); overrides ``base_url``."""

    def url(self, session: Session) -> str:
        base = self.url_for(session) if self.url_for is not None else self.base_url
        return base + "/v1/chat/completions"


@dataclass(slots=True)
class Record:
    session: str
    turn: int
    status: int
    started: float
    ttft: float
    latency: float
    pod: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str = ""


async def _request(
    http: aiohttp.ClientSession,
    target: Target,
    session: Session,
    turn: int,
    model: str,
    answers: list[str],
) -> tuple[Record, str]:
    body = session.body(turn, model, answers)
    started = time.perf_counter()
    ttft = 0.0
    pieces: list[str] = []
    usage: dict[str, int] = {}
    pod = ""
    try:
        async with http.post(
            target.url(session),
            data=orjson.dumps(body),
            headers={"content-type": "application/json", **target.headers},
        ) as response:
            pod = response.headers.get("x-pod-name", "")
            if response.status != 200:
                await response.read()
                return Record(
                    session.id,
                    turn,
                    response.status,
                    started,
                    0.0,
                    time.perf_counter() - started,
                    pod,
                    0,
                    0,
                    error="status",
                ), ""
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = orjson.loads(line[6:])
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if not ttft:
                            ttft = time.perf_counter() - started
                        pieces.append(piece)
                if event.get("usage"):
                    usage = event["usage"]
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Record(
            session.id,
            turn,
            0,
            started,
            0.0,
            time.perf_counter() - started,
            pod,
            0,
            0,
            error=type(exc).__name__,
        ), ""
    latency = time.perf_counter() - started
    details: object = usage.get("prompt_tokens_details") or {}
    return Record(
        session.id,
        turn,
        200,
        started,
        ttft or latency,
        latency,
        pod,
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        cached_tokens=(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
    ), "".join(pieces)


async def run(
    target: Target,
    sessions: Sequence[Session],
    model: str,
    *,
    rate: float | None = None,
    concurrency: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Record], float]:
    """Send every session's turns; sessions arrive by Poisson ``rate`` (per second) or are run
    by ``concurrency`` closed-loop workers. Returns the records and the wall time."""
    records: list[Record] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def play(session: Session) -> None:
            answers: list[str] = []
            for turn in range(len(session.questions)):
                record, answer = await _request(http, target, session, turn, model, answers)
                records.append(record)
                answers.append(answer)
                if progress is not None:
                    progress(1)
                if record.error:
                    break

        started = time.perf_counter()
        if rate is not None:
            rng = random.Random(seed)
            tasks = []
            for session in sessions:
                tasks.append(asyncio.create_task(play(session)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(sessions))

            async def worker() -> None:
                while queue:
                    await play(queue.pop())

            await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        return records, time.perf_counter() - started
