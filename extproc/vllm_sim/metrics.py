"""vLLM-named Prometheus metrics, written as exposition text by hand.

Hand-written because a fleet of simulated pods is scraped often and a few string joins are far
cheaper than a registry per pod; the output follows prometheus_client's layout (``# HELP``,
``# TYPE``, ``_total`` counters, ``_bucket{le=...}``/``_sum``/``_count`` histograms).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .config import SimParams

# fmt: off
#: vLLM's bucket boundaries for time-to-first-token.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
#: vLLM's request-level latency buckets (e2e, queue time).
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
#: vLLM's inter-token latency buckets.
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
# fmt: on

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class Histogram:
    """Cumulative-on-render histogram: per-bucket counts, sum and count."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


@dataclass(slots=True)
class EngineStats:
    """Counters and histograms one engine accumulates over its life."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    success: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))

    def count_success(self, reason: str) -> None:
        self.success[reason] = self.success.get(reason, 0) + 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Instantaneous engine state needed to render gauges."""

    running: int
    waiting: int
    kv_usage: float
    running_loras: Sequence[str]
    waiting_loras: Sequence[str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _num(value: float) -> str:
    return repr(float(value))


class _Writer:
    def __init__(self, base_labels: list[tuple[str, str]]) -> None:
        self.lines: list[str] = []
        self.base = base_labels

    def header(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, extra: Iterable[tuple[str, str]] = ()) -> None:
        self.lines.append(f"{name}{_labels([*self.base, *extra])} {_num(value)}")

    def gauge(self, name: str, help_text: str, value: float) -> None:
        self.header(name, "gauge", help_text)
        self.sample(name, value)

    def counter(self, name: str, help_text: str, value: float) -> None:
        self.header(f"{name}_total", "counter", help_text)
        self.sample(f"{name}_total", value)

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        self.header(name, "histogram", help_text)
        cumulative = 0
        for bound, count in zip(hist.bounds, hist.counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, [("le", _num(bound))])
        self.sample(f"{name}_bucket", hist.count, [("le", "+Inf")])
        self.sample(f"{name}_count", hist.count)
        self.sample(f"{name}_sum", hist.total)

    def info(self, name: str, help_text: str, labels: list[tuple[str, str]], value: float) -> None:
        self.header(name, "gauge", help_text)
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")


def render(
    model_name: str,
    params: SimParams,
    snapshot: Snapshot,
    stats: EngineStats,
    lora_updated_at: float | None = None,
) -> str:
    """The pod's ``/metrics`` body."""
    w = _Writer([("engine", "0"), ("model_name", model_name)])
    w.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        snapshot.running,
    )
    w.gauge(
        "vllm:num_requests_waiting", "Number of requests waiting to be processed.", snapshot.waiting
    )
    usage = snapshot.kv_usage * (100.0 if params.percent_units else 1.0)
    if params.old_metric_names:
        w.gauge(
            "vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", usage
        )
        prefix = "vllm:gpu_prefix_cache"
    else:
        w.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        prefix = "vllm:prefix_cache"
    w.counter(
        f"{prefix}_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        stats.prefix_queries,
    )
    w.counter(
        f"{prefix}_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        stats.prefix_hits,
    )
    w.counter(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        stats.preemptions,
    )
    w.counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens)
    w.counter(
        "vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens
    )
    w.header("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    for reason in sorted(stats.success) or ["length"]:
        w.sample(
            "vllm:request_success_total",
            stats.success.get(reason, 0),
            [("finished_reason", reason)],
        )
    w.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        stats.ttft,
    )
    w.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        stats.itl,
    )
    w.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        stats.e2e,
    )
    w.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        stats.queue_time,
    )
    w.info(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        [
            ("block_size", str(params.block_size)),
            ("cache_dtype", "auto"),
            ("enable_prefix_caching", str(params.enable_prefix_caching)),
            ("gpu_memory_utilization", "0.9"),
            ("num_cpu_blocks", "0"),
            ("num_gpu_blocks", str(params.num_gpu_blocks)),
        ],
        1.0,
    )
    w.info(
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        [
            ("max_lora", str(params.max_loras)),
            ("running_lora_adapters", ",".join(snapshot.running_loras)),
            ("waiting_lora_adapters", ",".join(snapshot.waiting_loras)),
        ],
        lora_updated_at if lora_updated_at is not None else time.time(),
    )
    w.lines.append("")
    return "\n".join(w.lines)
