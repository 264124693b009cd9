"""vLLM's ``/metrics`` page, written as exposition text by hand.

Hand-written because a fleet of simulated pods is scraped often and a few string joins are far
cheaper than a registry per pod. The text is laid out as vLLM's (prometheus_client's) is, so a
parser meets what it would meet on a real pod: labels sorted by name, values in Go's float
format, counters declared with their ``_total`` suffix, and every counter and histogram
followed by its ``<name>_created`` gauge family (the Unix time its series appeared).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import SimParams

if TYPE_CHECKING:
    from .sequence import Sequence as Request

# fmt: off
#: vLLM's bucket boundaries for time-to-first-token.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
#: vLLM's request-level latency buckets (e2e, queue, prefill, decode, inference time).
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
#: vLLM's inter-token latency buckets (also time per output token).
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
# fmt: on

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
"""vLLM's finish reasons: every ``request_success_total`` series exists from the start."""

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"


def build_1_2_5_buckets(maximum: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``maximum`` (vLLM's token-count buckets)."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > maximum:
                return tuple(out)
            out.append(float(value))
        exponent += 1


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


def _token_histogram() -> Histogram:
    return Histogram(())


@dataclass(slots=True)
class EngineStats:
    """Counters and histograms one engine accumulates over its life."""

    max_model_len: int = 8192
    created: float = field(default_factory=time.time)
    """Unix time the series appeared (the ``_created`` gauges)."""
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    success: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISHED_REASONS, 0))
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    inference_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    prefill_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    decode_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    iteration_tokens: Histogram = field(default_factory=lambda: Histogram(ITERATION_TOKEN_BUCKETS))
    request_prompt_tokens: Histogram = field(default_factory=_token_histogram)
    request_generation_tokens: Histogram = field(default_factory=_token_histogram)
    request_max_tokens: Histogram = field(default_factory=_token_histogram)
    request_max_generation_tokens: Histogram = field(default_factory=_token_histogram)
    request_n: Histogram = field(default_factory=lambda: Histogram(N_BUCKETS))
    request_preemptions: Histogram = field(default_factory=lambda: Histogram(PREEMPTION_BUCKETS))
    request_prefill_computed: Histogram = field(default_factory=_token_histogram)
    lora_info: dict[tuple[str, str], float] = field(default_factory=dict)
    """(running adapters, waiting adapters) -> Unix time that combination was last seen."""

    def __post_init__(self) -> None:
        buckets = build_1_2_5_buckets(self.max_model_len)
        for name in (
            "request_prompt_tokens",
            "request_generation_tokens",
            "request_max_tokens",
            "request_max_generation_tokens",
            "request_prefill_computed",
        ):
            setattr(self, name, Histogram(buckets))

    def count_success(self, reason: str) -> None:
        self.success[reason] = self.success.get(reason, 0) + 1

    def record_finished(self, seq: Request, reason: str, now: float) -> None:
        """The per-request histograms of a request that ended normally."""
        self.count_success(reason)
        self.e2e.observe(now - seq.arrival_time)
        if seq.first_scheduled_time is not None:
            self.inference_time.observe(now - seq.first_scheduled_time)
        if seq.first_token_time is not None:
            self.decode_time.observe(now - seq.first_token_time)
            if len(seq.output_ids) > 1:
                self.tpot.observe((now - seq.first_token_time) / (len(seq.output_ids) - 1))
        self.request_prompt_tokens.observe(len(seq.prompt_ids))
        self.request_generation_tokens.observe(len(seq.output_ids))
        self.request_max_tokens.observe(seq.max_tokens)
        self.request_max_generation_tokens.observe(seq.max_tokens)
        self.request_n.observe(1)
        self.request_preemptions.observe(seq.num_preemptions)
        self.request_prefill_computed.observe(len(seq.prompt_ids) - seq.num_prompt_cached_tokens)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Instantaneous engine state needed to render gauges."""

    running: int
    waiting: int
    kv_usage: float
    running_loras: Sequence[str]
    waiting_loras: Sequence[str]
    deferred: int = 0
    """Waiting requests held back by the LoRA budget rather than by capacity."""


def go_float(value: float) -> str:
    """A float as prometheus_client writes it (Go's format: ``1.0``, ``1.7e+09``, ``+Inf``)."""
    d = float(value)
    if d == float("inf"):
        return "+Inf"
    if d == float("-inf"):
        return "-Inf"
    if d != d:
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items())) + "}"


