"""throughput, least-busy-time, least-kv-cache and least-latency on crafted pod states."""

from __future__ import annotations

import pytest

from strategies.base import (
    CannotDecide,
    MetricsWindow,
    PodMetrics,
    PodView,
    RequestView,
    Timings,
)
from strategies.least_busy_time import LeastBusyTime
from strategies.least_kv_cache import LeastKvCache
from strategies.least_latency import LeastLatency
from strategies.throughput import Throughput

NOW = 1000.0


def pod(
    name: str, metrics: PodMetrics | None = None, age: float = 0.1, **fields: object
) -> PodView:
    view = PodView(name=name, address=f"10.0.0.{len(name)}:8000", model="m", **fields)  # type: ignore[arg-type]
    if metrics is not None:
        view.metrics = metrics
        view.metrics_at = NOW - age
    return view


def request(**fields: object) -> RequestView:
    return RequestView(request_id="r", model="m", now=NOW, **fields)  # type: ignore[arg-type]


def best(scores: list[float] | tuple[float, ...], pods: list[PodView]) -> str:
    return max(zip(scores, pods, strict=True), key=lambda pair: pair[0])[1].name


# -- least-kv-cache --------------------------------------------------------------------------


def test_least_kv_cache_prefers_the_emptiest_cache() -> None:
    pods = [
        pod("a", PodMetrics(kv_cache_usage=0.9)),
        pod("b", PodMetrics(kv_cache_usage=0.2)),
        pod("c", PodMetrics(kv_cache_usage=0.5)),
    ]
    scores = LeastKvCache().score(request(), pods)
    assert best(list(scores), pods) == "b"
    assert all(0 <= s <= 1 for s in scores)


def test_least_kv_cache_counts_requests_sent_since_the_scrape() -> None:
    config = {"block_size": 16, "num_gpu_blocks": 100}
    pods = [
        pod("a", PodMetrics(kv_cache_usage=0.10, **config), sent_since_scrape=4),
        pod("b", PodMetrics(kv_cache_usage=0.20, **config)),
    ]
    # each request is ~ (400/4 + 60) = 160 tokens = 10% of a 1600-token cache
    assert (
        best(list(LeastKvCache().score(request(prompt_length=400, max_tokens=60), pods)), pods)
        == "b"
    )


@pytest.mark.parametrize(
    ("pods", "reason"),
    [
        ([pod("a", PodMetrics(kv_cache_usage=0.1)), pod("b")], "no-metrics"),
        (
            [
                pod("a", PodMetrics(kv_cache_usage=0.1)),
                pod("b", PodMetrics(kv_cache_usage=0.1), age=60),
            ],
            "stale-metrics",
        ),
        ([pod("a", PodMetrics(running=1))], "no-kv-metric"),
    ],
)
def test_least_kv_cache_falls_back_without_fresh_metrics(pods: list[PodView], reason: str) -> None:
    with pytest.raises(CannotDecide) as caught:
        LeastKvCache().score(request(), pods)
    assert caught.value.reason == reason


# -- throughput --------------------------------------------------------------------------------


def window(seconds: float = 30.0, **fields: float | None) -> MetricsWindow:
    return MetricsWindow(seconds=seconds, **fields)  # type: ignore[arg-type]


def test_throughput_prefers_fewest_weighted_tokens() -> None:
    pods = [
        pod("a", PodMetrics(window=window(prompt_tokens=3000, generation_tokens=100))),
        pod("b", PodMetrics(window=window(prompt_tokens=500, generation_tokens=3000))),
        pod("c", PodMetrics(window=window(prompt_tokens=1000, generation_tokens=100))),
    ]
    # weighted: a 6100, b 4000, c 2100
    assert best(list(Throughput().score(request(), pods)), pods) == "c"


def test_throughput_weights_prompt_twice() -> None:
    pods = [
        pod("a", PodMetrics(window=window(prompt_tokens=1000))),
        pod("b", PodMetrics(window=window(generation_tokens=1500))),
    ]
    assert best(list(Throughput().score(request(), pods)), pods) == "b"


def test_throughput_needs_a_window() -> None:
    with pytest.raises(CannotDecide, match="no-window"):
        Throughput().score(request(), [pod("a", PodMetrics(running=0))])
    with pytest.raises(CannotDecide, match="no-metrics"):
        Throughput().score(request(), [pod("a")])


# -- least-latency -----------------------------------------------------------------------------


def profile(e2e: float, ttft: float, queue: float = 0.0, **extra: float) -> MetricsWindow:
    return window(
        requests=10,
        prompt_tokens=1000,
        generation_tokens=1000,
        e2e_seconds=e2e,
        ttft_seconds=ttft,
        queue_seconds=queue,
        **extra,
    )


def test_least_latency_avoids_a_slow_pod_and_a_long_queue() -> None:
    pods = [
        pod("slow", PodMetrics(running=1, waiting=0, window=profile(e2e=10.0, ttft=1.0))),
        pod("queue", PodMetrics(running=1, waiting=8, window=profile(e2e=1.0, ttft=0.1))),
        pod("good", PodMetrics(running=2, waiting=0, window=profile(e2e=1.0, ttft=0.1))),
    ]
    assert best(list(LeastLatency().score(request(max_tokens=50), pods)), pods) == "good"


