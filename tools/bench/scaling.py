"""``python -m tools.bench scaling``: which signal should an autoscaler follow?

A load ramp up and down is played against simulated vLLM pods whose replica count follows an
HPA-style rule, once per signal:

- ``concurrency``: requests in flight at the gateway, held ones included (the KEDA scaler's
  default metric), as a total: desired = ceil(total / target).
- ``kv-cache``: the pods' mean KV-cache usage, as a per-pod value:
  desired = ceil(current x mean / target).
- ``rate``: requests per second over the last minute, as a total: desired = ceil(rps / target).
- ``waiting`` (not in the default set): requests queued at the pods or held at the gateway.

Each pod is the simulator's own engine (``extproc.vllm_sim.engine.Engine``: vLLM's continuous
batching scheduler, paged KV cache, preemption, step times growing with the batch and the
prefill), so TTFT and queueing come from a model of vLLM rather than from a formula. The run
happens in virtual time: an event loop whose clock jumps to its next timer instead of sleeping,
so twenty minutes of traffic take seconds, and every signal sees the same arrivals.

The HPA part follows Kubernetes' defaults where they matter: the rule above with a 10%
tolerance, evaluated every ``sync`` seconds; scale-up at most max(4 pods, 100%) per period;
scale-down to the highest recommendation of the stabilisation window. A new pod serves after
``startup`` seconds (a cold start: pulling weights, loading them, warming up) and costs GPU
time from the moment it is created; a pod scaled down stops taking requests and is gone once its
last one finishes. Requests arriving while no pod is ready are held at the gateway.

Every signal's target is calibrated on the same operating point: one pod kept at
``--concurrency-target`` requests in flight on the steady mix shows the KV usage and the request
rate that become the other two targets. The signals then ask for about the same replicas on
steady traffic, and the differences come from their dynamics and from traffic whose requests
change size (``--mix shift``: a stretch of long requests from the start of the peak).
The default run (two mixes, three signals, twenty simulated minutes each) takes about 75 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import selectors
import statistics
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from extproc.vllm_sim import SimParams
from extproc.vllm_sim.engine import Engine
from extproc.vllm_sim.sequence import Sequence as SimRequest

SIGNALS = ("concurrency", "kv-cache", "rate", "waiting")
DEFAULT_SIGNALS = ("concurrency", "kv-cache", "rate")
PER_POD_VALUE = frozenset({"kv-cache"})
"""Signals that are a mean over pods (KEDA ``metricType: Value``); the others are totals."""

POD = SimParams(
    max_num_seqs=256,
    max_num_batched_tokens=8192,
    num_gpu_blocks=2048,
    block_size=16,
    max_model_len=8192,
    enable_prefix_caching=False,
    prefill_time_per_token=0.0001,
    decode_time_base=0.02,
    decode_time_per_seq=0.0003,
)
"""A mid-size model on one GPU: 32k tokens of KV cache, ~10k prompt tokens/s of prefill, a
decode step of 20 ms plus 0.3 ms per sequence in the batch."""

T = TypeVar("T")


# -- virtual time --------------------------------------------------------------------------------


class _Clock:
    now = 0.0


class _JumpingSelector(selectors.SelectSelector):
    """Instead of waiting ``timeout`` seconds for I/O that never comes, move the clock."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("the simulation is stuck: nothing is scheduled and no I/O exists")
        if timeout > 0:
            self._clock.now += timeout
        return super().select(0)


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop in simulated time: only timers move it forward, at no wall-clock cost."""

    def __init__(self) -> None:
        self._clock = _Clock()
        super().__init__(_JumpingSelector(self._clock))

    def time(self) -> float:
        return self._clock.now


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


# -- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float
    prompt: int
    output: int
    long: bool


@dataclass(frozen=True)
class Workload:
    duration: float = 1200.0
    base_rate: float = 2.0
    peak_rate: float = 20.0
    mix: str = "shift"
    long_share: float = 0.05
    shift_share: float = 0.4
    seed: int = 0

    def phases(self) -> dict[str, tuple[float, float]]:
        d = self.duration
        return {
            "base": (0.0, 0.05 * d),
            "ramp-up": (0.05 * d, 0.30 * d),
            "peak": (0.30 * d, 0.45 * d),
            "ramp-down": (0.45 * d, 0.70 * d),
            "tail": (0.70 * d, d),
        }

    def rate(self, t: float) -> float:
        phases = self.phases()
        base, peak = self.base_rate, self.peak_rate
        for name, (start, end) in phases.items():
            if start <= t < end:
                share = (t - start) / (end - start)
                if name == "ramp-up":
                    return base + (peak - base) * share
                if name == "peak":
                    return peak
                if name == "ramp-down":
                    return peak - (peak - base) * share
        return base

    def shift_window(self) -> tuple[float, float]:
        """Where ``mix: shift`` sends long requests: the peak and the first part of the fall."""
        return (0.30 * self.duration, 0.55 * self.duration)

    def long_share_at(self, t: float) -> float:
        start, end = self.shift_window()
        if self.mix == "shift" and start <= t < end:
            return self.shift_share
        return self.long_share

    def arrivals(self) -> list[Arrival]:
        """A Poisson process following ``rate`` (by thinning), each request drawn from the mix:
        chat turns (prompt ~300, answer ~100 tokens, log-normal) or long requests (prompt
        ~1500, answer ~600): orders of magnitude apart in cost, as LLM traffic is."""
        rng = random.Random(self.seed)
        top = max(self.base_rate, self.peak_rate)
        out: list[Arrival] = []
        t = 0.0
        while True:
            t += rng.expovariate(top)
            if t >= self.duration:
                return out
            if rng.random() * top > self.rate(t):
                continue
            long = rng.random() < self.long_share_at(t)
            out.append(request_at(rng, t, long))

    def steady(self) -> Workload:
        return Workload(
            self.duration, self.base_rate, self.peak_rate, "steady", self.long_share, 0, self.seed
        )


def request_at(rng: random.Random, t: float, long: bool) -> Arrival:
    if long:
        prompt = _lognormal(rng, 1500, 0.5, 64, 6000)
        output = _lognormal(rng, 600, 0.5, 16, 1500)
    else:
        prompt = _lognormal(rng, 300, 0.8, 8, 3000)
        output = _lognormal(rng, 100, 0.8, 4, 1000)
    return Arrival(t, prompt, output, long)


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


# -- the cluster -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """The autoscaler: an HPA fed by one signal."""

    signal: str
    target: float
    sync: float = 15.0
    stabilization: float = 300.0
    startup: float = 30.0
    min_replicas: int = 1
    max_replicas: int = 32
    tolerance: float = 0.1
    rate_window: float = 60.0


@dataclass(eq=False)
class Replica:
    created: float
    engine: Engine | None = None
    in_flight: int = 0
    draining: bool = False
    removed: float | None = None


@dataclass
class Outcome:
    arrival: Arrival
    ttft: float | None = None
    e2e: float | None = None


class Cluster:
    """Pods, the gateway in front of them (least in-flight routing, holding while no pod is
    ready) and the autoscaler, in one virtual-time event loop."""

    def __init__(self, rule: Rule, pod: SimParams) -> None:
        self.rule = rule
        self.pod = pod
        self.replicas: list[Replica] = []
        self.held = 0
        self.in_flight = 0
        self.some_ready = asyncio.Event()
        self.recent: deque[float] = deque()
        self.recommendations: deque[tuple[float, int]] = deque()
        self.samples: list[dict[str, float]] = []
        self.last_metric = 0.0
        self._last_scale_up = -math.inf
        self._tasks: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- pods ----------------------------------------------------------------------------------

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.removed is None]

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.engine is not None and not r.draining]

    def add(self, ready_now: bool = False) -> None:
        replica = Replica(self.now())
        self.replicas.append(replica)
        self._spawn(self._boot(replica, 0.0 if ready_now else self.rule.startup))

    async def _boot(self, replica: Replica, delay: float) -> None:
        await asyncio.sleep(delay)
        if replica.removed is not None:  # scaled down before it started
            return
        engine = Engine(self.pod)
        engine.start()
        replica.engine = engine
        self.some_ready.set()

    def drain(self, count: int) -> None:
        """Scale down by ``count``: pods still starting go first, then the least busy."""
        live = [r for r in self.live() if not r.draining]
        order = sorted(live, key=lambda r: (r.engine is not None, r.in_flight, -r.created))
        for replica in order[:count]:
            replica.draining = True
            if replica.engine is None or replica.in_flight == 0:
                self._remove(replica)
        if not self.serving():
            self.some_ready.clear()

    def _remove(self, replica: Replica) -> None:
        replica.removed = self.now()
        if replica.engine is not None:
            self._spawn(replica.engine.stop())

    # -- requests --------------------------------------------------------------------------------

    async def request(self, arrival: Arrival, outcome: Outcome) -> None:
        self.in_flight += 1
        self.recent.append(arrival.at)
        try:
            while not self.serving():
                self.some_ready.clear()
                self.held += 1
                try:
                    await self.some_ready.wait()
                finally:
                    self.held -= 1
            replica = min(self.serving(), key=lambda r: r.in_flight)
            assert replica.engine is not None
            replica.in_flight += 1
            seq = SimRequest([7] * arrival.prompt, arrival.output)
            try:
                replica.engine.submit(seq)
                await seq.done.wait()
            finally:
                replica.in_flight -= 1
                if replica.draining and replica.in_flight == 0 and replica.removed is None:
                    self._remove(replica)
            if seq.first_token_time is not None:
                outcome.ttft = seq.first_token_time - arrival.at
            if seq.finish_time is not None:
                outcome.e2e = seq.finish_time - arrival.at
        finally:
            self.in_flight -= 1

    # -- the autoscaler --------------------------------------------------------------------------

    def metric(self) -> float:
        now = self.now()
        while self.recent and self.recent[0] < now - self.rule.rate_window:
            self.recent.popleft()
        signal = self.rule.signal
        engines = [r.engine for r in self.serving() if r.engine is not None]
        if signal == "concurrency":
            return float(self.in_flight)
        if signal == "waiting":
            return float(self.held + sum(len(e.waiting) for e in engines))
        if signal == "rate":
            return len(self.recent) / min(self.rule.rate_window, max(now, 1.0))
        return statistics.fmean(e.kv.usage for e in engines) if engines else 0.0

    def recommend(self, value: float, current: int) -> int:
        rule = self.rule
        if rule.signal in PER_POD_VALUE:
            ratio = value / rule.target
            if abs(ratio - 1) <= rule.tolerance:
                return current
            return math.ceil(current * ratio - 1e-9)
        if current > 0 and abs(value / (rule.target * current) - 1) <= rule.tolerance:
            return current
        return math.ceil(value / rule.target - 1e-9)

    async def autoscale(self) -> None:
        rule = self.rule
        while True:
            await asyncio.sleep(rule.sync)
            now = self.now()
            current = len([r for r in self.live() if not r.draining])
            value = self.last_metric = self.metric()
            wanted = self.recommend(value, current)
            if self.in_flight and wanted < 1:
                wanted = 1  # KEDA's IsActive: requests waiting means at least one pod
            wanted = max(rule.min_replicas, min(rule.max_replicas, wanted))
            self.recommendations.append((now, wanted))
            while self.recommendations[0][0] < now - rule.stabilization:
                self.recommendations.popleft()
            if wanted > current:
                wanted = min(wanted, max(current + 4, 2 * current))
                for _ in range(wanted - current):
                    self.add()
            else:
                stable = max(w for _, w in self.recommendations)
                if stable < current:
                    self.drain(current - stable)

    async def sample(self, every: float) -> None:
        while True:
            engines = [r.engine for r in self.serving() if r.engine is not None]
            self.samples.append(
                {
                    "t": self.now(),
                    "replicas": float(len(self.live())),
                    "ready": float(len(engines)),
                    "queued": float(self.held + sum(len(e.waiting) for e in engines)),
                    "held": float(self.held),
                    "in_flight": float(self.in_flight),
                    "kv_mean": statistics.fmean(e.kv.usage for e in engines) if engines else 0.0,
                    "metric": self.last_metric,
                }
            )
            await asyncio.sleep(every)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for replica in self.live():
            replica.removed = self.now()
            if replica.engine is not None:
                await replica.engine.stop()
        for task in list(self._tasks):
            task.cancel()


async def simulate(
    rule: Rule,
    workload: Workload,
    arrivals: Sequence[Arrival],
    pod: SimParams = POD,
    slo: float = 2.0,
) -> dict[str, Any]:
    cluster = Cluster(rule, pod)
    for _ in range(rule.min_replicas):
        cluster.add(ready_now=True)
    loop = asyncio.get_running_loop()
    background = [
        loop.create_task(cluster.autoscale()),
        loop.create_task(cluster.sample(5.0)),
    ]
    outcomes = [Outcome(a) for a in arrivals]
    requests: list[asyncio.Task[None]] = []
    for outcome in outcomes:
        await asyncio.sleep(max(0.0, outcome.arrival.at - loop.time()))
        requests.append(loop.create_task(cluster.request(outcome.arrival, outcome)))
    await asyncio.sleep(max(0.0, workload.duration - loop.time()))
    end = workload.duration
    replica_seconds = sum(
        max(0.0, min(r.removed if r.removed is not None else end, end) - r.created)
        for r in cluster.replicas
    )
    # Let what is still in flight finish (not counted in the GPU time), then stop.
    if requests:
        await asyncio.wait(requests, timeout=600.0)
    for task in background:
        task.cancel()
    await cluster.close()
    return summarize(rule, workload, outcomes, cluster.samples, replica_seconds, slo)


def summarize(
    rule: Rule,
    workload: Workload,
    outcomes: Sequence[Outcome],
    samples: list[dict[str, float]],
    replica_seconds: float,
    slo: float,
) -> dict[str, Any]:
    ttfts = [o.ttft for o in outcomes if o.ttft is not None]
    result: dict[str, Any] = {
        "signal": rule.signal,
        "target": rule.target,
        "gpu_seconds": round(replica_seconds, 1),
        "peak_replicas": int(max((s["replicas"] for s in samples), default=0)),
        "requests": len(outcomes),
        "unfinished": sum(1 for o in outcomes if o.ttft is None),
        "ttft": _percentiles(ttfts),
        "e2e": _percentiles([o.e2e for o in outcomes if o.e2e is not None]),
        "ttft_over_slo": round(sum(1 for t in ttfts if t > slo) / max(1, len(ttfts)), 4),
        "queued_mean": round(statistics.fmean(s["queued"] for s in samples), 2),
        "queued_max": int(max((s["queued"] for s in samples), default=0)),
        "by_phase": {},
    }
    windows = dict(workload.phases())
    if workload.mix == "shift":
        windows["long-requests"] = workload.shift_window()
    for name, (start, end) in windows.items():
        inside = [o.ttft for o in outcomes if start <= o.arrival.at < end and o.ttft is not None]
        replicas = [s["replicas"] for s in samples if start <= s["t"] < end]
        result["by_phase"][name] = {
            "ttft": _percentiles(inside),
            "ttft_over_slo": round(sum(1 for t in inside if t > slo) / max(1, len(inside)), 4),
            "replicas_mean": round(statistics.fmean(replicas), 2) if replicas else 0.0,
        }
    buckets: dict[int, list[float]] = {}
    for o in outcomes:
        if o.ttft is not None:
            buckets.setdefault(int(o.arrival.at // 15), []).append(o.ttft)
    result["series"] = {
        "t": [s["t"] for s in samples],
        "replicas": [s["replicas"] for s in samples],
        "ready": [s["ready"] for s in samples],
        "queued": [s["queued"] for s in samples],
        "in_flight": [s["in_flight"] for s in samples],
        "kv_mean": [round(s["kv_mean"], 4) for s in samples],
        "ttft_t": [15.0 * k + 7.5 for k in sorted(buckets)],
        "ttft_p95": [round(_quantile(buckets[k], 0.95), 3) for k in sorted(buckets)],
    }
    return result


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    return {
        name: round(_quantile(values, q), 3)
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
    }


# -- calibration -----------------------------------------------------------------------------------


async def calibrate(
    concurrency: int, workload: Workload, pod: SimParams = POD, seconds: float = 240.0
) -> dict[str, float]:
    """One pod kept at ``concurrency`` requests (closed loop) on the steady mix: the request
    rate it sustains and the KV usage it shows there become the other signals' targets."""
    engine = Engine(pod)
    engine.start()
    rng = random.Random(workload.seed + 1)
    loop = asyncio.get_running_loop()
    warmup = 60.0
    finished: list[float] = []
    ttfts: list[float] = []

    async def client() -> None:
        while True:
            arrival = request_at(rng, loop.time(), rng.random() < workload.long_share)
            seq = SimRequest([7] * arrival.prompt, arrival.output)
            engine.submit(seq)
            await seq.done.wait()
            if loop.time() > warmup and seq.first_token_time is not None:
                finished.append(loop.time())
                ttfts.append(seq.first_token_time - arrival.at)

    usage: list[float] = []
    clients = [loop.create_task(client()) for _ in range(concurrency)]
    while loop.time() < warmup + seconds:
        await asyncio.sleep(1.0)
        if loop.time() > warmup:
            usage.append(engine.kv.usage)
    for task in clients:
        task.cancel()
    await engine.stop()
    return {
        "concurrency": float(concurrency),
        "rate": round(len(finished) / seconds, 3),
        "kv_usage": round(statistics.fmean(usage), 4),
        "ttft_p95": round(_quantile(ttfts, 0.95), 3),
    }


