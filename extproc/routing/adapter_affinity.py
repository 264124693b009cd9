"""For a LoRA adapter's request, prefer the pods already running it.

A pod that has the adapter among its running or waiting requests (``vllm:lora_requests_info``)
has it in its GPU slots; another pod must first swap it in, which costs about as much as a few
queued requests and can evict an adapter someone else is using. So the candidates narrow to the
pods running it, unless those are busier than the least-loaded other pod by more than
``SWAP_COST`` requests: then the swap is the cheaper wait and every holder stays a candidate.
"""

from __future__ import annotations

from strategies.context import PodSnapshot

SWAP_COST = 4.0
"""Requests of load a pod running the adapter may carry beyond the least-loaded other holder."""


def prefer_running(pods: tuple[PodSnapshot, ...], adapter: str) -> tuple[PodSnapshot, ...]:
    running = []
    others_min = None
    for pod in pods:
        metrics = pod.metrics
        if metrics is not None and (
            adapter in metrics.running_adapters or adapter in metrics.waiting_adapters
        ):
            running.append(pod)
        elif others_min is None or pod.load < others_min:
            others_min = pod.load
    if not running or others_min is None:
        return pods
    kept = tuple(pod for pod in running if pod.load <= others_min + SWAP_COST)
    return kept or pods
