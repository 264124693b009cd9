"""The routing core decides as it did before its restructure, where no bug was fixed.

``tests/fixtures/decisions/decisions.json`` holds 300 scenarios (pods, metrics, prefix matches,
a history of routed and finished requests) and the combined scores the code before the routing
pipeline computed for them; ``record_before_pipeline.py`` beside it says how they were recorded
and which cases were left out because their behaviour changed on purpose. Each is replayed
here through the new plans and scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from extproc.config import RoutingSettings
from extproc.routing.plans import Plans
from extproc.routing.scoring import decide
from strategies.context import Finished, MetricsWindow, PodMetrics, Usage
from tests.helpers import context, prefix, snapshot

FIXTURE = Path(__file__).parents[1] / "fixtures" / "decisions" / "decisions.json"
SCENARIOS: list[dict[str, Any]] = json.loads(FIXTURE.read_text())


def metrics(data: dict[str, Any] | None) -> PodMetrics | None:
    if data is None:
        return None
    fields = {k: v for k, v in data.items() if k != "window"}
    return PodMetrics(**fields, window=MetricsWindow(**data["window"]))


NOT_RECORDED = {"prefix-cache-and-load": {"evict_weight": 0.0}}
"""Terms added after the recording, off: with them the formulas are the ones recorded (the
cache-pressure term came with precise prefix routing and is tested in test_prefix.py)."""


def replay(data: dict[str, Any]) -> tuple[list[float], list[tuple[str, str]]]:
    plans = Plans(RoutingSettings(strategies=NOT_RECORDED))
    pods = [
        snapshot(
            p["name"],
            metrics(p["metrics"]),
            in_flight=p["in_flight"],
            sent=p["sent_since_scrape"],
            address=p["address"],
        )
        for p in data["pods"]
    ]
    by_name = {p.name: p for p in pods}
    for number, event in enumerate(data["history"]):
        key = 10_000 + number
        pod = by_name[event["pod"]]
        plans.routed(context([pod], user=event["user"], now=event["routed_at"], key=key), pod)
        if "finished_at" in event:
            usage = Usage(event["prompt_tokens"], event["completion_tokens"])
            plans.finished(
                Finished(
                    key,
                    pod.name,
                    event["user"],
                    event["prompt_tokens"],
                    usage,
                    event["routed_at"],
                    event["finished_at"],
                )
            )
    request = data["request"]
    found = prefix(
        [request["prefix_matches"].get(p.name, 0) for p in pods],
        [p["cached_blocks"] for p in data["pods"]],
        blocks=request["prefix_blocks"],
        block_tokens=16,
    )
    ctx = context(
        pods,
        user=request["user"],
        prompt_tokens=-(-request["chars"] // 4),
        max_tokens=request["max_tokens"],
        prefix=found,
        now=data["now"],
    )
    decision = decide(plans.parse(data["strategy"]), ctx, plans.fallback, "replay")
    return decision.combined, decision.fallbacks


@pytest.mark.parametrize(
    "data", SCENARIOS, ids=[f"{i}-{s['strategy']}" for i, s in enumerate(SCENARIOS)]
)
def test_the_same_scores_as_before(data: dict[str, Any]) -> None:
    combined, fallbacks = replay(data)
    assert [list(f) for f in fallbacks] == data["fallbacks"]
    assert combined == pytest.approx(data["combined"], rel=1e-9, abs=1e-12)
    expected = data["combined"]
    assert max(range(len(combined)), key=combined.__getitem__) == max(
        range(len(expected)), key=expected.__getitem__
    )