def test_least_latency_prompt_length_matters_through_prefill() -> None:
    # fast decode but slow prefill vs the opposite: a long prompt prefers the fast prefill
    pods = [
        pod("fast-prefill", PodMetrics(running=1, window=profile(e2e=5.0, ttft=0.1))),
        pod("slow-prefill", PodMetrics(running=1, window=profile(e2e=2.0, ttft=1.5))),
    ]
    long_prompt = request(prompt_length=40000, max_tokens=10)
    short_prompt = request(prompt_length=40, max_tokens=500)
    assert best(list(LeastLatency().score(long_prompt, pods)), pods) == "fast-prefill"
    assert best(list(LeastLatency().score(short_prompt, pods)), pods) == "slow-prefill"


def test_least_latency_idle_pod_borrows_the_median_profile() -> None:
    pods = [
        pod("busy", PodMetrics(running=4, waiting=4, window=profile(e2e=2.0, ttft=0.2))),
        pod("idle", PodMetrics(running=0, waiting=0, window=window())),
    ]
    assert best(list(LeastLatency().score(request(), pods)), pods) == "idle"


def test_least_latency_falls_back_without_any_data() -> None:
    with pytest.raises(CannotDecide, match="no-latency-data"):
        LeastLatency().score(request(), [pod("a", PodMetrics(running=0, window=window()))])


# -- least-busy-time ---------------------------------------------------------------------------


def test_least_busy_time_counts_open_and_finished_request_seconds() -> None:
    strategy = LeastBusyTime(window=30.0)
    pods = [pod("a"), pod("b"), pod("c")]
    # a: one finished request that lasted 10 s; b: one open for 5 s; c: nothing.
    strategy.on_routed(RequestView(request_id="1", model="m", now=NOW - 20), pods[0])
    strategy.on_finished(
        RequestView(request_id="1", model="m", now=NOW - 20),
        pods[0],
        None,
        Timings(routed_at=NOW - 20, finished_at=NOW - 10),
    )
    strategy.on_routed(RequestView(request_id="2", model="m", now=NOW - 5), pods[1])
    assert strategy.busy_seconds("a", NOW) == pytest.approx(10.0, abs=1.0)
    assert strategy.busy_seconds("b", NOW) == pytest.approx(5.0)
    scores = strategy.score(request(), pods)
    assert best(list(scores), pods) == "c"
    assert scores[1] > scores[0]


def test_least_busy_time_forgets_outside_the_window() -> None:
    strategy = LeastBusyTime(window=10.0)
    a = pod("a")
    strategy.on_routed(RequestView(request_id="1", model="m", now=NOW - 100), a)
    strategy.on_finished(
        RequestView(request_id="1", model="m", now=NOW - 100),
        a,
        None,
        Timings(routed_at=NOW - 100, finished_at=NOW - 50),
    )
    assert strategy.busy_seconds("a", NOW) == 0.0
    strategy.forget_pod("a")
    assert strategy.busy_seconds("a", NOW) == 0.0


def test_least_busy_time_long_request_counts_only_its_part_in_the_window() -> None:
    strategy = LeastBusyTime(window=10.0)
    a = pod("a")
    strategy.on_routed(RequestView(request_id="1", model="m", now=NOW - 1000), a)
    strategy.on_finished(
        RequestView(request_id="1", model="m", now=NOW - 1000),
        a,
        None,
        Timings(routed_at=NOW - 1000, finished_at=NOW),
    )
    assert strategy.busy_seconds("a", NOW) == pytest.approx(10.0, abs=1.0)


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (LeastBusyTime, {"window": 0}),
        (LeastBusyTime, {"bucket": 50, "window": 10}),
        (Throughput, {"smoothing": 0}),
        (LeastKvCache, {"chars_per_token": 0}),
        (LeastLatency, {"chars_per_token": -1}),
    ],
)
def test_bad_options_are_rejected(cls: type, options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        cls(**options)


def test_least_latency_predicts_a_busier_batch_slower() -> None:
    # identical profiles measured at a batch of 2; one pod now runs 10 and got 3 more since
    shared = {
        "requests": 10,
        "prompt_tokens": 1000,
        "generation_tokens": 1000,
        "e2e_seconds": 1.0,
        "ttft_seconds": 0.1,
        "queue_seconds": 0.0,
        "mean_running": 2.0,
    }
    pods = [
        pod(
            "busy", PodMetrics(running=10, waiting=0, window=window(**shared)), sent_since_scrape=3
        ),
        pod("calm", PodMetrics(running=2, waiting=0, window=window(**shared))),
    ]
    assert best(list(LeastLatency().score(request(max_tokens=100), pods)), pods) == "calm"


def test_throughput_counts_committed_backlog() -> None:
    # equal history, but "a" is generating for 6 requests that the counters have not seen yet
    history = {"requests": 10, "prompt_tokens": 1000, "generation_tokens": 2000}
    pods = [
        pod("a", PodMetrics(running=6, waiting=0, window=window(**history))),
        pod("b", PodMetrics(running=1, waiting=0, window=window(**history))),
    ]
    assert best(list(Throughput().score(request(), pods)), pods) == "b"