# -- the command -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    signals: tuple[str, ...] = DEFAULT_SIGNALS
    mixes: tuple[str, ...] = ("steady", "shift")
    workload: Workload = Workload()
    concurrency_target: int = 16
    startup: float = 30.0
    sync: float = 15.0
    stabilization: float = 300.0
    min_replicas: int = 1
    max_replicas: int = 32
    slo: float = 2.0


def run(options: Options) -> dict[str, Any]:
    steady = options.workload.steady()
    calibration = run_virtual(calibrate(options.concurrency_target, steady))
    targets = {
        "concurrency": float(options.concurrency_target),
        "kv-cache": calibration["kv_usage"],
        "rate": calibration["rate"],
        # At the calibration point a pod queues almost nothing: a queue target of a few
        # requests per pod is the usual choice.
        "waiting": 4.0,
    }
    runs: dict[str, dict[str, Any]] = {}
    for mix in options.mixes:
        workload = Workload(**{**asdict(options.workload), "mix": mix})
        arrivals = workload.arrivals()
        runs[mix] = {}
        for signal in options.signals:
            rule = Rule(
                signal,
                targets[signal],
                sync=options.sync,
                stabilization=options.stabilization,
                startup=options.startup,
                min_replicas=options.min_replicas,
                max_replicas=options.max_replicas,
            )
            runs[mix][signal] = run_virtual(simulate(rule, workload, arrivals, slo=options.slo))
    return {
        "benchmark": "scaling",
        "pod": {
            k: v
            for k, v in POD.to_dict().items()
            if k
            in (
                "max_num_seqs",
                "num_gpu_blocks",
                "block_size",
                "prefill_time_per_token",
                "decode_time_base",
                "decode_time_per_seq",
            )
        },
        "workload": {k: v for k, v in asdict(options.workload).items() if k != "mix"},
        "mixes": list(options.mixes),
        "autoscaler": {
            "sync_seconds": options.sync,
            "stabilization_seconds": options.stabilization,
            "startup_seconds": options.startup,
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "tolerance": 0.1,
            "scale_up_limit": "max(4 pods, 100%) per sync period",
        },
        "ttft_slo_seconds": options.slo,
        "calibration": calibration,
        "targets": targets,
        "runs": runs,
    }