class _Writer:
    def __init__(self, base: Mapping[str, str], created: float) -> None:
        self.lines: list[str] = []
        self.base = dict(base)
        self.created = created

    def header(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, extra: Mapping[str, str] | None = None) -> None:
        labels = {**self.base, **extra} if extra else self.base
        self.lines.append(f"{name}{_labels(labels)} {go_float(value)}")

    def gauge(self, name: str, help_text: str, value: float) -> None:
        self.header(name, "gauge", help_text)
        self.sample(name, value)

    def labelled_gauge(
        self, name: str, help_text: str, series: Iterable[tuple[Mapping[str, str], float]]
    ) -> None:
        self.header(name, "gauge", help_text)
        for extra, value in series:
            self.sample(name, value, extra)

    def _created(self, name: str, help_text: str, series: Sequence[Mapping[str, str]]) -> None:
        self.header(f"{name}_created", "gauge", help_text)
        for extra in series:
            self.sample(f"{name}_created", self.created, extra)

    def counter(
        self,
        name: str,
        help_text: str,
        value: float | None = None,
        series: Sequence[tuple[Mapping[str, str], float]] = (),
    ) -> None:
        """``name`` without ``_total``; one series, or labelled ``series``."""
        rows = list(series) if series else [({}, value or 0.0)]
        self.header(f"{name}_total", "counter", help_text)
        for extra, amount in rows:
            self.sample(f"{name}_total", amount, extra)
        self._created(name, help_text, [extra for extra, _ in rows])

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        self.header(name, "histogram", help_text)
        cumulative = 0
        for bound, count in zip(hist.bounds, hist.counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, {"le": go_float(bound)})
        self.sample(f"{name}_bucket", hist.count, {"le": "+Inf"})
        self.sample(f"{name}_count", hist.count)
        self.sample(f"{name}_sum", hist.total)
        self._created(name, help_text, [{}])


def cache_config_labels(params: SimParams) -> dict[str, str]:
    """``vllm:cache_config_info``'s 37 labels: vLLM 0.32's CacheConfig fields as strings."""
    tokens = params.num_gpu_blocks * params.block_size
    return {
        "_block_size_resolved": "True",
        "block_size": str(params.block_size),
        "cache_dtype": "auto",
        "cache_hit_alignment_tokens": "None",
        "effective_attention_block_size": str(params.block_size),
        "enable_mamba_shared_prefix_checkpoint": "False",
        "enable_prefix_caching": str(params.enable_prefix_caching),
        "engine": "0",
        "gpu_memory_utilization": "0.92",
        "hash_block_size": "None",
        "is_attention_free": "False",
        "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_layout": "None",
        "kv_cache_max_concurrency": go_float(tokens / params.max_model_len),
        "kv_cache_memory_bytes": "None",
        "kv_cache_size_tokens": str(tokens),
        "kv_offloading_backend": "native",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "auto",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(params.num_gpu_blocks),
        "num_gpu_blocks_override": "None",
        "prefix_cache_retention_interval": "0",
        "prefix_caching_hash_algo": params.prefix_caching_hash_algo,
        "prefix_match_unit": "None",
        "replayssm_buffer_len": "16",
        "skip_page_size_padded": "None",
        "sliding_window": "None",
        "swa_bounded_replay": "True",
        "use_kda_recoverssm": "False",
        "use_replayssm": "False",
        "user_specified_block_size": "False",
    }


