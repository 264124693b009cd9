"""Summaries of a run (percentiles, throughput, hit rate, pod shares) and the PNG chart."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.loadgen import percentile
from tools.bench.runner import Record


def summarize(
    name: str,
    records: Sequence[Record],
    wall: float,
    prefix_queries: float,
    prefix_hits: float,
    pods: Sequence[str],
) -> dict[str, Any]:
    ok = [r for r in records if not r.error]
    ttft = [r.ttft * 1000 for r in ok]
    latency = [r.latency * 1000 for r in ok]
    shares = Counter(r.pod for r in ok)
    fair = len(ok) / max(1, len(pods))
    return {
        "target": name,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "ttft_ms": {f"p{q}": round(percentile(ttft, q), 1) for q in (50, 90, 99)},
        "latency_ms": {f"p{q}": round(percentile(latency, q), 1) for q in (50, 90, 99)},
        "throughput_rps": round(len(ok) / wall, 2) if wall else 0.0,
        "output_tokens_per_s": round(sum(r.completion_tokens for r in ok) / wall, 1)
        if wall
        else 0.0,
        "prefix_hit_rate": round(prefix_hits / prefix_queries, 4) if prefix_queries else 0.0,
        "pod_share": {pod: shares.get(pod, 0) for pod in pods},
        "max_share_over_fair": round(max(shares.values(), default=0) / fair, 2) if fair else 0.0,
        "wall_seconds": round(wall, 1),
    }


def markdown(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| target | TTFT p50 | TTFT p90 | TTFT p99 | latency p50 | latency p99 | req/s | tok/s "
        "| prefix hit rate | max pod share / fair | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, e = r["ttft_ms"], r["latency_ms"]
        lines.append(
            f"| {r['target']} | {t['p50']} | {t['p90']} | {t['p99']} | {e['p50']} | {e['p99']} | "
            f"{r['throughput_rps']} | {r['output_tokens_per_s']} | {r['prefix_hit_rate']:.1%} | "
            f"{r['max_share_over_fair']} | {r['errors']} |"
        )
    return "\n".join(lines)


def chart(results: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["target"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.27
    for offset, q in zip((-width, 0.0, width), (50, 90, 99), strict=True):
        axes[0].bar(
            [i + offset for i in range(len(names))],
            [r["ttft_ms"][f"p{q}"] for r in results],
            width,
            label=f"p{q}",
        )
    axes[0].set_title("TTFT (ms)")
    axes[0].legend()
    axes[1].bar(range(len(names)), [100 * r["prefix_hit_rate"] for r in results])
    axes[1].set_title("pods' prefix-cache hit rate (%)")
    axes[2].bar(range(len(names)), [r["output_tokens_per_s"] for r in results])
    axes[2].set_title("output tokens / s")
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