def plot(result: dict[str, Any], path: Path) -> bool:
    """replicas, TTFT p95 and queued requests over time, one column per mix; False without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, dict[str, Any]] = result["runs"]
    mixes = list(runs)
    fig, axes = plt.subplots(3, len(mixes), figsize=(6.5 * len(mixes), 10), squeeze=False)
    for column, mix in enumerate(mixes):
        workload = Workload(**result["workload"], mix=mix)
        ax_rep, ax_ttft, ax_queue = (axes[row][column] for row in range(3))
        for signal, run_result in runs[mix].items():
            series = run_result["series"]
            minutes = [t / 60 for t in series["t"]]
            label = f"{signal} ({run_result['gpu_seconds'] / 3600:.2f} GPU-h)"
            ax_rep.step(minutes, series["replicas"], where="post", label=label)
            ax_ttft.plot([t / 60 for t in series["ttft_t"]], series["ttft_p95"], label=signal)
            ax_queue.plot(minutes, series["queued"], label=signal)
        load = ax_rep.twinx()
        grid = [i * workload.duration / 200 for i in range(201)]
        load.plot([t / 60 for t in grid], [workload.rate(t) for t in grid], "k:", alpha=0.5)
        load.set_ylabel("offered requests/s (dotted)")
        if mix == "shift":
            start, end = workload.shift_window()
            for ax in (ax_rep, ax_ttft, ax_queue):
                ax.axvspan(start / 60, end / 60, color="0.9", zorder=0)
        ax_rep.set_title(f"mix: {mix}" + (" (long requests shaded)" if mix == "shift" else ""))
        ax_rep.set_ylabel("replicas")
        ax_rep.legend(loc="upper left", fontsize=8)
        ax_ttft.set_ylabel("TTFT p95 per 15 s (s)")
        ax_ttft.set_yscale("symlog", linthresh=1.0)
        ax_ttft.legend(loc="upper left", fontsize=8)
        ax_queue.set_ylabel("queued requests (pods + held)")
        ax_queue.set_xlabel("minutes")
        ax_queue.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per mix and signal: cost and latency side by side."""
    rows = []
    for mix, signals in result["runs"].items():
        for signal, r in signals.items():
            rows.append(
                {
                    "mix": mix,
                    "signal": signal,
                    "gpu_hours": round(r["gpu_seconds"] / 3600, 2),
                    "peak_replicas": r["peak_replicas"],
                    "ttft_p50": r["ttft"]["p50"],
                    "ttft_p95": r["ttft"]["p95"],
                    "ttft_over_slo": r["ttft_over_slo"],
                    "queued_mean": r["queued_mean"],
                }
            )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, workload = Options(), Workload()
    parser.add_argument(
        "--signals",
        default=",".join(defaults.signals),
        help=f"comma-separated, of {', '.join(SIGNALS)}",
    )
    parser.add_argument("--mix", default=",".join(defaults.mixes), help="steady, shift or both")
    parser.add_argument("--duration", type=float, default=workload.duration, help="seconds")
    parser.add_argument("--base-rate", type=float, default=workload.base_rate)
    parser.add_argument("--peak-rate", type=float, default=workload.peak_rate)
    parser.add_argument("--concurrency-target", type=int, default=defaults.concurrency_target)
    parser.add_argument(
        "--startup", type=float, default=defaults.startup, help="pod start-up seconds"
    )
    parser.add_argument("--sync", type=float, default=defaults.sync, help="HPA period, seconds")
    parser.add_argument(
        "--stabilization",
        type=float,
        default=defaults.stabilization,
        help="scale-down stabilisation window, seconds",
    )
    parser.add_argument("--min-replicas", type=int, default=defaults.min_replicas)
    parser.add_argument("--max-replicas", type=int, default=defaults.max_replicas)
    parser.add_argument("--slo", type=float, default=defaults.slo, help="TTFT SLO, seconds")
    parser.add_argument("--seed", type=int, default=workload.seed)
    parser.add_argument("--out", help="path stem for the .json and .png results")


def command(args: argparse.Namespace, command_line: str) -> None:
    signals = tuple(s.strip() for s in args.signals.split(",") if s.strip())
    mixes = tuple(m.strip() for m in args.mix.split(",") if m.strip())
    unknown = [s for s in signals if s not in SIGNALS] + [
        m for m in mixes if m not in ("steady", "shift")
    ]
    if unknown:
        raise SystemExit(f"unknown signal or mix: {', '.join(unknown)}")
    workload = Workload(
        duration=args.duration, base_rate=args.base_rate, peak_rate=args.peak_rate, seed=args.seed
    )
    options = Options(
        signals=signals,
        mixes=mixes,
        workload=workload,
        concurrency_target=args.concurrency_target,
        startup=args.startup,
        sync=args.sync,
        stabilization=args.stabilization,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        slo=args.slo,
    )
    started = time.perf_counter()
    result = run(options)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["command"] = command_line
    result["summary"] = summary_rows(result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        if plot(result, stem.with_suffix(".png")):
            print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
        else:
            print(f"wrote {stem.with_suffix('.json')} (no matplotlib: no chart)")
