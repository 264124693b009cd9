"""Memory of the prefix index at capacity: a million blocks written by many pods.

Measured as the growth of the process's resident memory while the index fills (tracemalloc is
not used: its own bookkeeping would double the figure).
"""

from __future__ import annotations

import gc
import random
import resource
import time
from typing import Any

from extproc.kvevents.index import ExactIndex
from extproc.prefix.index import PrefixIndex


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(
    blocks: int, pods: int, prompt_blocks: int, shared: float, kind: str = "approx"
) -> dict[str, Any]:
    """Fill an index of ``blocks`` capacity with prompts of ``prompt_blocks`` blocks; a share
    ``shared`` of writes re-record an earlier prompt on another pod (so some entries hold
    several pods, as hot prefixes do). ``kind``: the server's own index of what it sent where
    (``approx``) or the index of the pods' KV-cache events (``exact``)."""
    rng = random.Random(0)
    index: PrefixIndex | ExactIndex
    if kind == "exact":
        index = ExactIndex(capacity=blocks)
    else:
        index = PrefixIndex(capacity=blocks, ttl=3600)
    gc.collect()
    rss_before = _rss_kib()
    prompts: list[list[int]] = []
    started = time.perf_counter()
    written = 0
    while len(index) < blocks:
        if prompts and rng.random() < shared:
            hashes = rng.choice(prompts)
        else:
            hashes = [rng.getrandbits(64) for _ in range(prompt_blocks)]
            if len(prompts) < 1000:
                prompts.append(hashes)
        pod = f"pod-{rng.randrange(pods)}"
        if isinstance(index, ExactIndex):
            index.stored(pod, hashes)
        else:
            index.record(hashes, pod)
        written += len(hashes)
    seconds = time.perf_counter() - started
    gc.collect()
    rss = (_rss_kib() - rss_before) * 1024
    return {
        "benchmark": "index-memory",
        "index": kind,
        "blocks": len(index),
        "pods": pods,
        "rss_growth_mib": round(rss / 2**20, 1),
        "bytes_per_block": round(rss / len(index), 1),
        "fill_seconds": round(seconds, 1),
        "record_microseconds_per_block": round(1e6 * seconds / written, 2),
    }
