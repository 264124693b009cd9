"""A LoRA adapter's request prefers the pods already running it, unless they are much busier."""

from __future__ import annotations

from extproc.routing.adapter_affinity import SWAP_COST, prefer_running
from strategies.context import PodMetrics
from tests.helpers import snapshot


def names(pods: tuple[object, ...]) -> list[str]:
    return [p.name for p in pods]  # type: ignore[attr-defined]


def test_pods_running_the_adapter_are_preferred() -> None:
    running = PodMetrics(running_adapters=("sql",))
    waiting = PodMetrics(waiting_adapters=("sql",))
    other = PodMetrics(running_adapters=("chat",))
    pods = (
        snapshot("a", running, in_flight=2),
        snapshot("b", other),
        snapshot("c", waiting, in_flight=1),
        snapshot("d"),
    )
    assert names(prefer_running(pods, "sql")) == ["a", "c"]
    assert names(prefer_running(pods, "chat")) == ["b"]
    assert names(prefer_running(pods, "new")) == ["a", "b", "c", "d"]  # nobody runs it


def test_a_busy_holder_gives_way_to_a_swap() -> None:
    busy = int(SWAP_COST) + 3
    pods = (
        snapshot("a", PodMetrics(running_adapters=("sql",)), in_flight=busy),
        snapshot("b", PodMetrics(), in_flight=0),
    )
    assert names(prefer_running(pods, "sql")) == ["a", "b"]
