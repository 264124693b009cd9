"""throughput, least-busy-time, least-kv-cache and least-latency on crafted pod states."""

from __future__ import annotations

import pytest

from strategies.base import CannotDecide
from strategies.context import Finished, MetricsWindow, PodMetrics, PodSnapshot, Unknown
from strategies.least_busy_time import LeastBusyTime
from strategies.least_kv_cache import LeastKvCache
from strategies.least_latency import LeastLatency
from strategies.throughput import Throughput
from tests.helpers import NOW, best, context, snapshot

pod = snapshot


# -- least-kv-cache --------------------------------------------------------------------------


def test_least_kv_cache_prefers_the_emptiest_cache() -> None:
    pods = [
        pod("a", PodMetrics(kv_cache_usage=0.9)),
        pod("b", PodMetrics(kv_cache_usage=0.2)),
        pod("c", PodMetrics(kv_cache_usage=0.5)),
    ]
    scores = LeastKvCache().score(context(pods))
    assert best(scores, pods) == "b"
    assert all(isinstance(s, float) and 0 <= s <= 1 for s in scores)


def test_least_kv_cache_counts_requests_sent_since_the_scrape() -> None:
    config = {"block_size": 16, "num_gpu_blocks": 100}
    pods = [
        pod("a", PodMetrics(kv_cache_usage=0.10, **config), sent=4),
        pod("b", PodMetrics(kv_cache_usage=0.20, **config)),
    ]
    # each request is ~ (100 + 60) = 160 tokens = 10% of a 1600-token cache
    assert (
        best(list(LeastKvCache().score(context(pods, prompt_tokens=100, max_tokens=60))), pods)
        == "b"
    )


@pytest.mark.parametrize(
    ("unknown", "reason"),
    [
        (pod("b"), "no-metrics"),
        (pod("b", PodMetrics(kv_cache_usage=0.1), stale=True), "stale-metrics"),
        (pod("b", PodMetrics(running=1)), "no-kv-metric"),
    ],
)
def test_least_kv_cache_scores_a_pod_without_data_as_unknown(
    unknown: PodSnapshot, reason: str
) -> None:
    scores = LeastKvCache().score(context([pod("a", PodMetrics(kv_cache_usage=0.1)), unknown]))
    assert scores[0] == pytest.approx(0.9)
    assert scores[1] == Unknown(reason)


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
    assert best(list(Throughput().score(context(pods))), pods) == "c"


def test_throughput_weights_prompt_twice() -> None:
    pods = [
        pod("a", PodMetrics(window=window(prompt_tokens=1000))),
        pod("b", PodMetrics(window=window(generation_tokens=1500))),
    ]
    assert best(list(Throughput().score(context(pods))), pods) == "b"


def test_throughput_needs_a_window() -> None:
    pods = [
        pod("a", PodMetrics(running=0)),
        pod("b"),
        pod("c", PodMetrics(window=window(prompt_tokens=10))),
    ]
    scores = Throughput().score(context(pods))
    assert scores[0] == Unknown("no-window")
    assert scores[1] == Unknown("no-metrics")
    assert isinstance(scores[2], float)


def test_throughput_counts_prompt_tokens_sent_since_the_counters_were_read() -> None:
    history = {"requests": 10, "prompt_tokens": 1000, "generation_tokens": 1000}
    pods = [
        pod("a", PodMetrics(window=window(**history)), sent_tokens=3000),
        pod("b", PodMetrics(window=window(**history))),
    ]
    assert best(Throughput().score(context(pods)), pods) == "b"


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
    assert best(list(LeastLatency().score(context(pods, max_tokens=50))), pods) == "good"


def test_least_latency_prompt_length_matters_through_prefill() -> None:
    # fast decode but slow prefill vs the opposite: a long prompt prefers the fast prefill
    pods = [
        pod("fast-prefill", PodMetrics(running=1, window=profile(e2e=5.0, ttft=0.1))),
        pod("slow-prefill", PodMetrics(running=1, window=profile(e2e=2.0, ttft=1.5))),
    ]
    long_prompt = context(pods, prompt_tokens=10000, max_tokens=10)
    short_prompt = context(pods, prompt_tokens=10, max_tokens=500)
    assert best(list(LeastLatency().score(long_prompt)), pods) == "fast-prefill"
    assert best(list(LeastLatency().score(short_prompt)), pods) == "slow-prefill"


def test_least_latency_idle_pod_borrows_the_median_profile() -> None:
    pods = [
        pod("busy", PodMetrics(running=4, waiting=4, window=profile(e2e=2.0, ttft=0.2))),
        pod("idle", PodMetrics(running=0, waiting=0, window=window())),
    ]
    assert best(list(LeastLatency().score(context(pods))), pods) == "idle"