def render(
    model_name: str,
    params: SimParams,
    snapshot: Snapshot,
    stats: EngineStats,
    lora: bool = True,
) -> str:
    """The pod's ``/metrics`` body: vLLM 0.32's families in its order. ``lora`` adds
    ``vllm:lora_requests_info`` (vLLM has it only with ``--enable-lora``)."""
    base = {"engine": "0", "model_name": model_name}
    w = _Writer(base, stats.created)
    for name, what in (
        ("flops", "floating point operations"),
        ("read_bytes", "bytes read from memory"),
        ("write_bytes", "bytes written to memory"),
    ):
        w.counter(
            f"vllm:estimated_{name}_per_gpu",
            f"Estimated number of {what} per GPU (for Model Flops Utilization calculations).",
            0.0,
        )
    w.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        snapshot.running,
    )
    w.gauge(
        "vllm:num_requests_waiting", "Number of requests waiting to be processed.", snapshot.waiting
    )
    w.labelled_gauge(
        "vllm:num_requests_waiting_by_reason",
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
        "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV "
        "transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
        [
            ({"reason": "capacity"}, snapshot.waiting - snapshot.deferred),
            ({"reason": "deferred"}, snapshot.deferred),
        ],
    )
    w.labelled_gauge(
        "vllm:engine_sleep_state",
        "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
        "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
        [
            ({"sleep_state": "awake"}, 1.0),
            ({"sleep_state": "weights_offloaded"}, 0.0),
            ({"sleep_state": "discard_all"}, 0.0),
        ],
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
    for kind in ("queries", "hits"):
        w.counter(
            f"vllm:external_prefix_cache_{kind}",
            f"External prefix cache {kind} from KV connector cross-instance cache sharing, in "
            f"terms of number of {'queried' if kind == 'queries' else 'cached'} tokens.",
            0.0,
        )
    for kind in ("queries", "hits"):
        w.counter(
            f"vllm:mm_cache_{kind}",
            f"Multi-modal cache {kind}, in terms of number of "
            f"{'queried' if kind == 'queries' else 'cached'} items.",
            0.0,
        )
    w.counter(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        stats.preemptions,
    )
    w.counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens)
    computed = stats.prompt_tokens - stats.prompt_tokens_cached
    w.counter(
        "vllm:prompt_tokens_by_source",
        "Number of prompt tokens by source.",
        series=[
            ({"source": "local_compute"}, float(computed)),
            ({"source": "local_cache_hit"}, float(stats.prompt_tokens_cached)),
            ({"source": "external_kv_transfer"}, 0.0),
        ],
    )
    w.counter(
        "vllm:prompt_tokens_cached",
        "Number of cached prompt tokens (local + external).",
        stats.prompt_tokens_cached,
    )
    w.counter(
        "vllm:prompt_tokens_cached_by_source",
        "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), "
        "host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
        "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
        "vllm:external_prefix_cache_hits.",
        series=[
            ({"source": "device"}, float(stats.prompt_tokens_cached)),
            ({"source": "host"}, 0.0),
            ({"source": "p2p"}, 0.0),
            ({"source": "disk"}, 0.0),
            ({"source": "external_unspecified"}, 0.0),
        ],
    )
    w.counter(
        "vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens
    )
    w.counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        series=[({"finished_reason": r}, float(n)) for r, n in stats.success.items()],
    )
    w.base = {"model_name": model_name}
    w.counter(
        "vllm:admission_rejections",
        "Number of admission attempts rejected by a queue limit, by reason.",
        series=[
            ({"reason": "max_num_queued_reqs"}, 0.0),
            ({"reason": "max_num_queued_tokens"}, 0.0),
        ],
    )
    w.base = base
    for name, help_text, hist in (
        (
            "request_prompt_tokens",
            "Number of prefill tokens processed.",
            stats.request_prompt_tokens,
        ),
        (
            "request_generation_tokens",
            "Number of generation tokens processed.",
            stats.request_generation_tokens,
        ),
        (
            "iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            stats.iteration_tokens,
        ),
        (
            "request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            stats.request_max_generation_tokens,
        ),
        ("request_params_n", "Histogram of the n request parameter.", stats.request_n),
        (
            "request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            stats.request_max_tokens,
        ),
        (
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            stats.ttft,
        ),
        (
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            stats.itl,
        ),
        (
            "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            stats.tpot,
        ),
        (
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            stats.e2e,
        ),
        (
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            stats.queue_time,
        ),
        (
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            stats.inference_time,
        ),
        (
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            stats.prefill_time,
        ),
        (
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            stats.decode_time,
        ),
        (
            "request_num_preemptions",
            "Histogram of the number of times a request was preempted.",
            stats.request_preemptions,
        ),
        (
            "request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            stats.request_prefill_computed,
        ),
    ):
        w.histogram(f"vllm:{name}", help_text, hist)
    w.base = {}
    if lora:
        w.header("vllm:lora_requests_info", "gauge", "Running stats on lora requests.")
        for (running, waiting), stamp in stats.lora_info.items():
            labels = {
                "max_lora": str(params.max_loras),
                "running_lora_adapters": running,
                "waiting_lora_adapters": waiting,
            }
            w.sample("vllm:lora_requests_info", stamp, labels)
    w.header("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
    w.sample("vllm:cache_config_info", 1.0, cache_config_labels(params))
    w.lines.append("")
    return "\n".join(w.lines)
