"""Metrics of the Kubernetes side (watches, HTTPRoute management, misplaced model keys).

Registered in the server's own registry next to ``Telemetry``'s. Labels are bounded: resource
kinds, the fixed ``model.aibrix.ai/*`` keys, write operations and finding codes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class KubeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.watch_errors = Counter(
            "extproc_kube_watch_errors",
            "Failed Kubernetes list or watch calls (retried with backoff), by resource kind.",
            ["resource"],
            registry=r,
        )
        self.relists = Counter(
            "extproc_kube_relists",
            "Watches that expired (410 Gone) and were recovered by listing again.",
            ["resource"],
            registry=r,
        )
        self.misplaced_keys = Gauge(
            "extproc_model_keys_misplaced",
            "Objects carrying a model.aibrix.ai or AIBrix autoscaling key where it is ignored (a "
            "behaviour key under labels, or an identity key only under annotations).",
            ["kind", "key", "found_in"],
            registry=r,
        )
        self.leader = Gauge(
            "extproc_httproute_leader",
            "1 while this replica holds the HTTPRoute controller's Lease and may write.",
            registry=r,
        )
        self.writes = Counter(
            "extproc_httproute_writes",
            "Objects the HTTPRoute controller created, updated or deleted.",
            ["kind", "op"],
            registry=r,
        )
        self.reconcile_errors = Counter(
            "extproc_httproute_reconcile_errors",
            "HTTPRoute reconciliations that failed (retried with backoff).",
            registry=r,
        )
        self.findings = Gauge(
            "extproc_httproute_findings",
            "Problems in the current model objects, by code (misplaced_key, invalid_port, "
            "conflict, not_owned, ...); details are in the log.",
            ["code"],
            registry=r,
        )