def test_least_latency_falls_back_without_any_data() -> None:
    with pytest.raises(CannotDecide, match="no-latency-data"):
        LeastLatency().score(context([pod("a", PodMetrics(running=0, window=window()))]))


def test_least_latency_leaves_a_pod_without_metrics_unknown() -> None:
    pods = [pod("a", PodMetrics(running=1, window=profile(e2e=1.0, ttft=0.1))), pod("new")]
    scores = LeastLatency().score(context(pods, max_tokens=10))
    assert isinstance(scores[0], float)
    assert scores[1] == Unknown("no-metrics")


# -- least-busy-time ---------------------------------------------------------------------------


def routed(strategy: LeastBusyTime, key: int, pod_name: str, at: float) -> None:
    strategy.on_routed(context([pod(pod_name)], key=key, now=at), pod(pod_name))


def finished(strategy: LeastBusyTime, key: int, pod_name: str, began: float, ended: float) -> None:
    strategy.on_finished(Finished(key, pod_name, None, 0, None, began, ended))


def test_least_busy_time_counts_open_and_finished_request_seconds() -> None:
    strategy = LeastBusyTime(window=30.0)
    pods = [pod("a"), pod("b"), pod("c")]
    # a: one finished request that lasted 10 s; b: one open for 5 s; c: nothing.
    routed(strategy, 1, "a", NOW - 20)
    finished(strategy, 1, "a", NOW - 20, NOW - 10)
    routed(strategy, 2, "b", NOW - 5)
    assert strategy.busy_seconds("a", NOW) == pytest.approx(10.0, abs=1.0)
    assert strategy.busy_seconds("b", NOW) == pytest.approx(5.0)
    scores = strategy.score(context(pods))
    assert best(scores, pods) == "c"
    assert scores[1] > scores[0]  # type: ignore[operator]


def test_least_busy_time_forgets_outside_the_window() -> None:
    strategy = LeastBusyTime(window=10.0)
    routed(strategy, 1, "a", NOW - 100)
    finished(strategy, 1, "a", NOW - 100, NOW - 50)
    assert strategy.busy_seconds("a", NOW) == 0.0
    strategy.forget_pod("a")
    assert strategy.busy_seconds("a", NOW) == 0.0


def test_least_busy_time_long_request_counts_only_its_part_in_the_window() -> None:
    strategy = LeastBusyTime(window=10.0)
    routed(strategy, 1, "a", NOW - 1000)
    finished(strategy, 1, "a", NOW - 1000, NOW)
    assert strategy.busy_seconds("a", NOW) == pytest.approx(10.0, abs=1.0)


def test_least_busy_time_does_not_bring_back_a_pod_that_left() -> None:
    strategy = LeastBusyTime(window=30.0)
    routed(strategy, 1, "gone", NOW - 5)
    strategy.forget_pod("gone")
    finished(strategy, 1, "gone", NOW - 5, NOW)
    assert "gone" not in strategy._slots and "gone" not in strategy._open


def test_least_busy_time_keys_requests_by_the_servers_key_not_the_clients_id() -> None:
    # Two requests in flight on one pod: ending one must not end the other, whatever ids the
    # clients sent (the strategy never sees them).
    strategy = LeastBusyTime(window=30.0)
    routed(strategy, 1, "a", NOW - 10)
    routed(strategy, 2, "a", NOW - 10)
    finished(strategy, 1, "a", NOW - 10, NOW - 5)
    assert strategy.busy_seconds("a", NOW) == pytest.approx(15.0, abs=1.0)


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (LeastBusyTime, {"window": 0}),
        (LeastBusyTime, {"bucket": 50, "window": 10}),
        (Throughput, {"smoothing": 0}),
        (LeastKvCache, {"default_max_tokens": -1}),
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
        pod("busy", PodMetrics(running=10, waiting=0, window=window(**shared)), sent=3),
        pod("calm", PodMetrics(running=2, waiting=0, window=window(**shared))),
    ]
    assert best(list(LeastLatency().score(context(pods, max_tokens=100))), pods) == "calm"


def test_throughput_counts_committed_backlog() -> None:
    # equal history, but "a" is generating for 6 requests that the counters have not seen yet
    history = {"requests": 10, "prompt_tokens": 1000, "generation_tokens": 2000}
    pods = [
        pod("a", PodMetrics(running=6, waiting=0, window=window(**history))),
        pod("b", PodMetrics(running=1, waiting=0, window=window(**history))),
    ]
    assert best(list(Throughput().score(context(pods))), pods) == "b"
